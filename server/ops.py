"""Operator endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Blueprint, Response, current_app, jsonify

from server import metrics
from server.services import Services

blueprint = Blueprint("ops", __name__)

_DB_CHECK_TIMEOUT_S = 1.0
# The checks whose failure takes an instance out of rotation. The LLM check is reported but does
# not gate: with its circuit open, replies already fail fast (assistant.failed) while history,
# REST and live delivery keep working; turning the instance (often the only one) away from the
# load balancer would make a partial outage total. ThreadlineLLMCircuitOpen alerts on it.
# The cluster check gates too: a node that cannot refresh its row is about to be taken for dead
# by the others (which then end its replies), so it must not take new work.
_GATING_CHECKS = ("database", "migrations", "actors", "cluster")


def _services() -> Services:
    return current_app.config["SERVICES"]  # type: ignore[no-any-return]


@blueprint.get("/healthz")
async def healthz() -> Response:
    """Liveness: the process can serve at all. Never touches the database."""
    return jsonify({"status": "ok"})


def _describe(exc: BaseException) -> str:
    """Exception type names only (a message could hold a DSN): ``Unavailable(OSError)``."""
    cause = exc.__cause__
    name = type(exc).__name__
    return f"{name}({type(cause).__name__})" if cause is not None else name


async def _ping_database(services: Services) -> dict[str, Any]:
    try:
        latency = await services.db.ping(timeout=_DB_CHECK_TIMEOUT_S)
    except trio.TooSlowError:
        return {"ok": False, "error": f"no answer within {_DB_CHECK_TIMEOUT_S}s"}
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; report which
        return {"ok": False, "error": _describe(exc)}
    stats = services.db.stats()
    return {
        "ok": True,
        "latency_ms": round(latency * 1000, 2),
        "pool": {"size": stats.size, "idle": stats.idle, "max": stats.max},
    }


async def _check_migrations(services: Services) -> dict[str, Any]:
    head = services.head_revision
    try:
        with trio.fail_after(_DB_CHECK_TIMEOUT_S):
            current = await services.db.fetchval("SELECT version_num FROM alembic_version")
    except Exception as exc:  # noqa: BLE001 - unreachable DB or no table: not ready
        return {"ok": False, "current": None, "head": head, "error": _describe(exc)}
    ok = current == head
    result: dict[str, Any] = {"ok": ok, "current": current, "head": head}
    if not ok:
        result["error"] = "schema is not at head; run `threadline migrate up`"
    return result


def _check_component(services: Services, name: str) -> dict[str, Any]:
    component = services.extras.get(name)
    if component is None or not hasattr(component, "health"):
        return {"ok": True, "detail": "not running"}
    return component.health()  # type: ignore[no-any-return]


class DatabaseProbe:
    """The database and migration checks of ``/readyz``, one run at a time, bounded for callers.

    asyncpg cannot abandon a query to a server that has stopped answering (a frozen host, a
    SIGSTOP): cancelling it waits for the server. So the checks run in the server's background
    nursery; a probe waits for them at most ``_DB_CHECK_TIMEOUT_S`` (plus a little) and otherwise
    answers "no answer", and probes arriving meanwhile join the run in progress instead of
    piling up more stuck queries.
    """

    def __init__(self, services: Services, nursery: trio.Nursery) -> None:
        self._services = services
        self._nursery = nursery
        self._done: trio.Event | None = None
        self._last: dict[str, dict[str, Any]] = {}

    async def check(self) -> dict[str, dict[str, Any]]:
        """``{"database": ..., "migrations": ...}`` within the time limit."""
        if self._done is None:
            self._done = trio.Event()
            self._nursery.start_soon(self._run, self._done)
        done = self._done
        with trio.move_on_after(_DB_CHECK_TIMEOUT_S + 0.25):
            await done.wait()
            return self._last
        silent = f"no answer within {_DB_CHECK_TIMEOUT_S}s"
        head = self._services.head_revision
        return {
            "database": self._with_embedded({"ok": False, "error": silent}),
            "migrations": {"ok": False, "current": None, "head": head, "error": silent},
        }

    async def _run(self, done: trio.Event) -> None:
        found: dict[str, dict[str, Any]] = {}

        async def run(name: str, check: Callable[[Services], Awaitable[dict[str, Any]]]) -> None:
            found[name] = await check(self._services)

        try:
            # Concurrently: a database that does not answer costs one time limit, not two.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "database", _ping_database)
                nursery.start_soon(run, "migrations", _check_migrations)
            found["database"] = self._with_embedded(found["database"])
            self._last = found
        finally:
            self._done = None
            done.set()

    def _with_embedded(self, result: dict[str, Any]) -> dict[str, Any]:
        embedded = self._services.extras.get("embedded_db")
        if embedded is not None:
            # Why the database is down, when it is ours: "restarting", and how often it was.
            result["embedded"] = embedded.health()
        return result


async def _database_checks(services: Services) -> dict[str, dict[str, Any]]:
    probe = services.extras.get("db_probe")
    if probe is None:
        background = services.extras.get("background")
        if background is None:  # no server nursery (a bare app in a test): check inline
            async with trio.open_nursery() as nursery:
                return await DatabaseProbe(services, nursery).check()
        probe = services.extras["db_probe"] = DatabaseProbe(services, background)
    return await probe.check()  # type: ignore[no-any-return]


@blueprint.get("/readyz")
async def readyz() -> tuple[Response, int]:
    """Readiness: database, schema revision, actors and cluster gate it; the LLM is reported."""
    services = _services()
    found = await _database_checks(services)
    checks = {
        "database": found["database"],
        "migrations": found["migrations"],
        "llm": _check_component(services, "llm"),
        "actors": _check_component(services, "supervisor"),
        "cluster": _check_component(services, "cluster"),
    }
    if services.draining.is_set():
        status = "draining"
    elif all(checks[name]["ok"] for name in _GATING_CHECKS):
        status = "ready"
    else:
        status = "not_ready"
    return jsonify({"status": status, "checks": checks}), 200 if status == "ready" else 503


@blueprint.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus text exposition."""
    stats = _services().db.stats()
    metrics.DB_POOL_CONNECTIONS.labels(state="idle").set(stats.idle)
    metrics.DB_POOL_CONNECTIONS.labels(state="in_use").set(stats.in_use)
    metrics.DB_POOL_CONNECTIONS.labels(state="max").set(stats.max)
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
