"""The cluster's rate limiter: leases of shared PostgreSQL buckets (two limiters = two nodes)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from server.cluster_limits import ClusterRateLimiter
from server.db import Database
from server.ratelimit import Limit

LIMIT = Limit(rate_per_s=10.0, burst=30)


def limiter(db: Database) -> ClusterRateLimiter:
    found = ClusterRateLimiter(db, user_limit=LIMIT, ip_limit=LIMIT, max_buckets=1000)
    found.nodes = 2
    return found


@pytest.fixture
async def pair(db: Database) -> AsyncIterator[tuple[ClusterRateLimiter, ClusterRateLimiter]]:
    a, b = limiter(db), limiter(db)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        yield a, b
        nursery.cancel_scope.cancel()


async def _hammer(limiters: list[ClusterRateLimiter], key: str, seconds: float) -> int:
    """Ask as fast as the event loop allows, alternating nodes; count what was granted."""
    granted = 0
    deadline = trio.current_time() + seconds
    turn = 0
    while trio.current_time() < deadline:
        if limiters[turn % len(limiters)].try_acquire(key) is None:
            granted += 1
        turn += 1
        await trio.sleep(0.002)  # pace: a client sending 500 requests a second
    return granted


async def test_spreading_requests_over_nodes_does_not_multiply_the_budget(
    pair: tuple[ClusterRateLimiter, ClusterRateLimiter],
) -> None:
    a, b = pair
    key = f"user:{uuid.uuid4()}"
    started = trio.current_time()
    granted = await _hammer([a, b], key, 2.0)
    elapsed = trio.current_time() - started
    allowed = LIMIT.burst + LIMIT.rate_per_s * elapsed
    # The bound of server/cluster_limits.py: at most one extra burst, never one per node.
    assert granted <= allowed + LIMIT.burst, (granted, allowed)
    assert granted >= 0.8 * allowed, (granted, allowed)  # and not much stricter either
    assert a.syncs > 0 and b.syncs > 0


async def test_one_node_alone_gets_the_whole_burst_once_leased(db: Database) -> None:
    alone = limiter(db)
    key = f"user:{uuid.uuid4()}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alone.run)
        await alone.warm([(key, LIMIT)])
        burst = sum(alone.try_acquire(key) is None for _ in range(LIMIT.burst))
        assert burst == LIMIT.burst
        wait = alone.try_acquire(key)
        assert wait is not None and wait > 0
        nursery.cancel_scope.cancel()


async def test_an_idle_lease_goes_back_to_the_shared_bucket(db: Database) -> None:
    a, b = limiter(db), limiter(db)
    a.idle_return_s = b.idle_return_s = 0.2
    key = f"user:{uuid.uuid4()}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        await a.warm([(key, LIMIT)])  # a holds (nearly) the whole bucket
        assert b.try_acquire(key) is None  # b's fair share (charged: the bucket goes below 0)
        with trio.fail_after(10):
            while key in a._leases:  # a returns what it does not use
                await trio.sleep(0.05)
        level = await db.fetchval("SELECT level FROM rate_buckets WHERE key = $1", key)
        assert level > 0
        nursery.cancel_scope.cancel()


class _DownDatabase:
    """The database boundary failing every statement (an outage)."""

    async def fetch(self, *args: object) -> list[object]:
        raise OSError("connection refused")


async def test_an_unreachable_database_falls_back_to_local_limits() -> None:
    down = ClusterRateLimiter(
        _DownDatabase(),  # type: ignore[arg-type]
        user_limit=LIMIT,
        ip_limit=LIMIT,
        max_buckets=100,
        degraded_after_s=0.1,
    )
    down.nodes = 3
    key = "user:outage"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(down.run)
        assert sum(down.try_acquire(key) is None for _ in range(LIMIT.burst)) == LIMIT.burst // 3
        with trio.fail_after(10):
            while not down.degraded:
                await trio.sleep(0.05)
        assert down.health()["mode"] == "local"
        # Local buckets with the node's full limit: never unlimited, never stuck at zero.
        granted = sum(down.try_acquire(key) is None for _ in range(100))
        assert granted == LIMIT.burst
        nursery.cancel_scope.cancel()


async def test_a_burst_beyond_this_nodes_share_waits_for_the_shared_bucket(
    db: Database,
) -> None:
    """Two live nodes: a new key's fair share here is half the burst; a request that finds it
    spent asks the shared bucket (acquire waits for the sync) instead of being refused."""
    from server.errors import RateLimited

    node = limiter(db)  # nodes = 2
    key = f"user:{uuid.uuid4()}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        for _ in range(LIMIT.burst):  # the whole burst, although the share is half of it
            await node.acquire(key)
        with pytest.raises(RateLimited):
            await node.acquire(key)
        nursery.cancel_scope.cancel()


async def test_only_a_leased_key_of_a_live_node_may_wait(db: Database) -> None:
    """``may_wait``: the WebSocket defers a refused op to the dispatcher only when waiting for
    the shared bucket can change the answer."""
    node = limiter(db)
    key = f"user:{uuid.uuid4()}"
    assert not node.may_wait(key)  # never asked for here: no lease to refill
    node.try_acquire(key)
    assert node.may_wait(key)
    node._failing_since = node._clock() - node.degraded_after_s - 1  # the database is gone
    assert node.degraded and not node.may_wait(key)
