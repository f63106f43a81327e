"""A database outage turns /readyz to 503 and back to 200 without a restart; /healthz stays 200."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from server import migrate
from server.embedded_pg import embedded_postgres
from server.runtime import open_server
from tests.conftest import make_settings
from tests.ops import pgcontrol

# Each transition must happen "within seconds": bounded polls, never sleeps to wait for it.
_TRANSITION_LIMIT_S = 15.0


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A separate embedded PostgreSQL (migrated) that these tests alone stop and start.

    Each test leaves it running, as it found it.
    """
    data_dir = tmp_path_factory.mktemp("outage-pg")
    with embedded_postgres(data_dir) as dsn:
        pgdata = data_dir.resolve() / "pgdata"
        migrate.upgrade(dsn)
        try:
            yield dsn, pgdata
        finally:
            # pgserver only stops the postmaster it started; a restarted one is ours to stop.
            if pgcontrol.is_running(pgdata):
                pgcontrol.stop(pgdata)


async def _poll_readyz(client: httpx.AsyncClient, want: int) -> httpx.Response:
    with trio.fail_after(_TRANSITION_LIMIT_S):
        while True:
            response = await client.get("/readyz")
            if response.status_code == want:
                return response
            await trio.sleep(0.2)  # poll interval, not a wait for the outcome


async def test_readiness_follows_a_database_outage(
    tmp_path: Path, own_postgres: tuple[str, Path]
) -> None:
    dsn, pgdata = own_postgres
    sockets = pgcontrol.socket_dir(pgdata)
    settings = make_settings(tmp_path, db_pool_min=2, db_pool_max=4)
    async with (
        open_server(settings, dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=10.0) as client,
    ):
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        account = {"email": "outage@example.com", "password": "a long password 1"}
        assert (await client.post("/api/v1/auth/register", json=account)).status_code == 201
        login = await client.post("/api/v1/auth/login", json=account)
        bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
        client.cookies.clear()

        await trio.to_thread.run_sync(pgcontrol.stop, pgdata)
        started = trio.current_time()
        down = await _poll_readyz(client, 503)
        body = down.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["database"]["ok"] is False
        assert "error" in body["checks"]["database"]
        assert trio.current_time() - started < _TRANSITION_LIMIT_S
        live = await client.get("/healthz")
        assert live.status_code == 200
        assert live.json() == {"status": "ok"}
        # Metrics never touch the database: scrapes keep working through an outage.
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        # Requests that need the database fail fast with the contract's envelope.
        with trio.fail_after(_TRANSITION_LIMIT_S):
            refused = await client.get("/api/v1/projects", headers=bearer)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert "Traceback" not in refused.text

        await trio.to_thread.run_sync(functools.partial(pgcontrol.start, pgdata, sockets))
        back = await _poll_readyz(client, 200)
        assert back.json()["checks"]["database"]["ok"] is True
        assert back.json()["checks"]["migrations"]["ok"] is True

        # The pool recovered: every connection it hands out works (no dead ones kept), with
        # all of them in use at once.
        async def query() -> None:
            assert await running.services.db.fetchval("SELECT 1 FROM pg_sleep(0.05)") == 1

        async with trio.open_nursery() as nursery:
            for _ in range(settings.db_pool_max * 2):
                nursery.start_soon(query)
        assert (await client.get("/api/v1/projects", headers=bearer)).status_code == 200


async def test_readiness_follows_a_database_that_stops_answering(
    tmp_path: Path, own_postgres: tuple[str, Path]
) -> None:
    """A hung database (not a refused one): probes answer 503 within their time limit."""
    dsn, pgdata = own_postgres
    settings = make_settings(tmp_path, db_pool_min=2, db_pool_max=4)
    async with (
        open_server(settings, dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=10.0) as client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        pgcontrol.freeze(pgdata)
        try:
            started = trio.current_time()
            down = await client.get("/readyz")
            elapsed = trio.current_time() - started
            assert down.status_code == 503, down.text
            assert down.json()["checks"]["database"]["error"] == "no answer within 1.0s"
            assert elapsed < 3.0, elapsed  # both checks share one time limit
            assert (await client.get("/healthz")).status_code == 200
        finally:
            pgcontrol.thaw(pgdata)
        await _poll_readyz(client, 200)
        # Connections abandoned mid-query were discarded, not handed out again.
        assert running.services.db.terminated_on_cancel >= 1
        for _ in range(settings.db_pool_max * 2):
            assert await running.services.db.fetchval("SELECT 1") == 1
