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


async def _check_database(services: Services) -> dict[str, Any]:
    result = await _ping_database(services)
    embedded = services.extras.get("embedded_db")
    if embedded is not None:
        # Why the database is down, when it is ours: "restarting", and how often it was.
        result["embedded"] = embedded.health()
    return result


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


@blueprint.get("/readyz")
async def readyz() -> tuple[Response, int]:
    """Readiness: database, schema revision, actors and cluster gate it; the LLM is reported."""
    services = _services()
    found: dict[str, dict[str, Any]] = {}

    async def run(name: str, check: Callable[[Services], Awaitable[dict[str, Any]]]) -> None:
        found[name] = await check(services)

    # Concurrently: a database that does not answer costs one time limit, not two.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "database", _check_database)
        nursery.start_soon(run, "migrations", _check_migrations)
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
