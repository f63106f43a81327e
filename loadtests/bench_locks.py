"""Edits contending for one thread's row: several statements per edit against one, side by side.

``--tasks`` trio tasks each edit a message of their own, all in one thread (so every edit takes
the same thread row lock), while ``--senders`` tasks send to that thread (``tl_send_message``, as
the server does): the edits' and the sends' latencies show how long the row is held. Two ways,
alternating for ``--rounds`` rounds, on one ``server.db.Database`` (embedded PostgreSQL in a
temporary directory, or ``THREADLINE_TEST_DATABASE_URL``):

* ``statements``: the edit before migration 0012: one transaction (actor set with BEGIN) of
  find the thread, lock it, lock the message and read its version, update, append the event:
  a trip through the bridge each, the row held from the second to the COMMIT;
* ``one statement``: ``tl_change_message`` on ``Database.atomic``, one trip, the row held only
  inside the database.

``--busy-ms`` blocks trio's thread that long every millisecond or so (a task doing CPU work, as a
server busy with other requests is): the held row then waits for this event loop in the first
way, not in the second.

    .venv/bin/python loadtests/bench_locks.py --tasks 8 --senders 4 --seconds 5 --busy-ms 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import database
from server.db import Database
from server.storage import messages, threads

Edit = Callable[[str, str, int, str], Awaitable[None]]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def setup(db: Database, tasks: int) -> tuple[str, str, list[str]]:
    user = str(
        await db.fetchval(
            "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id",
            f"bench-{uuid.uuid4().hex[:10]}@example.test",
        )
    )
    project = await db.fetchval(
        "INSERT INTO projects (owner_id, name) VALUES ($1, 'bench') RETURNING id", user
    )
    thread = str(
        await db.fetchval(
            "INSERT INTO threads (project_id, title) VALUES ($1, 't') RETURNING id", project
        )
    )
    ids = []
    for n in range(tasks):
        row = await messages.send(
            db.atomic,
            author_id=user,
            thread_id=thread,
            content=f"m{n}",
            client_msg_id=None,
            reply=False,
        )
        ids.append(str(json.loads(row["message"])["id"]))
    return user, thread, ids


async def main(dsn: str, args: argparse.Namespace) -> None:
    async with Database.connect(dsn, min_size=10, max_size=20) as db:

        async def statements(user: str, mid: str, version: int, content: str) -> None:
            async with db.transaction(actor_id=user) as tx:
                thread_id = await tx.fetchval(
                    """SELECT m.thread_id FROM messages m
                         JOIN threads t ON t.id = m.thread_id JOIN projects p ON p.id = t.project_id
                        WHERE m.id = $1 AND p.owner_id = $2""",
                    mid,
                    user,
                )
                seq = await threads.lock_next_seq(tx, str(thread_id))
                row = await tx.fetchrow(
                    f"""SELECT {messages.COLUMNS} FROM messages m
                          JOIN threads t ON t.id = m.thread_id
                          JOIN projects p ON p.id = t.project_id
                         WHERE m.id = $1 AND p.owner_id = $2 FOR UPDATE OF m""",
                    mid,
                    user,
                )
                assert row is not None and row["version"] == version
                updated = await tx.fetchrow(
                    f"""WITH m AS (UPDATE messages SET content = $2, version = $3 + 1
                                    WHERE id = $1 AND version = $3 RETURNING *)
                        SELECT {messages.COLUMNS} FROM m""",
                    mid,
                    content,
                    version,
                )
                assert updated is not None
                await threads.append_event(
                    tx, str(thread_id), seq, "message.updated", {"id": mid, "content": content}
                )

        async def one_statement(user: str, mid: str, version: int, content: str) -> None:
            row = await messages.change(
                db.atomic, actor_id=user, message_id=mid, expected_version=version, content=content
            )
            assert row["outcome"] == "edited", row["outcome"]

        async def measure(name: str, edit: Edit) -> None:
            user, thread, ids = await setup(db, args.tasks)
            edits: list[float] = []
            sends: list[float] = []
            deadline = trio.current_time() + args.seconds

            async def editor(mid: str) -> None:
                version = 1
                while trio.current_time() < deadline:
                    t0 = time.perf_counter()
                    await edit(user, mid, version, f"v{version}")
                    edits.append(time.perf_counter() - t0)
                    version += 1

            async def sender() -> None:
                while trio.current_time() < deadline:
                    t0 = time.perf_counter()
                    await messages.send(
                        db.atomic,
                        author_id=user,
                        thread_id=thread,
                        content="s",
                        client_msg_id=None,
                        reply=False,
                    )
                    sends.append(time.perf_counter() - t0)

            async def busy() -> None:
                while trio.current_time() < deadline:
                    time.sleep(args.busy_ms / 1000)  # CPU work of other requests
                    await trio.sleep(0.001)

            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for mid in ids:
                    nursery.start_soon(editor, mid)
                for _ in range(args.senders):
                    nursery.start_soon(sender)
                if args.busy_ms > 0:
                    nursery.start_soon(busy)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            gaps = await db.fetchval(
                "SELECT count(*) FILTER (WHERE seq <> rn) FROM"
                " (SELECT seq, row_number() OVER (ORDER BY seq) AS rn FROM thread_events"
                "   WHERE thread_id = $1) s",
                thread,
            )
            assert gaps == 0
            print(
                f"{name:14s} edits {len(edits) / wall:7.0f}/s p50 {pct(edits, 0.5) * 1e3:6.1f}"
                f" p99 {pct(edits, 0.99) * 1e3:6.1f} ms | sends {len(sends) / wall:7.0f}/s"
                f" p50 {pct(sends, 0.5) * 1e3:6.1f} p99 {pct(sends, 0.99) * 1e3:6.1f} ms"
                f" | CPU/op {cpu / max(1, len(edits) + len(sends)) * 1e6:6.0f} us"
                f" (mean edit {statistics.fmean(edits) * 1e3:.1f} ms)",
                flush=True,
            )

        print(
            f"{args.tasks} editors + {args.senders} senders on one thread, {args.seconds} s per"
            f" way, trio's thread busy {args.busy_ms} ms per ms",
            flush=True,
        )
        for _ in range(args.rounds):
            await measure("statements", statements)
            await measure("one statement", one_statement)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="editors (one message each)")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--busy-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with database() as dsn:
        trio.run(main, dsn, args)
