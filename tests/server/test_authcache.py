"""Verified-token caching keeps revocation within its bound: on a mock clock, and across two
real nodes sharing one database."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import trio
import trio.testing

from server import auth
from server.authcache import Revocations, TokenCache, poll_revocations
from server.db import Database
from server.runtime import RunningServer, open_server
from server.storage import tokens as token_store
from tests.conftest import make_settings

BOUND = 1.0


def _cache() -> TokenCache:
    return TokenCache(bound_s=BOUND, wall=lambda: 1e9)


# -- on a mock clock -------------------------------------------------------------------------


async def test_cache_answers_only_while_its_last_poll_is_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache()
    entry = cache.put("tok", "user", "jti-0001", expires_at=2e9)
    entry.email = "a@example.com"
    assert cache.confirmed(entry) is None, "never polled: the database must be asked"
    cache.apply(trio.current_time(), Revocations(horizon=5, revoked=[], deleted=[]))
    assert cache.confirmed(entry) == "a@example.com"
    await trio.sleep(BOUND * 0.99)
    assert cache.confirmed(entry) == "a@example.com"
    await trio.sleep(BOUND * 0.02)
    assert cache.confirmed(entry) is None, "a poll older than the bound must not be trusted"
    cache.apply(
        trio.current_time(), Revocations(horizon=6, revoked=[("jti-0001", 2e9)], deleted=[])
    )
    assert cache.is_revoked(entry) and cache.confirmed(entry) is None
    assert cache.horizon == 6


async def test_deleted_users_and_local_revocations_apply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = _cache()
    a = cache.put("a", "user-a", "jti-aaaa", expires_at=2e9)
    b = cache.put("b", "user-b", "jti-bbbb", expires_at=2e9)
    cache.apply(trio.current_time(), Revocations(horizon=1, revoked=[], deleted=["user-a"]))
    assert cache.is_revoked(a) and not cache.is_revoked(b)
    cache.revoke_local("jti-bbbb", 2e9)
    assert cache.is_revoked(b)


async def test_expired_tokens_and_revocations_are_forgotten() -> None:
    now = [1000.0]
    cache = TokenCache(bound_s=BOUND, leeway_s=5, wall=lambda: now[0], max_entries=2)
    cache.put("t1", "u", "jti-1111", expires_at=1010)
    cache.apply(0.0, Revocations(horizon=1, revoked=[("jti-old0", 1003)], deleted=[]))
    assert cache.get("t1") is not None
    now[0] = 1016
    assert cache.get("t1") is None
    cache.apply(0.0, Revocations(horizon=2, revoked=[], deleted=[]))
    assert not cache.is_revoked(cache.put("x", "u", "jti-old0", expires_at=2e9))
    cache.put("t2", "u", "jti-2222", expires_at=2e9)
    cache.put("t3", "u", "jti-3333", expires_at=2e9)
    assert cache.get("x") is None, "least recently used beyond max_entries leaves"


@pytest.mark.parametrize("seed", range(5))
async def test_no_revoked_token_is_trusted_past_the_bound(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A fake feed with random commit times, slow polls and failed polls: at no instant does the
    cache vouch for a token whose revocation committed ``BOUND`` or more seconds earlier."""
    rng = random.Random(seed)
    committed: list[tuple[float, str]] = []  # (commit time, jti), in commit order

    async def fetch(horizon: int) -> Revocations:
        started = trio.current_time()
        seen = [(i, jti) for i, (at, jti) in enumerate(committed) if at <= started]
        await trio.sleep(rng.choice([0.001, 0.01, 0.2, 0.8, 2.5]))  # slow database, at times
        if rng.random() < 0.15:
            raise OSError("database unreachable")
        new = [(jti, 2e9) for i, jti in seen if i >= horizon]
        return Revocations(horizon=len(seen), revoked=new, deleted=[])

    cache = _cache()
    entries = [cache.put(f"t{i}", "user", f"jti-{i:04d}", expires_at=2e9) for i in range(40)]
    live = cache.put("live", "user", "jti-live", expires_at=2e9)
    for entry in [*entries, live]:
        entry.email = "u@example.com"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: poll_revocations(cache, fetch, interval_s=BOUND / 2))
        for entry in entries:
            await trio.sleep(rng.uniform(0.01, 0.7))
            committed.append((trio.current_time(), entry.jti))
            for _ in range(30):
                await trio.sleep(0.05)
                now = trio.current_time()
                cache.confirmed(live)  # counts a hit whenever the cache may answer
                for at, jti in committed:
                    if now - at >= BOUND:
                        stale = next(e for e in entries if e.jti == jti)
                        assert cache.confirmed(stale) is None, (now - at, jti)
        nursery.cancel_scope.cancel()
    assert cache.polls > 10 and cache.hits > 0


# -- the feed in SQL -------------------------------------------------------------------------


async def test_feed_finds_a_revocation_that_commits_after_a_poll(db: Database, pg_dsn: str) -> None:
    user_id = str(uuid.uuid4())
    jti = "late-" + uuid.uuid4().hex
    async with db.statements() as tx:
        await tx.execute(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
            user_id,
            f"{user_id}@example.com",
        )
        start = await token_store.revocations_since(tx, 0)
    horizon = int(start["horizon"])
    # A revocation written by a transaction that is still open when the next poll runs.
    with psycopg.connect(pg_dsn) as late:
        late.execute(
            "INSERT INTO revoked_tokens (jti, user_id, expires_at) "
            "VALUES (%s, %s, now() + interval '1 hour')",
            (jti, user_id),
        )
        async with db.statements() as tx:
            during = await token_store.revocations_since(tx, horizon)
        assert jti not in [r[0] for r in during["revoked"]]
        late.commit()
    async with db.statements() as tx:
        after = await token_store.revocations_since(tx, int(during["horizon"]))
        assert jti in [r[0] for r in after["revoked"]]
        # Deleting the user records it (its revocations go with it, by cascade).
        await tx.execute("DELETE FROM users WHERE id = $1", user_id)
        gone = await token_store.revocations_since(tx, int(after["horizon"]))
    assert user_id in gone["deleted"]


# -- two real nodes on one database ----------------------------------------------------------


async def test_logout_on_one_node_is_refused_by_another_within_the_bound(
    server: RunningServer, client: httpx.AsyncClient, pg_dsn: str, tmp_path: Path
) -> None:
    node_b_settings = make_settings(
        tmp_path / "b",
        jwt_secret=server.services.settings.jwt_secret.get_secret_value(),  # type: ignore[union-attr]
        auth_revocation_bound_s=BOUND,
    )
    async with (
        open_server(node_b_settings, pg_dsn, bind="127.0.0.1:0") as node_b,
        httpx.AsyncClient(base_url=node_b.url, timeout=10) as b,
    ):
        user, token = await auth.create_user_with_token(server.services)
        bearer = {"Authorization": f"Bearer {token}"}
        cache_b = node_b.services.tokens
        with trio.fail_after(5):
            while not cache_b.fresh():  # node B's first poll
                await trio.sleep(0.01)
        assert (await b.get("/api/v1/auth/me", headers=bearer)).status_code == 200
        hits = cache_b.hits
        assert (await b.get("/api/v1/auth/me", headers=bearer)).status_code == 200
        assert cache_b.hits == hits + 1, "node B answers a known token without the database"

        assert (await client.post("/api/v1/auth/logout", headers=bearer)).status_code == 204
        revoked_at = trio.current_time()
        assert (await client.get("/api/v1/auth/me", headers=bearer)).status_code == 401
        await trio.sleep_until(revoked_at + BOUND)  # the documented bound, and not a moment more
        assert (await b.get("/api/v1/auth/me", headers=bearer)).status_code == 401

        # A user deleted in the database: every node refuses its tokens within the bound too.
        other, other_token = await auth.create_user_with_token(server.services)
        other_bearer = {"Authorization": f"Bearer {other_token}"}
        assert (await b.get("/api/v1/auth/me", headers=other_bearer)).status_code == 200
        await server.services.db.fetchval("DELETE FROM users WHERE id = $1", other.id)
        deleted_at = trio.current_time()
        await trio.sleep_until(deleted_at + BOUND)
        assert (await b.get("/api/v1/auth/me", headers=other_bearer)).status_code == 401
    assert user.id


async def test_bound_zero_checks_every_request_in_the_database(pg_dsn: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth_revocation_bound_s=0)
    async with (
        open_server(settings, pg_dsn, bind="127.0.0.1:0") as node,
        httpx.AsyncClient(base_url=node.url, timeout=10) as http,
    ):
        _, token = await auth.create_user_with_token(node.services)
        bearer = {"Authorization": f"Bearer {token}"}
        for _ in range(3):
            assert (await http.get("/api/v1/auth/me", headers=bearer)).status_code == 200
        assert node.services.tokens.hits == 0 and node.services.tokens.polls == 0
