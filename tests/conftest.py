"""Shared fixtures: one real PostgreSQL for the session, a real server per test over loopback.

With ``THREADLINE_TEST_DATABASE_URL`` set the tests use that server (its database is migrated to
head); otherwise they start the embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from server import migrate
from server.config import Settings
from server.db import Database
from server.runtime import RunningServer, open_server


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN of a migrated database, alive for the whole session."""
    external = os.environ.get("THREADLINE_TEST_DATABASE_URL")
    if external:
        migrate.upgrade(external)
        yield external
        return
    from server.embedded_pg import embedded_postgres

    with embedded_postgres(tmp_path_factory.mktemp("pg")) as dsn:
        # A throwaway cluster: no fsync, so a COMMIT never waits for a disk that the machine's
        # other work keeps busy (seconds, seen as statement timeouts under load). A killed
        # PostgreSQL loses nothing this way (the written WAL is in the OS's cache); only the
        # machine's crash could, and the directory is gone by then.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("SELECT pg_reload_conf()")
        migrate.upgrade(dsn)
        yield dsn


@pytest.fixture
def scratch_dsn(pg_dsn: str) -> Iterator[str]:
    """A fresh, EMPTY database (no schema) on the test server, dropped afterwards."""
    name = "tl_scratch_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    async with Database.connect(pg_dsn, min_size=1, max_size=4) as database:
        yield database


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: a private data dir and signing key, and quick timings."""
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path / "data",
        "jwt_secret": "test-secret-" + uuid.uuid4().hex,
        "db_pool_min": 1,
        "db_pool_max": 5,
        "graceful_timeout_s": 5.0,
        "log_format": "json",
        # Cheap Argon2 so registrations and logins cost microseconds, not 50 ms each.
        "argon2_time_cost": 1,
        "argon2_memory_kib": 8,
        "argon2_parallelism": 1,
        # Quick requests from 127.0.0.1 must not trip the limiter; rate-limit tests lower these.
        "rate_limit_per_s": 1000.0,
        "rate_limit_burst": 5000,
        "ip_rate_limit_per_s": 1000.0,
        "ip_rate_limit_burst": 5000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def server(settings: Settings, pg_dsn: str) -> AsyncIterator[RunningServer]:
    """The real server, in this test's trio loop, listening on a free loopback port."""
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``server`` over loopback."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
        yield http


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures the proof tests measured (tests/figures.py), for docs/reliability.md."""
    from tests.figures import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
