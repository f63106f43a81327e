"""This node's membership of the cluster: its row in ``nodes``, kept fresh by a heartbeat.

Any number of ``threadline serve`` processes may share one PostgreSQL; each is a *node*, named
by ``THREADLINE_NODE_ID`` (default: host name and pid) and identified for this run by a fresh
``incarnation`` uuid (a restart under the same name is a new incarnation, so whatever the old
one had claimed is known to be dead at once).

Heartbeat: every ``THREADLINE_NODE_TIMEOUT_S / 3`` the node refreshes ``last_seen_at`` and reads
the live nodes (one statement). A node whose row is older than the timeout is dead: other nodes
end the replies it was generating (``server/llm/generation.py``). A clean stop deletes the row.

``health()`` is the ``/readyz`` ``cluster`` check: this node's id, the live nodes as of the last
heartbeat, and ``ok`` while the heartbeat succeeds (a node that cannot refresh its row will soon
be taken for dead by the others, so it must not take traffic either).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from server import metrics
from server.broker import PgBroker
from server.cluster_limits import ClusterRateLimiter
from server.config import Settings
from server.db import Database
from server.logs import set_node_id
from server.services import Services
from server.storage import nodes as store

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One live node as the last heartbeat saw it."""

    incarnation: str
    node_id: str
    host: str
    pid: int
    url: str | None
    started_at: str
    draining: bool
    seen_s_ago: float

    def describe(self, me: str) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "host": self.host,
            "pid": self.pid,
            "url": self.url,
            "started_at": self.started_at,
            "draining": self.draining,
            "seen_s_ago": round(self.seen_s_ago, 3),
            "self": self.incarnation == me,
        }


class Cluster:
    """See the module docstring. ``await join()``, then run ``run()`` in a nursery."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self.node_id = settings.node_id
        self.incarnation = str(uuid.uuid4())
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.url: str | None = None
        self.draining = False
        self.nodes: list[NodeInfo] = []
        self._last_ok: float | None = None
        self._error: str | None = None
        self._wake = trio.Event()
        # Called after each successful heartbeat (e.g. the rate limiter's node count).
        self.observers: list[Callable[[list[NodeInfo]], None]] = []
        self.broker: PgBroker | None = None  # set by the plugin; part of the health check
        self.limiter: ClusterRateLimiter | None = None  # likewise

    @property
    def timeout_s(self) -> float:
        return self._settings.node_timeout_s

    async def join(self) -> None:
        """Insert this node's row (the first heartbeat); raises if the database refuses."""
        await self.beat()
        log.info("cluster.joined", incarnation=self.incarnation, nodes=len(self.nodes))

    async def beat(self) -> None:
        """Refresh this node's row and the list of live nodes."""
        rows = await store.beat(
            self._db,
            incarnation=self.incarnation,
            node_id=self.node_id,
            host=self.host,
            pid=self.pid,
            url=self.url,
            draining=self.draining,
            timeout_s=self.timeout_s,
        )
        now = trio.current_time()
        if self._last_ok is not None and now - self._last_ok > self.timeout_s:
            # The others have taken us for dead meanwhile and ended our replies.
            log.warning("cluster.presumed_dead", silent_s=round(now - self._last_ok, 1))
        self._last_ok = now
        self._error = None
        self.nodes = [
            NodeInfo(
                incarnation=str(r["incarnation"]),
                node_id=r["node_id"],
                host=r["host"],
                pid=r["pid"],
                url=r["url"],
                started_at=r["started_at"].isoformat(),
                draining=r["draining"],
                seen_s_ago=max(0.0, float(r["seen_s_ago"])),
            )
            for r in rows
        ]
        metrics.CLUSTER_NODES.set(len(self.nodes))
        for observe in self.observers:
            observe(self.nodes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat until cancelled; a failed beat is logged and retried at the next one."""
        task_status.started()
        while True:
            with trio.move_on_after(self._settings.node_heartbeat_s):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                with trio.fail_after(max(1.0, self._settings.node_heartbeat_s)):
                    await self.beat()
            except Exception as exc:  # noqa: BLE001 - the database may be down; keep beating
                self._error = type(exc).__name__
                log.warning("cluster.heartbeat_failed", error=self._error)

    async def leave(self) -> None:
        """Delete this node's row (call once its replies are settled)."""
        try:
            await store.leave(self._db, self.incarnation)
            log.info("cluster.left")
        except Exception as exc:  # noqa: BLE001 - the row then expires like a dead node's
            log.warning("cluster.leave_failed", error=type(exc).__name__)

    async def set_draining(self) -> None:
        """Tell the other nodes (and operators) that this node is stopping. Never waits: the
        heartbeat task writes it at once (a shutdown hook must not spend the grace period)."""
        self.draining = True
        self._wake.set()

    def live_incarnations(self) -> set[str]:
        return {node.incarnation for node in self.nodes}

    def health(self) -> dict[str, Any]:
        """The ``/readyz`` ``cluster`` check (from the last heartbeat; no query here).

        Not ok when the heartbeat is older than the timeout (the others take this node for
        dead) or the broker is disconnected (live events of other nodes would not arrive).
        """
        age = None if self._last_ok is None else trio.current_time() - self._last_ok
        ok = age is not None and age <= self.timeout_s
        if self.broker is not None:
            ok = ok and self.broker.connected
        result: dict[str, Any] = {
            "ok": ok,
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "live": len(self.nodes),
            "nodes": [node.describe(self.incarnation) for node in self.nodes],
            "heartbeat_age_s": None if age is None else round(age, 3),
            "timeout_s": self.timeout_s,
        }
        if self.broker is not None:
            result["broker"] = self.broker.health()
        if self.limiter is not None:
            result["rate_limits"] = self.limiter.health()
        duplicates = sorted(
            {n.node_id for n in self.nodes if [m.node_id for m in self.nodes].count(n.node_id) > 1}
        )
        if duplicates:
            result["duplicate_node_ids"] = duplicates  # two live processes under one name
        if self._error is not None:
            result["error"] = self._error
        return result


@contextlib.asynccontextmanager
async def cluster_plugin(services: Services) -> AsyncIterator[None]:
    """Join the cluster for the lifetime of the server (a ``server.runtime`` plugin).

    Fills ``services.extras["cluster"]`` (its ``health()`` is the ``/readyz`` ``cluster``
    check) and ``services.extras["broker"]`` (listening before the server serves), and makes
    ``services.limiter`` the cluster's (shared buckets); its shutdown hook (the first to run) marks
    the node draining; leaving deletes the node's row after every other plugin has stopped
    (replies settled).
    """
    set_node_id(services.settings.node_id)
    cluster = Cluster(services.db, services.settings)
    broker = cluster.broker = PgBroker(services.db, cluster.incarnation, cluster.node_id)
    cluster.observers.append(lambda nodes: broker.set_peers({n.incarnation for n in nodes}))
    limiter = cluster.limiter = ClusterRateLimiter.for_cluster(services.settings, services.db)
    cluster.observers.append(lambda nodes: setattr(limiter, "nodes", max(1, len(nodes))))
    await cluster.join()
    services.limiter = limiter
    services.extras["cluster"] = cluster
    services.extras["broker"] = broker
    services.shutdown_hooks.append(cluster.set_draining)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            nursery.start_soon(cluster.run)
            nursery.start_soon(limiter.run)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(cluster.timeout_s / 3):
            await cluster.leave()
