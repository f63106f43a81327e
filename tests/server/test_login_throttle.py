"""Per-account login throttling (issue 12, item 6): guessing one account from many addresses is
slowed exponentially, across nodes, without locking the owner out."""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import trio

from server.auth import create_user
from server.login_throttle import DEVICE_COOKIE, account_key
from server.runtime import RunningServer, open_server
from tests.conftest import make_settings
from tests.server.rest_client import assert_error

PASSWORD = "the-right-password"
LOGIN = "/api/v1/auth/login"


@contextlib.asynccontextmanager
async def node(tmp_path: Path, pg_dsn: str, **overrides: Any) -> AsyncIterator[RunningServer]:
    """A server behind a trusted proxy (127.0.0.1), with a quick throttle unless overridden."""
    values: dict[str, Any] = {
        "trusted_proxies": ["127.0.0.1"],
        "login_free_attempts": 3,
        "login_delay_base_s": 30.0,
        "login_delay_max_s": 60.0,
        **overrides,
    }
    async with open_server(make_settings(tmp_path, **values), pg_dsn, bind="127.0.0.1:0") as s:
        yield s


async def new_account(server: RunningServer) -> str:
    email = f"owner-{uuid.uuid4().hex[:10]}@example.com"
    await create_user(server.services, email, PASSWORD)
    return email


def from_address(i: int) -> dict[str, str]:
    """Headers of a request relayed by our trusted proxy for client 203.0.113.i."""
    return {"X-Forwarded-For": f"203.0.113.{i % 250 + 1}"}


async def attempt(http: httpx.AsyncClient, email: str, password: str, i: int = 0) -> httpx.Response:
    return await http.post(
        LOGIN, json={"email": email, "password": password}, headers=from_address(i)
    )


def refused_for(response: httpx.Response) -> float:
    """The wait a 429 asks for (checked against its header and envelope)."""
    error = assert_error(response, 429, "rate_limited")
    wait = float(error["details"]["retry_after_s"])
    assert int(response.headers["Retry-After"]) == max(1, math.ceil(wait))
    return wait


async def test_guessing_from_many_addresses_is_delayed_and_the_owner_still_gets_in(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with (
        node(tmp_path, pg_dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        email = await new_account(server)
        # Three guesses, each from another address (the per-IP limiter sees three clients).
        for i in range(3):
            assert (await attempt(http, email, f"guess-{i}", i)).status_code == 401
        # The fourth, from yet another address, must wait; so must the right password now.
        wait = refused_for(await attempt(http, email, "guess-3", 3))
        assert 25 < wait <= 30.0  # generous: a loaded machine must not let the delay pass
        refused_for(await attempt(http, email, PASSWORD, 4))
        # Another account is not affected, nor is the e-mail's case a way around.
        other = await new_account(server)
        assert (await attempt(http, other, PASSWORD, 5)).status_code == 200
        refused_for(await attempt(http, email.upper(), "guess-4", 6))
        # After the delay the owner logs in as usual, and the count starts again. (The delay is
        # made to pass on the throttle's own clock, the database's; real waits are in the next
        # test.)
        await server.services.db.fetchval(
            "UPDATE login_throttle SET last_attempt_at = now() - interval '31 seconds',"
            " blocked_until = now() - interval '1 second' WHERE key = $1",
            account_key(email),
        )
        assert (await attempt(http, email, PASSWORD, 7)).status_code == 200
        for i in range(3):
            assert (await attempt(http, email, f"again-{i}", i)).status_code == 401


async def test_the_delay_doubles_and_is_capped(tmp_path: Path, pg_dsn: str) -> None:
    async with (
        node(
            tmp_path, pg_dsn, login_free_attempts=1, login_delay_base_s=0.2, login_delay_max_s=0.5
        ) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        email = await new_account(server)
        db = server.services.db
        delays = []
        for i in range(4):
            assert (await attempt(http, email, f"guess-{i}", i)).status_code == 401
            # The delay this attempt set, as stored (request latency does not blur it).
            row = await db.fetchrow(
                "SELECT extract(epoch FROM blocked_until - last_attempt_at)::float8 AS delay,"
                " greatest(0, extract(epoch FROM blocked_until - now()))::float8 AS left"
                " FROM login_throttle WHERE key = $1",
                account_key(email),
            )
            assert row is not None
            delays.append(round(row["delay"], 3))
            await trio.sleep(row["left"])  # the next attempt comes just when it may
        assert delays == [0.2, 0.4, 0.5, 0.5]  # doubling, then capped


async def test_unknown_accounts_are_throttled_alike(tmp_path: Path, pg_dsn: str) -> None:
    # Otherwise a 429 would tell which addresses have an account.
    async with (
        node(tmp_path, pg_dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        nobody = f"nobody-{uuid.uuid4().hex[:10]}@example.com"
        for i in range(3):
            assert (await attempt(http, nobody, "guess", i)).status_code == 401
        refused_for(await attempt(http, nobody, "guess", 3))


async def test_the_throttle_holds_across_nodes_and_concurrent_guesses(
    tmp_path: Path, pg_dsn: str
) -> None:
    slow = {"login_delay_base_s": 30.0, "login_delay_max_s": 60.0}
    async with (
        node(tmp_path / "a", pg_dsn, **slow) as first,
        node(tmp_path / "b", pg_dsn, **slow) as second,
        httpx.AsyncClient(base_url=first.url, timeout=30) as to_first,
        httpx.AsyncClient(base_url=second.url, timeout=30) as to_second,
    ):
        email = await new_account(first)
        statuses: list[int] = []

        async def guess(i: int) -> None:
            http = to_first if i % 2 else to_second
            statuses.append((await attempt(http, email, f"guess-{i}", i)).status_code)

        # 20 guesses at once, from 20 addresses, spread over two nodes sharing the database.
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(guess, i)
        assert sorted(statuses) == [401] * 3 + [429] * 17
        wait = refused_for(await attempt(to_first, email, PASSWORD, 99))
        assert 25 < wait <= 30


async def test_the_schema_caps_the_delay(db: Any) -> None:
    key = account_key(f"schema-{uuid.uuid4().hex}@example.com")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval(
            "INSERT INTO login_throttle VALUES ($1, 1, now(), now() + interval '2 hours')", key
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval("INSERT INTO login_throttle VALUES ($1, 1, now(), now())", b"short")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval("INSERT INTO login_throttle VALUES ($1, 0, now(), now())", key)


async def test_a_known_device_is_not_locked_out_by_strangers(tmp_path: Path, pg_dsn: str) -> None:
    slow = {"login_delay_base_s": 30.0, "login_delay_max_s": 60.0}
    async with (
        node(tmp_path, pg_dsn, **slow) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as owner,
        httpx.AsyncClient(base_url=server.url, timeout=30) as stranger,
    ):
        email = await new_account(server)
        # The owner logs in once: this browser becomes a known device of the account.
        first = await attempt(owner, email, PASSWORD, 1)
        assert first.status_code == 200
        device = owner.cookies.get(DEVICE_COOKIE)
        (set_device,) = [
            h for h in first.headers.get_list("set-cookie") if h.startswith(f"{DEVICE_COOKIE}=")
        ]
        assert device and "httponly" in set_device.lower()
        assert "path=/api/v1/auth/login" in set_device.lower()
        # Strangers drive the account into its delay.
        for i in range(3):
            assert (await attempt(stranger, email, f"guess-{i}", 10 + i)).status_code == 401
        refused_for(await attempt(stranger, email, PASSWORD, 20))
        # The owner's known device still gets in, at once.
        assert (await attempt(owner, email, PASSWORD, 1)).status_code == 200
        # A device token of another account, or a forged one, is no way around the delay.
        other = await new_account(server)
        other_device = httpx.AsyncClient(base_url=server.url, timeout=30)
        async with other_device:
            assert (await attempt(other_device, other, PASSWORD, 30)).status_code == 200
            refused_for(await attempt(other_device, email, PASSWORD, 31))
        stranger.cookies.set(DEVICE_COOKIE, device[:-4] + "AAAA", path="/api/v1/auth/login")
        refused_for(await attempt(stranger, email, PASSWORD, 32))
        # A known device's own wrong guesses are throttled alike (its own row).
        for i in range(3):
            assert (await attempt(owner, email, f"typo-{i}", 1)).status_code == 401
        refused_for(await attempt(owner, email, PASSWORD, 1))
