"""A reply's end (``tl_finish_reply``, migration 0012) is one statement, one trip through the
database bridge, and holds its thread's row only inside it, whichever way the reply ends."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import structlog

from server.db import Database
from server.llm.fake_server import FakeLLM
from server.llm.generation import AssistantService
from server.runtime import RunningServer
from server.storage import assistant as store
from tests.llm.conftest import EventTap, add_message, request_for, seed_thread
from tests.lockprobe import trip_probe


async def test_a_reply_ends_in_one_trip_holding_the_thread_only_inside_it(
    llm_server: RunningServer, fake_llm: FakeLLM, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the soak, sends waited on thread rows held by replies' ends idle between their
    statements (lock, message update, usage row, event, COMMIT: a trip each). Now a completed
    and a cancelled reply each end in one trip, after which the row is free."""
    assistant = llm_server.services.assistant
    assert isinstance(assistant, AssistantService)
    assistant.save_interval_s = 3600.0  # no progress saves: the reply's trips are its end's
    tap = EventTap(llm_server)
    seeded = await seed_thread(llm_server.services.db, ["end me"])
    t = seeded.thread_id

    def in_the_reply() -> bool:
        # After the start, the reply's task has its message id bound (see ``_generate``).
        bound = structlog.contextvars.get_contextvars()
        return bound.get("thread_id") == t and "message_id" in bound

    with trip_probe(pg_dsn, monkeypatch, in_the_reply) as probe:
        probe.reset(t)
        fake_llm.configure(tokens=5)
        assistant.start_reply(request_for(seeded))
        await tap.wait_for(lambda: bool(tap.of(t, "assistant.completed")))
        assert (probe.trips, probe.locked_after) == (1, [False])

        seeded.message_ids.append(await add_message(llm_server.services.db, seeded, "and on"))
        probe.reset(t)
        fake_llm.configure(tokens=1000, delay_per_token_ms=10)
        assistant.start_reply(request_for(seeded))
        await tap.wait_for(lambda: len(tap.of(t, "assistant.delta")) >= 8)
        assert await assistant.cancel(t)
        await tap.wait_for(lambda: len(tap.of(t, "assistant.completed")) == 2)
        assert (probe.trips, probe.locked_after) == (1, [False])
    completed, cancelled = tap.of(t, "assistant.completed")
    assert cancelled.data["cancelled"] is True and cancelled.seq == completed.seq + 3
    usage = await llm_server.services.db.fetchval(
        "SELECT count(*) FROM usage_records WHERE thread_id = $1", t
    )
    assert usage == 2


async def test_the_end_written_by_one_statement(db: Database) -> None:
    """The closing event, the usage row and the reservation released, as before; a reply ended
    meanwhile by another node gets only its usage row (no second closing event); a reply the
    user deleted keeps its tombstone; no thread, nothing written (``LookupError``)."""
    seeded = await seed_thread(db, ["q"], budget=Decimal("10"))
    t = seeded.thread_id
    base = await db.fetchval("SELECT last_seq + 1 FROM threads WHERE id = $1", t)
    async with db.transaction() as tx:
        outcome, message = await store.insert_reply_and_commit(
            tx,
            thread_id=t,
            project_id=seeded.project_id,
            seq=base,
            reply_to=seeded.message_ids[0],
            model="fake-gpt",
            reserve_usd=Decimal("0.5"),
            claimed_by=None,
            refuse=None,
            refuse_text=None,
            budget_text="over",
        )
    assert outcome == "started"
    mid = json.loads(message)["id"]
    usage = store.UsageRow(
        prompt_tokens=3, completion_tokens=4, cost_usd=Decimal("0.01"), estimated=False
    )
    payload = {"message_id": mid, "content": "answer", "status": "completed", "usage": None}

    async def finish(
        content: str | None, thread: str = t, usage: store.UsageRow | None = usage
    ) -> tuple[int, str] | None:
        return await store.finish_reply(
            db.atomic,
            thread_id=thread,
            project_id=seeded.project_id,
            message_id=mid,
            status="completed",
            content=content,
            model="fake-gpt",
            event_type="assistant.completed",
            payload=payload,
            usage=usage,
        )

    await db.fetchval(
        "UPDATE messages SET content = '', version = 2, deleted_at = clock_timestamp()"
        " WHERE id = $1",
        mid,
    )  # deleted by its user while it streamed
    assert await finish("answer") == (base + 1, "")
    row = await db.fetchrow("SELECT status, content, deleted_at FROM messages WHERE id = $1", mid)
    assert row is not None and (row["status"], row["content"]) == ("completed", "")
    event = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = $2", t, base + 1
    )
    assert event is not None and (event["type"], event["payload"]) == (
        "assistant.completed",
        payload,
    )
    assert (
        await db.fetchval("SELECT count(*) FROM budget_reservations WHERE message_id = $1", mid)
        == 0
    )
    used = await db.fetchrow(
        "SELECT model, prompt_tokens, completion_tokens, cost_usd, estimated, project_id::text"
        " FROM usage_records WHERE message_id = $1",
        mid,
    )
    assert used is not None and tuple(used) == (
        "fake-gpt",
        3,
        4,
        Decimal("0.01"),
        False,
        seeded.project_id,
    )
    # Ended already (by another node): no second event, but the usage row, spent either way.
    await db.fetchval("DELETE FROM usage_records WHERE message_id = $1", mid)
    assert await finish("again") is None
    assert await db.fetchval("SELECT count(*) FROM usage_records WHERE message_id = $1", mid) == 1
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", t) == base + 1
    with pytest.raises(LookupError):
        await finish("x", thread="00000000-0000-0000-0000-000000000000", usage=None)
