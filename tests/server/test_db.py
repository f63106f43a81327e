"""The storage layer: units of work, cancellation safety, pool health."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import asyncpg
import pytest
import trio

from server.db import Database, aio
from server.errors import Unavailable


async def test_transaction_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    await db.fetchval("CREATE TABLE IF NOT EXISTS tl_test_uow (v int)")
    await db.fetchval("TRUNCATE tl_test_uow")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO tl_test_uow VALUES (1)")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO tl_test_uow VALUES (2)")
            raise RuntimeError("handler failed after writing")
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO tl_test_uow VALUES (3)")
            await tx.fetchval("SELECT 1 / 0")
    assert [r["v"] for r in await db.fetch("SELECT v FROM tl_test_uow ORDER BY v")] == [1]


async def test_cancelled_query_leaves_the_pool_healthy(db: Database) -> None:
    before = db.terminated_on_cancel
    for _ in range(3):  # more cancellations than the pool has connections
        with trio.move_on_after(0.05) as scope:
            async with db.transaction() as tx:
                await tx.execute("SELECT pg_sleep(5)")
        assert scope.cancelled_caught
    assert db.terminated_on_cancel == before + 3
    # Every connection handed out afterwards works and is not inside a transaction.
    async with trio.open_nursery() as nursery:
        results: list[int] = []

        async def query(n: int) -> None:
            async with db.transaction() as tx:
                results.append(await tx.fetchval("SELECT $1::int", n))

        for n in range(8):
            nursery.start_soon(query, n)
    assert sorted(results) == list(range(8))


async def test_cancelled_unit_of_work_commits_nothing(db: Database) -> None:
    await db.fetchval("CREATE TABLE IF NOT EXISTS tl_test_cancel (v int)")
    await db.fetchval("TRUNCATE tl_test_cancel")
    with trio.move_on_after(0.05):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO tl_test_cancel VALUES (1)")
            await tx.execute("SELECT pg_sleep(5)")
    assert await db.fetchval("SELECT count(*) FROM tl_test_cancel") == 0
    async with db.connection() as conn:
        assert not conn.is_in_transaction()


async def test_statement_timeout_is_enforced(pg_dsn: str) -> None:
    async with Database.connect(pg_dsn, min_size=1, max_size=1, statement_timeout_ms=100) as short:
        with pytest.raises(asyncpg.QueryCanceledError):
            await short.fetchval("SELECT pg_sleep(2)")
        assert await short.fetchval("SELECT 1") == 1


async def test_exhausted_pool_is_unavailable_not_a_hang(pg_dsn: str) -> None:
    async with Database.connect(pg_dsn, min_size=1, max_size=1) as tiny:
        async with tiny.connection():
            with pytest.raises(Unavailable):
                async with tiny.connection(timeout=0.1):
                    pass  # pragma: no cover - never reached


async def test_ping_and_stats(db: Database) -> None:
    assert 0 <= await db.ping() < 1
    before = db.stats()
    assert before.in_use == 0
    # Stats follow what is borrowed; ping answers "busy" when nothing can be borrowed in time.
    async with contextlib.AsyncExitStack() as stack:
        for held in range(1, before.max + 1):
            await stack.enter_async_context(db.connection())
            stats = db.stats()
            assert stats.in_use == held and stats.size == stats.in_use + stats.idle
        with pytest.raises((trio.TooSlowError, Unavailable)):
            await db.ping(timeout=0.3)
    after = db.stats()
    assert after.in_use == 0 and after.idle == after.size == before.max
    assert 0 <= await db.ping() < 1


async def test_statements_commit_one_by_one_and_transactions_do_not(db: Database) -> None:
    xid = "SELECT txid_current()"  # a new id per transaction
    async with db.statements() as tx:
        assert await tx.fetchval(xid) != await tx.fetchval(xid)
    async with db.transaction() as tx:
        assert await tx.fetchval(xid) == await tx.fetchval(xid)


async def test_a_one_trip_statement_cancelled_in_flight_leaves_the_pool_healthy(
    db: Database,
) -> None:
    before = db.terminated_on_cancel
    for _ in range(5):  # more than the pool's connections
        with trio.move_on_after(0.05) as scope:
            await db.oneshot.fetchval("SELECT pg_sleep(5)")
        assert scope.cancelled_caught
    assert db.terminated_on_cancel == before + 5
    results: list[int] = []

    async def query(n: int) -> None:
        results.append(await db.fetchval("SELECT $1::int", n))

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(query, n)
    assert sorted(results) == list(range(8))
    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.atomic.fetchval("SELECT 1 / 0")
    assert await db.atomic.fetchval("SELECT 2") == 2  # the failed transaction was ended


async def test_an_atomic_statement_cancelled_while_blocked_commits_nothing_ever(
    db: Database,
) -> None:
    """Cancelled before COMMIT: even once the lock it waited for is released, nothing commits
    (an autocommitted statement would go on and commit on the server)."""
    await db.fetchval("CREATE TABLE IF NOT EXISTS tl_test_atomic (id int PRIMARY KEY, v int)")
    await db.fetchval("TRUNCATE tl_test_atomic")
    await db.fetchval("INSERT INTO tl_test_atomic VALUES (1, 0)")
    marker = "tl_atomic_" + uuid.uuid4().hex[:8]
    async with db.transaction() as holder:
        await holder.execute("SELECT v FROM tl_test_atomic WHERE id = 1 FOR UPDATE")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_when_blocked() -> None:
                    with trio.fail_after(10):
                        while not await db.fetchval(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND query LIKE $1",
                            f"%{marker}%",
                        ):
                            await trio.sleep(0.01)
                    scope.cancel()

                nursery.start_soon(cancel_when_blocked)
                await db.atomic.execute(
                    f"UPDATE tl_test_atomic SET v = v + 1 WHERE id = 1 /* {marker} */"
                )
        assert scope.cancelled_caught
    # The lock is free now; wait until the cancelled statement's backend has gone.
    with trio.fail_after(10):
        while await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()"
            " AND query NOT LIKE '%pg_stat_activity%'",
            f"%{marker}%",
        ):
            await trio.sleep(0.01)
    assert await db.fetchval("SELECT v FROM tl_test_atomic WHERE id = 1") == 0


async def test_queries_leave_no_long_timers_behind(db: Database) -> None:
    """asyncpg arms asyncio timers (idle connection, statement expiry: 300 s each), and a loop
    keeps even cancelled ones, with the contextvars of the task that armed them, until they fall
    due. None may outlive the command timeout (found by loadtests/ws_fuzz.py as ~35 KB held per
    WebSocket for 5 min under trio-asyncio). Read on the loop asyncpg actually runs on.
    """
    for _ in range(5):
        await db.fetchval("SELECT $1::int", 1)
    async with db.transaction() as tx:
        await tx.fetchval("SELECT 1")

    async def far_timers() -> list[object]:  # read in the loop asyncpg runs on, in its thread
        loop = asyncio.get_running_loop()
        return [t for t in loop._scheduled if t.when() - loop.time() > 60]  # type: ignore[attr-defined]

    assert await aio(far_timers)() == []


async def test_the_bridge_waits_for_asyncio_cleanup_before_trio_sees_the_cancel() -> None:
    """A cancelled caller resumes only once the asyncio side has finished its cleanup, and
    results and errors cross the bridge unchanged."""
    cleaned: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that itself waits on the asyncio loop
            cleaned.append("done")
            raise

    async def fail() -> None:
        raise ValueError("from asyncio")

    async def value(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    with trio.move_on_after(0.05) as scope:
        await aio(slow)()
    assert scope.cancelled_caught
    assert cleaned == ["done"]
    with pytest.raises(ValueError, match="from asyncio"):
        await aio(fail)()
    assert await aio(value)(21) == 42


async def test_a_transaction_of_k_statements_takes_k_plus_one_trips(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Borrowing and BEGIN ride with the first statement, COMMIT with the release: each trip
    through the bridge is a hand-over between two threads, the main latency of a statement under
    load. A block that runs no statement borrows nothing."""
    from server.db import AsyncioThread

    trips = 0
    bridge = AsyncioThread.get()
    inner = bridge.run

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal trips
        trips += 1
        return await inner(fn, *args, **kwargs)

    monkeypatch.setattr(bridge, "run", counted)
    for k in (1, 3):
        trips = 0
        async with db.transaction(actor_id=str(uuid.uuid4())) as tx:
            for n in range(k):
                assert await tx.fetchval("SELECT $1::int", n) == n
            assert await tx.fetchval("SELECT current_setting('threadline.actor_id')") is not None
        assert trips == k + 2  # k statements + the actor check + COMMIT-and-release
    trips = 0
    before = db.stats()
    async with db.transaction():
        pass
    assert trips == 0 and db.stats() == before


async def test_a_failed_first_statement_leaves_no_transaction_behind(db: Database) -> None:
    """The first trip is all or nothing: its statement failing rolls the transaction back and
    returns the connection before the error reaches the caller; the pool stays healthy."""
    before = db.stats()
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with db.transaction() as tx:
            await tx.fetchval("SELECT 1 / 0")
    assert db.stats().in_use == 0 and db.stats().size == before.size
    with pytest.raises(Unavailable):
        async with db.transaction(timeout=0.1) as tx:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(db.stats().max):
                    await stack.enter_async_context(db.connection())
                await tx.fetchval("SELECT 1")  # no connection left within the timeout
    async with db.transaction() as tx:
        assert await tx.fetchval("SELECT 2") == 2
    async with db.connection() as conn:
        assert not conn.is_in_transaction()


async def test_commit_with_runs_the_last_statement_and_commit_in_one_trip(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``commit_with``: the last statement, COMMIT and the release take one trip; its hook sees
    the statement's result before the COMMIT has returned; the transaction is over after it (a
    further statement is refused rather than silently opening another transaction)."""
    from server.db import AsyncioThread

    trips = 0
    bridge = AsyncioThread.get()
    inner = bridge.run

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal trips
        trips += 1
        return await inner(fn, *args, **kwargs)

    monkeypatch.setattr(bridge, "run", counted)
    table = "tl_test_commit_with_" + uuid.uuid4().hex[:10]
    await db.fetchval(f"CREATE TABLE {table} (v int)")
    trips = 0
    seen: list[int] = []
    async with db.transaction() as tx:
        await tx.execute(f"INSERT INTO {table} VALUES (1)")
        value = await tx.commit_with(
            "fetchval",
            f"INSERT INTO {table} VALUES (2) RETURNING v",
            before_commit=seen.append,
        )
        assert value == 2 and seen == [2]
        with pytest.raises(RuntimeError, match="already been committed"):
            await tx.fetchval("SELECT 1")
    assert trips == 2  # BEGIN + the first statement; the last + COMMIT + release
    assert db.stats().in_use == 0
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2
    await db.fetchval(f"DROP TABLE {table}")
