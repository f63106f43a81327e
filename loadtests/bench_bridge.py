"""How trio should reach asyncpg: the bridges measured side by side in one process and run.

For each bridge, ``--tasks`` trio tasks each run ``--queries`` one-statement units of work
(borrow a pooled connection, ``SELECT $1::int``, return it) and the process's CPU time per unit
and units/s are printed. PostgreSQL is embedded in a temporary directory (or
``THREADLINE_TEST_DATABASE_URL``). The bridges:

* ``trio-asyncio, per call``: ``aio_as_trio`` around acquire, fetchval and release (three
  hand-overs: what ``Database.transaction`` / ``statements`` do per statement);
* ``trio-asyncio, one trip``: one ``aio_as_trio`` around a coroutine doing all three (what
  ``Database.one`` does);
* ``asyncio thread, one trip``: asyncpg on its own asyncio loop in a dedicated thread, one
  hand-over per unit of work (``run_coroutine_threadsafe``, the answer back through trio's token).

    .venv/bin/python loadtests/bench_bridge.py --tasks 20 --queries 300
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import outcome
import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import database

SQL = "SELECT $1::int"


async def unit(pool: asyncpg.Pool, n: int) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval(SQL, n))


class ThreadLoop:
    """An asyncio loop in a thread of its own; ``run(fn, *args)`` awaits ``fn(*args)`` on it."""

    def __init__(self) -> None:
        ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop

        def run() -> None:  # the loop is made in its thread: trio-asyncio refuses one in trio's
            self.loop = asyncio.SelectorEventLoop()
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait()

    async def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        future = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)

        def done(f: Any) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(f.result))

        future.add_done_callback(done)

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            self.loop.call_soon_threadsafe(future.cancel)
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


async def drive(name: str, call: Callable[[int], Awaitable[int]], args: argparse.Namespace) -> None:
    async def worker() -> None:
        for i in range(args.queries):
            assert await call(i) == i

    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.tasks):
            nursery.start_soon(worker)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = args.tasks * args.queries
    print(f"{name:28s} {cpu / n * 1e6:8.1f} us CPU/unit {n / wall:9.0f} units/s", flush=True)


async def main(dsn: str, args: argparse.Namespace) -> None:
    async with trio_asyncio.open_loop():
        pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(dsn, min_size=10, max_size=10)
        aio = trio_asyncio.aio_as_trio

        async def per_call(n: int) -> int:
            conn = await aio(pool.acquire)()
            try:
                return int(await aio(conn.fetchval)(SQL, n))
            finally:
                await aio(pool.release)(conn)

        async def one_trip(n: int) -> int:
            return int(await aio(unit)(pool, n))

        thread = ThreadLoop()

        async def make_pool() -> asyncpg.Pool:
            return await asyncpg.create_pool(dsn, min_size=10, max_size=10)

        tpool = await thread.run(make_pool)

        async def threaded(n: int) -> int:
            return int(await thread.run(unit, tpool, n))

        for _ in range(args.rounds):
            await drive("trio-asyncio, per call", per_call, args)
            await drive("trio-asyncio, one trip", one_trip, args)
            await drive("asyncio thread, one trip", threaded, args)
        await thread.run(tpool.close)
        thread.close()
        await aio(pool.close)()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with database() as dsn:
        trio.run(main, dsn, args)
