from __future__ import annotations

import httpx

from server import migrate
from server.runtime import RunningServer


async def test_healthz_is_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_each_check(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ready"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["database"]["latency_ms"] >= 0
    head = migrate.head_revision()
    assert body["checks"]["migrations"] == {"ok": True, "current": head, "head": head}


async def test_readyz_says_draining_once_shutdown_begins(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    server.services.draining.set()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "draining"


async def test_request_id_is_kept_or_made(client: httpx.AsyncClient) -> None:
    kept = await client.get("/healthz", headers={"X-Request-ID": "abcdef12-3456"})
    assert kept.headers["X-Request-ID"] == "abcdef12-3456"
    bogus = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert bogus.headers["X-Request-ID"] != "bad id with spaces"
    assert len(bogus.headers["X-Request-ID"]) >= 16


async def test_unknown_route_gets_the_error_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/no/such/thing")  # other GET paths are the web client's
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert error["details"] == {}


async def test_metrics_exposes_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'threadline_http_requests_total{method="GET",route="/healthz",status="200"}' in (
        response.text
    )
    assert 'threadline_db_pool_connections{state="max"} 5.0' in response.text
