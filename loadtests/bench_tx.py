"""A transaction's trips through the trio -> asyncpg bridge: the ways side by side, one run.

``--tasks`` trio tasks each run ``--transactions`` transactions of ``k`` statements
(``SELECT $1::int``) on one ``server.db.Database`` (embedded PostgreSQL in a temporary directory,
or ``THREADLINE_TEST_DATABASE_URL``); the process's CPU time per transaction and transactions/s
are printed for each way, the ways alternating for ``--rounds`` rounds:

* ``per step``: what ``Database.transaction()`` did before: borrow, BEGIN, each statement,
  COMMIT, return the connection, one trip each (k + 4 trips);
* ``transaction()``: borrowing and BEGIN ride with the first statement, COMMIT with the release
  (k + 1 trips);
* ``commit_with``: the same, the last statement sent with COMMIT and the release (k trips: the
  reply start's shape, ``tl_insert_reply``).

    .venv/bin/python loadtests/bench_tx.py --tasks 20 --transactions 200 --statements 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import database
from server.db import Database, aio

SQL = "SELECT $1::int"


async def drive(name: str, run: Callable[[int], Awaitable[None]], args: argparse.Namespace) -> None:
    async def worker() -> None:
        for i in range(args.transactions):
            await run(i)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.tasks):
            nursery.start_soon(worker)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = args.tasks * args.transactions
    print(f"{name:16s} {cpu / n * 1e6:8.1f} us CPU/transaction {n / wall:8.0f} transactions/s")


async def main(dsn: str, args: argparse.Namespace) -> None:
    k = args.statements
    async with Database.connect(dsn, min_size=10, max_size=10) as db:

        async def per_step(n: int) -> None:
            async with db.connection() as conn:
                tr = conn.transaction()
                await aio(tr.start)()
                for _ in range(k):
                    assert await aio(conn.fetchval)(SQL, n) == n
                await aio(tr.commit)()

        async def transaction(n: int) -> None:
            async with db.transaction() as tx:
                for _ in range(k):
                    assert await tx.fetchval(SQL, n) == n

        async def commit_with(n: int) -> None:
            async with db.transaction() as tx:
                for _ in range(k - 1):
                    assert await tx.fetchval(SQL, n) == n
                assert await tx.commit_with("fetchval", SQL, n) == n

        print(f"{args.tasks} tasks, {k} statements per transaction", flush=True)
        for _ in range(args.rounds):
            await drive("per step", per_step, args)
            await drive("transaction()", transaction, args)
            await drive("commit_with", commit_with, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--transactions", type=int, default=200)
    parser.add_argument("--statements", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with database() as dsn:
        trio.run(main, dsn, args)
