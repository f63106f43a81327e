"""The reply start: the provider's request goes out while the start transaction commits."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import trio

from server.db import Database
from server.events import ThreadEvent
from server.llm.fake_server import FakeLLM
from server.runtime import RunningServer
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


async def test_the_provider_is_called_while_the_start_commits(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """With a COMMIT that takes 0.6 s, the provider has already sent its first token when the
    reply's ``message.created`` is published (the request went out before the commit), and
    still nothing of the reply reaches subscribers before its commit: ``message.created``, then
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
    assert first_token < created_at - 0.3  # answered during the commit, not after it
    deltas = [e for _, e in events if e.type == "assistant.delta"]
    assert "".join(d.data["text"] for d in deltas) == events[-1][1].data["content"]
    assert [d.data["index"] for d in deltas] == list(range(len(deltas)))


async def test_a_start_whose_commit_fails_cancels_its_provider_call(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """The request sent before the COMMIT is abandoned when the COMMIT fails: nothing of the
    reply is published or stored, and the thread's next reply runs normally."""
    db = llm_server.services.db
    fake_llm.configure(tokens=5, first_token_delay_ms=2000)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, ["doomed"])
    assistant = llm_server.services.assistant
    assert assistant is not None
    async with commit_hook(
        db, seeded.thread_id, "PERFORM pg_sleep(0.5); RAISE EXCEPTION 'commit refused'"
    ):
        started = fake_llm.request_started
        assistant.start_reply(request_for(seeded))
        with trio.fail_after(10):
            await started.wait()  # the request went out before the COMMIT failed
            reply = assistant._active[seeded.thread_id]  # type: ignore[attr-defined]
            await reply.done.wait()  # the reply given up, its provider call cancelled
    assert seeded.thread_id not in assistant._queues  # type: ignore[attr-defined]
    assert tap.of(seeded.thread_id) == []
    assert fake_llm.stats.completed == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM messages WHERE thread_id = $1 AND role = 'assistant'",
            seeded.thread_id,
        )
        == 0
    )
    fake_llm.configure(first_token_delay_ms=0)
    assistant.start_reply(request_for(seeded))
    await tap.wait_for_type(seeded.thread_id, "assistant.completed")
    assert [e.type for _, e in tap.of(seeded.thread_id)][:2] == [
        "message.created",
        "assistant.started",
    ]
