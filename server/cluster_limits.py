"""Rate limits that hold for the cluster as a whole: local leases of shared token buckets.

Measured first (``docs/operations.md`` section 8): one PostgreSQL bucket row per check costs a
pooled connection and a round trip per request and WebSocket frame (about 680 checks/s with a
pool of 10 and 50 concurrent clients on the 2-core test machine, 70 ms p50 under that load) and
cannot run in the synchronous admission of a WebSocket frame. So checks stay local and in memory,
and the buckets are shared through *leases*:

* each key (``user:<id>``, ``ip:<address>``) has one bucket in PostgreSQL (``rate_buckets``);
* a node grants requests from its local lease of that key; when the lease runs low, or a request
  was refused, the key is synced: at most every ``sync_interval_s`` (50 ms) one statement for all
  such keys (``tl_rate_lease``) asks the bucket for more (twice the recent demand, at most
  ``burst``), and returns leases idle for ``idle_return_s`` (2 s);
* a key a node has no lease for (first sight, or returned after idling) gets a *fair share* at
  once, ``burst / live nodes``, charged to the bucket at the next sync (possibly below zero: a
  debt the key then waits off); the WebSocket handshake leases a second share of its user's key
  before the connection starts (``warm``), and an HTTP request or a WebSocket op refused by its
  node's lease waits (``acquire``, at most 250 ms) for the next sync.

Error bound. Every token a node grants comes from the shared bucket, except the fair shares: at
most ``burst / N`` per node that starts using a key, charged as debt. So over any window of
``t`` seconds the cluster admits at most ``burst + rate * t`` plus one extra ``burst`` in the
worst case (all ``N`` nodes starting on a key whose bucket another node has just emptied), and
the debt makes the long-run rate exact: spreading requests over nodes never multiplies a budget.
``N`` is what the node counted at its last heartbeat: for one heartbeat after nodes join, the
ones already running count fewer and their fair shares are larger.
In the other direction, tokens leased to a node and not used there (at most twice its recent
demand, returned after 2 s idle) are unavailable to the others, and a burst that outruns a lease
is refused for at most one sync interval (``retry_after_s`` says so).

With the database unreachable for ``degraded_after_s`` (2 s), the limiter falls back to local
buckets with the full limit on each node (the behaviour of a single node) until a sync succeeds
again: an outage makes limits per node, never absent. ``health()`` says which mode it is in.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from server.config import Settings
from server.db import Database
from server.errors import RateLimited
from server.ratelimit import Clock, IPNetwork, Limit, RateLimiter, parse_networks
from server.storage import rate_buckets as store

log = structlog.get_logger(__name__)

SYNC_INTERVAL_S = 0.05
IDLE_RETURN_S = 2.0
DEGRADED_AFTER_S = 2.0
WARM_TIMEOUT_S = 1.0
# How long ``acquire`` (an HTTP request) waits for the shared bucket after its lease refused it.
ACQUIRE_WAIT_S = 0.25
_FORGET_EVERY_S = 600.0


@dataclass(slots=True)
class _Lease:
    """A node's share of one key's bucket."""

    limit: Limit
    tokens: float  # may be granted now
    touched: float  # clock of the last request
    charge: float = 0.0  # granted without a lease, not yet taken from the bucket
    spent: float = 0.0  # since the last sync
    refused: float = 0.0  # since the last sync
    in_sync: bool = False

    def want(self) -> float:
        demand = self.spent + self.refused
        target = min(self.limit.burst, max(self.limit.rate_per_s * 0.5, 2.0 * demand, 1.0))
        return max(0.0, target - self.tokens)

    def low(self) -> bool:
        return self.tokens < max(1.0, self.limit.rate_per_s * 0.25)


class ClusterRateLimiter(RateLimiter):
    """``RateLimiter`` whose buckets the cluster's nodes share (see the module docstring).

    Synchronous checks as before (never awaits); ``run()`` syncs in the background.
    """

    def __init__(
        self,
        db: Database,
        *,
        user_limit: Limit,
        ip_limit: Limit,
        max_buckets: int,
        trusted_proxies: list[IPNetwork] | None = None,
        clock: Clock = time.monotonic,
        sync_interval_s: float = SYNC_INTERVAL_S,
        idle_return_s: float = IDLE_RETURN_S,
        degraded_after_s: float = DEGRADED_AFTER_S,
    ) -> None:
        super().__init__(
            user_limit=user_limit,
            ip_limit=ip_limit,
            max_buckets=max_buckets,
            trusted_proxies=trusted_proxies,
            clock=clock,
        )
        self._db = db
        self.sync_interval_s = sync_interval_s
        self.idle_return_s = idle_return_s
        self.degraded_after_s = degraded_after_s
        self.nodes = 1  # live nodes, from the cluster's heartbeat
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._synced = trio.Event()  # set (and replaced) after every sync statement
        self._failing_since: float | None = None
        self.syncs = 0
        self.failures = 0

    @classmethod
    def for_cluster(cls, settings: Settings, db: Database) -> ClusterRateLimiter:
        """The limiter configured by ``THREADLINE_*RATE_LIMIT*``, shared through ``db``."""
        return cls(
            db,
            user_limit=Limit(settings.rate_limit_per_s, settings.rate_limit_burst),
            ip_limit=Limit(settings.ip_rate_limit_per_s, settings.ip_rate_limit_burst),
            max_buckets=settings.rate_limit_max_buckets,
            trusted_proxies=parse_networks(settings.trusted_proxies),
        )

    @property
    def degraded(self) -> bool:
        """True while the database has failed the syncs for ``degraded_after_s``."""
        return (
            self._failing_since is not None
            and self._clock() - self._failing_since > self.degraded_after_s
        )

    # -- checks (synchronous) ----------------------------------------------------------------

    def try_acquire(self, key: str, limit: Limit | None = None, cost: float = 1.0) -> float | None:
        """Take ``cost`` tokens from this node's lease of ``key``: None if granted, else seconds
        to wait. Never awaits."""
        limit = limit or self.user_limit
        if self.degraded:
            return super().try_acquire(key, limit, cost)
        now = self._clock()
        lease = self._leases.get(key)
        if lease is None:
            share = limit.burst / max(1, self.nodes)
            lease = _Lease(limit=limit, tokens=share, touched=now, charge=share)
            self._leases[key] = lease
            self._mark(key)
            while len(self._leases) > self.max_buckets:
                self._leases.popitem(last=False)  # its charge is forgotten: lenient, never strict
        else:
            self._leases.move_to_end(key)
            lease.touched = now
        if lease.tokens >= cost:
            lease.tokens -= cost
            lease.spent += cost
            if lease.low():
                self._mark(key)
            return None
        lease.refused += cost
        self._mark(key)
        return max(self.sync_interval_s, (cost - lease.tokens) / limit.rate_per_s)

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    def may_wait(self, key: str) -> bool:
        """True while ``key`` is leased here and the database answers: ``acquire`` may then
        wait for the next sync to ask the shared bucket."""
        return not self.degraded and key in self._leases

    async def acquire(self, key: str, limit: Limit | None = None, cost: float = 1.0) -> None:
        """``check`` for a task that may wait: a refusal by this node's lease (a burst larger
        than its share, on a key it has just started using) waits up to ``ACQUIRE_WAIT_S`` for
        the next sync, which asks the shared bucket, and is decided again. ``RateLimited`` if
        still refused."""
        wait = self.try_acquire(key, limit, cost)
        if wait is not None and self.may_wait(key):
            synced = self._synced
            with trio.move_on_after(ACQUIRE_WAIT_S):
                await synced.wait()
            wait = self.try_acquire(key, limit, cost)
        if wait is not None:
            raise RateLimited(wait)

    # -- syncing (the background task) -------------------------------------------------------

    async def warm_user(self, user_id: str) -> None:
        """Lease the user's key now, up to two fair shares (a WebSocket about to send a burst of
        frames); bounded by ``WARM_TIMEOUT_S``, after which the fair share applies as usual."""
        await self.warm([(f"user:{user_id}", self.user_limit)])

    async def warm(self, keys: list[tuple[str, Limit]]) -> None:
        """Lease each key now, up to two fair shares of its ``burst`` (see ``warm_user``)."""
        if self.degraded:
            return
        now = self._clock()
        requests = []
        for key, limit in keys:
            lease = self._leases.get(key)
            if lease is None:
                share = limit.burst / max(1, self.nodes)
                lease = _Lease(limit=limit, tokens=share, touched=now, charge=share)
                self._leases[key] = lease
            else:
                self._leases.move_to_end(key)
                lease.touched = now
            # Up to two fair shares: room for a burst of frames, without holding the whole
            # bucket away from the other nodes while this one uses little of it.
            target = min(limit.burst, 2 * limit.burst / max(1, self.nodes))
            if lease.in_sync or lease.tokens >= target:
                if lease.charge:
                    self._mark(key)  # the fair share is charged by the next sync
                continue
            lease.in_sync = True
            want = target - lease.tokens
            requests.append(
                store.LeaseRequest(key, lease.charge, want, 0.0, limit.rate_per_s, limit.burst)
            )
            lease.charge = 0.0
        if requests:
            with trio.move_on_after(WARM_TIMEOUT_S):
                await self._apply(requests, {})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync dirty and idle keys until cancelled; at most one statement per interval."""
        task_status.started()
        forgotten = self._clock()
        while True:
            with trio.move_on_after(self.idle_return_s / 2):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.sync()
            if self._clock() - forgotten > _FORGET_EVERY_S:
                forgotten = self._clock()
                try:
                    await store.forget_idle(self._db)
                except Exception as exc:  # noqa: BLE001 - housekeeping; next time
                    log.warning("ratelimit.forget_failed", error=type(exc).__name__)
            await trio.sleep(self.sync_interval_s)

    async def sync(self) -> None:
        """One statement for every key that needs it (see the module docstring)."""
        now = self._clock()
        idle = []
        for key, lease in self._leases.items():  # least recently used first
            if now - lease.touched <= self.idle_return_s:
                break
            if not lease.in_sync:
                idle.append(key)
        keys = (self._dirty | set(idle)) & set(self._leases)
        self._dirty.clear()
        if not keys:
            return
        requests: list[store.LeaseRequest] = []
        returning: dict[str, _Lease] = {}
        for key in keys:
            lease = self._leases[key]
            if lease.in_sync:
                self._dirty.add(key)  # a warm-up is in flight for it: next round
                continue
            is_idle = key in idle and lease.charge == 0
            want = 0.0 if is_idle else lease.want()
            give_back = lease.tokens if is_idle else 0.0
            if lease.charge == 0 and want == 0 and give_back == 0:
                continue
            requests.append(
                store.LeaseRequest(
                    key, lease.charge, want, give_back, lease.limit.rate_per_s, lease.limit.burst
                )
            )
            if is_idle:
                returning[key] = lease
                del self._leases[key]
            lease.in_sync = True
            lease.charge = lease.spent = lease.refused = 0.0
        if requests:
            await self._apply(requests, returning)

    async def _apply(
        self, requests: list[store.LeaseRequest], returning: dict[str, _Lease]
    ) -> None:
        try:
            granted = await store.lease(self._db, requests)
        except Exception as exc:  # noqa: BLE001 - the database is down: retried, then local
            self._restore(requests, returning)
            self.failures += 1
            if self._failing_since is None:
                self._failing_since = self._clock()
                log.warning("ratelimit.sync_failed", error=type(exc).__name__)
            return
        except BaseException:
            self._restore(requests, returning)
            raise
        finally:
            self._synced.set()
            self._synced = trio.Event()
        if self._failing_since is not None:
            log.info("ratelimit.sync_recovered")
        self._failing_since = None
        self.syncs += 1
        for request in requests:
            lease = self._leases.get(request.key)
            if lease is None or request.key in returning:
                continue
            lease.in_sync = False
            lease.tokens += granted.get(request.key, 0.0)

    def _restore(self, requests: list[store.LeaseRequest], returning: dict[str, _Lease]) -> None:
        """Not charged, not returned: put it all back for the next round."""
        for request in requests:
            lease = self._leases.get(request.key) or returning.get(request.key)
            if lease is None:
                continue
            lease.in_sync = False
            lease.charge += request.charge
            if request.key in returning and request.key not in self._leases:
                self._leases[request.key] = lease
            self._dirty.add(request.key)

    def health(self) -> dict[str, Any]:
        """Figures for the ``/readyz`` ``cluster`` check."""
        return {
            "mode": "local" if self.degraded else "cluster",
            "keys": len(self._leases),
            "syncs": self.syncs,
            "failures": self.failures,
        }
