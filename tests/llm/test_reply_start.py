"""The reply start: the provider's request goes out while the start transaction commits."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import psycopg
import trio
import trio.testing

from server.db import Database
from server.events import ThreadEvent
from server.llm.fake_server import FakeLLM
from server.runtime import RunningServer
from server.storage import assistant as store
from tests.llm.conftest import request_for, seed_thread


@contextlib.asynccontextmanager
async def commit_hook(db: Database, thread_id: str, body: str) -> AsyncIterator[None]:
    """Run ``body`` (plpgsql) at the COMMIT of any transaction that inserts an assistant message
    into ``thread_id`` (a deferred constraint trigger, on this thread only)."""
    name = "tl_test_commit_" + uuid.uuid4().hex[:10]
    await db.fetchval(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN {body}; RETURN NULL; END $$"
    )
    await db.fetchval(
        f"CREATE CONSTRAINT TRIGGER {name} AFTER INSERT ON messages"
        f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
        f" WHEN (NEW.thread_id = '{uuid.UUID(thread_id)}'::uuid AND NEW.role = 'assistant')"
        f" EXECUTE FUNCTION {name}()"
    )
    try:
        yield
    finally:
        await db.fetchval(f"DROP TRIGGER {name} ON messages")
        await db.fetchval(f"DROP FUNCTION {name}()")


class TimedTap:
    """What the assistant publishes, with trio.current_time() of each publish."""

    def __init__(self, running: RunningServer) -> None:
        self.events: list[tuple[float, ThreadEvent]] = []
        self.changed = trio.Event()
        inner = running.services.publish

        def tap(event: ThreadEvent) -> None:
            self.events.append((trio.current_time(), event))
            self.changed.set()
            self.changed = trio.Event()
            inner(event)

        running.services.publish = tap

    def of(self, thread_id: str) -> list[tuple[float, ThreadEvent]]:
        return [(t, e) for t, e in self.events if e.thread_id == thread_id]

    async def wait_for_type(self, thread_id: str, *types: str) -> None:
        with trio.fail_after(15):
            while not any(e.type in types for _, e in self.of(thread_id)):
                await self.changed.wait()


async def test_the_provider_is_called_only_after_the_start_commits(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """A start that reads the thread afresh (no history from its send): with a COMMIT that
    takes 0.6 s, the provider is called only once it is in (its first token comes after the
    reply's ``message.created`` is published), and subscribers see ``message.created``, then
    ``assistant.started``, then the deltas, whole."""
    db = llm_server.services.db
    fake_llm.configure(tokens=5)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, ["slow commit please"])
    assert llm_server.services.assistant is not None
    async with commit_hook(db, seeded.thread_id, "PERFORM pg_sleep(0.6)"):
        llm_server.services.assistant.start_reply(request_for(seeded))
        await tap.wait_for_type(seeded.thread_id, "assistant.completed")
    events = tap.of(seeded.thread_id)
    types = [e.type for _, e in events]
    assert types[:2] == ["message.created", "assistant.started"]
    assert types[-1] == "assistant.completed"
    assert set(types[2:-1]) == {"assistant.delta"}
    created_at = events[0][0]
    first_token = fake_llm.first_token_at["slow commit please"]
    assert first_token > created_at  # requested after the commit, not during it
    deltas = [e for _, e in events if e.type == "assistant.delta"]
    assert "".join(d.data["text"] for d in deltas) == events[-1][1].data["content"]
    assert [d.data["index"] for d in deltas] == list(range(len(deltas)))


async def test_a_start_whose_commit_fails_never_calls_the_provider(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """No prompt is sent (and billed) for a reply that was not recorded: a start whose COMMIT
    fails calls no provider, publishes and stores nothing, and the thread's next reply runs
    normally."""
    db = llm_server.services.db
    fake_llm.configure(tokens=5)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, ["doomed"])
    assistant = llm_server.services.assistant
    assert assistant is not None
    requests_before = fake_llm.stats.requests
    async with commit_hook(
        db, seeded.thread_id, "PERFORM pg_sleep(0.5); RAISE EXCEPTION 'commit refused'"
    ):
        assistant.start_reply(request_for(seeded))
        queues = assistant._queues  # type: ignore[attr-defined]
        with trio.fail_after(10):
            while seeded.thread_id in queues:  # until its worker has given the reply up
                reply = assistant._active.get(seeded.thread_id)  # type: ignore[attr-defined]
                if reply is not None:
                    await reply.done.wait()
                else:  # not started yet: wait for the tasks that start it to settle
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    assert fake_llm.stats.requests == requests_before
    assert seeded.thread_id not in assistant._queues  # type: ignore[attr-defined]
    assert tap.of(seeded.thread_id) == []
    assert (
        await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1 AND role = 'assistant'",
            seeded.thread_id,
        )
        == 0
    )
    assistant.start_reply(request_for(seeded))
    await tap.wait_for_type(seeded.thread_id, "assistant.completed")
    assert [e.type for _, e in tap.of(seeded.thread_id)][:2] == [
        "message.created",
        "assistant.started",
    ]
    assert fake_llm.stats.requests == requests_before + 1


async def test_a_budgeted_start_frees_the_project_row_without_the_event_loop(
    db: Database, pg_dsn: str
) -> None:
    """The budget check, the reply's insert and the COMMIT run back to back on the database's
    side of the bridge: the project row is released even while this event loop is busy (here:
    blocked for 2 s right after the statement answered), so the next reply of the project
    waits for one statement and a COMMIT, not for this server's scheduling."""
    seeded = await seed_thread(db, ["budgeted question"], budget=Decimal("100"))
    waited: list[float] = []

    def take_the_project_row() -> None:
        with psycopg.connect(pg_dsn) as conn:
            conn.execute("SET lock_timeout = '4s'")
            started = time.monotonic()
            try:
                conn.execute(
                    "SELECT 1 FROM projects WHERE id = %s FOR UPDATE", (seeded.project_id,)
                )
            except psycopg.errors.LockNotAvailable:
                waited.append(float("inf"))  # held until this event loop ran again
                return
            waited.append(time.monotonic() - started)

    def busy_event_loop(result: tuple[str, str]) -> None:
        assert result[0] == "started"
        prober = threading.Thread(target=take_the_project_row)
        prober.start()
        time.sleep(2.0)  # this thread (trio's) is blocked; the COMMIT must not need it
        prober.join()

    async with db.transaction() as tx:
        base = await store.lock_for_reply(
            tx, seeded.thread_id, seeded.project_id, seeded.message_ids[-1]
        )
        assert base is not None
        outcome, _ = await store.insert_reply_and_commit(
            tx,
            thread_id=seeded.thread_id,
            project_id=seeded.project_id,
            seq=int(base["seq"]),
            reply_to=seeded.message_ids[-1],
            model="fake-gpt",
            reserve_usd=Decimal("0.5"),
            claimed_by=None,
            refuse=None,
            refuse_text=None,
            budget_text="over budget",
            before_commit=busy_event_loop,
        )
    assert outcome == "started"
    assert waited and waited[0] < 1.0, waited
    reserved = await db.fetchval(
        "SELECT sum(amount_usd) FROM budget_reservations WHERE project_id = $1", seeded.project_id
    )
    assert reserved == Decimal("0.5")
