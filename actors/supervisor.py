"""A one-for-one supervisor for long-lived actors.

Each supervised actor is an ``async`` callable run in the supervisor's nursery. When it raises
(anything but cancellation), the supervisor logs it, counts ``threadline_actor_restarts_total``
and starts it again after an exponential back-off. An actor that fails more than ``max_restarts``
times within ``window_s`` seconds has exhausted its restart budget: the supervisor marks itself
unhealthy (``/readyz`` turns ``not_ready``) and escalates by raising ``SupervisorEscalation`` into
its owner's nursery, which stops the process so that the orchestrator restarts it cleanly.

An actor that *returns* normally is considered finished and is not restarted.
Cancellation: cancelling the owner's scope stops every supervised actor at once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from server import metrics

log = structlog.get_logger(__name__)

ActorFn = Callable[[], Awaitable[None]]


class SupervisorEscalation(Exception):
    """An actor kept failing beyond its restart budget; the owner must stop."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor!r} exhausted its restart budget")
        self.actor = actor


@dataclass
class _Child:
    name: str
    fn: ActorFn
    running: bool = False
    restarts: int = 0
    failures: deque[float] = field(default_factory=deque)


class Supervisor:
    """Owns a nursery of long-lived actors and restarts the ones that fail.

    ``max_restarts`` failures within ``window_s`` are tolerated; the next one escalates.
    Back-off before restart ``n`` (1-based) is ``min(backoff_max_s, backoff_min_s * 2**(n-1))``.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._nursery = nursery
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._children: dict[str, _Child] = {}
        self._escalated: str | None = None
        # Other components (the hub) add their own figures to health().
        self.probes: dict[str, Callable[[], dict[str, Any]]] = {}

    def supervise(self, name: str, fn: ActorFn) -> None:
        """Start ``fn`` under supervision (non-blocking). ``name`` labels the restart metric."""
        if name in self._children:
            raise ValueError(f"an actor named {name!r} is already supervised")
        child = _Child(name=name, fn=fn)
        self._children[name] = child
        metrics.ACTOR_RESTARTS.labels(actor=name)
        self._nursery.start_soon(self._keep_running, child, name=f"supervised:{name}")

    async def _keep_running(self, child: _Child) -> None:
        while True:
            child.running = True
            try:
                await child.fn()
            except Exception as exc:
                child.running = False
                log.exception("actor.failed", actor=child.name, error=type(exc).__name__)
            else:
                child.running = False
                log.info("actor.finished", actor=child.name)
                return
            now = trio.current_time()
            child.failures.append(now)
            while child.failures and child.failures[0] < now - self.window_s:
                child.failures.popleft()
            if len(child.failures) > self.max_restarts:
                self._escalated = child.name
                log.critical("actor.escalated", actor=child.name, failures=len(child.failures))
                raise SupervisorEscalation(child.name)
            delay = min(
                self.backoff_max_s,
                self.backoff_min_s * math.pow(2, len(child.failures) - 1),
            )
            await trio.sleep(delay)
            child.restarts += 1
            metrics.ACTOR_RESTARTS.labels(actor=child.name).inc()
            log.warning("actor.restarted", actor=child.name, restarts=child.restarts)

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "actors": {...}, "restarts": n, ...}`` for ``/readyz``."""
        result: dict[str, Any] = {
            "ok": self._escalated is None,
            "supervised": {
                name: {"running": child.running, "restarts": child.restarts}
                for name, child in self._children.items()
            },
            "restarts": sum(child.restarts for child in self._children.values()),
        }
        if self._escalated is not None:
            result["escalated"] = self._escalated
        for name, probe in self.probes.items():
            result[name] = probe()
        return result
