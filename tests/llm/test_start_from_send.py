"""A reply asked for by a send starts from what the send read (migration 0013): the send's
statement returns the prompt's history, and the start is one statement (``tl_start_reply``) and
its COMMIT, in one trip, before the provider's request goes out."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

import trio

from server.commands.bus import execute
from server.commands.models import SendMessage
from server.db import Database
from server.events import ThreadEvent
from server.llm.fake_server import FakeLLM
from server.principal import Principal
from server.runtime import RunningServer
from server.services import ReplyHistory, ReplyRequest
from server.storage import assistant as store
from server.storage import messages
from tests.llm.conftest import Seeded, add_message, seed_thread
from tests.llm.test_reply_start import TimedTap, commit_hook


async def _send(db: Database, seeded: Seeded, text: str, *, history: int | None = 400) -> Any:
    return await messages.send(
        db.atomic,
        author_id=seeded.user_id,
        thread_id=seeded.thread_id,
        content=text,
        client_msg_id=None,
        reply=True,
        history=history,
    )


async def _summarise(db: Database, seeded: Seeded, upto: int, text: str) -> None:
    await db.fetchval(
        "INSERT INTO summaries (thread_id, start_message_id, end_message_id, start_seq, end_seq,"
        " content, model) VALUES ($1, $2, $3, 1, $4, $5, 'm')",
        seeded.thread_id,
        seeded.message_ids[0],
        seeded.message_ids[upto - 1],
        upto,
        text,
    )


async def _start(db: Database, seeded: Seeded, seq: int, reply_to: str, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "model": "fake-gpt",
        "reserve_usd": Decimal("0.25"),
        "claimed_by": None,
        "refuse": None,
        "refuse_text": None,
        "budget_text": "over budget",
    }
    values.update(kw)
    return await store.start_reply(
        db.atomic,
        thread_id=seeded.thread_id,
        project_id=seeded.project_id,
        seq=seq,
        reply_to=reply_to,
        **values,
    )


async def test_a_send_asking_for_a_reply_reads_what_lock_for_reply_reads(db: Database) -> None:
    seeded = await seed_thread(
        db, ["one", "two", "three", "four"], roles=["user", "assistant", "user", "assistant"]
    )
    await _summarise(db, seeded, 2, "the first two")
    await db.fetchval(  # a deleted message is no turn
        "UPDATE messages SET deleted_at = now(), content = '', version = 2 WHERE id = $1",
        seeded.message_ids[2],
    )
    row = await _send(db, seeded, "five")
    assert row["outcome"] == "created" and row["seq"] == 5
    async with db.transaction() as tx:
        base = await store.lock_for_reply(
            tx, seeded.thread_id, seeded.project_id, json.loads(row["message"])["id"]
        )
    assert base is not None and int(base["seq"]) == row["seq"] + 1
    assert row["summary"] == base["summary"] == "the first two"
    assert row["turns"] == base["turns"] == [["user", "five"], ["assistant", "four"]]
    # Limited like lock_for_reply; nothing read without a reply or without ``history``.
    assert (await _send(db, seeded, "six", history=1))["turns"] == [["user", "six"]]
    plain = await _send(db, seeded, "seven", history=None)
    assert plain["outcome"] == "created" and plain["turns"] is None and plain["summary"] is None
    quiet = await messages.send(
        db.atomic,
        author_id=seeded.user_id,
        thread_id=seeded.thread_id,
        content="eight",
        client_msg_id=None,
        reply=False,
        history=400,
    )
    assert quiet["outcome"] == "created" and quiet["turns"] is None


async def test_the_start_refuses_a_stale_history_a_busy_thread_and_strangers(
    db: Database,
) -> None:
    seeded = await seed_thread(db, ["question"])
    row = await _send(db, seeded, "answer me")
    asked = json.loads(row["message"])["id"]
    seq = int(row["seq"]) + 1
    other = await seed_thread(db, ["elsewhere"])

    async def assistant_count() -> int:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM messages WHERE thread_id = $1 AND role = 'assistant'",
                seeded.thread_id,
            )
        )

    # Not this project's thread: nothing written.
    stranger = await store.start_reply(
        db.atomic,
        thread_id=seeded.thread_id,
        project_id=other.project_id,
        seq=seq,
        reply_to=asked,
        model="fake-gpt",
        reserve_usd=Decimal("0.25"),
        claimed_by=None,
        refuse=None,
        refuse_text=None,
        budget_text="over budget",
    )
    assert stranger == ("not_found", None)
    # Something written in the thread since the send read it: stale, nothing written.
    seeded.message_ids.append(await add_message(db, seeded, "one more thing"))
    assert await _start(db, seeded, seq, asked) == ("stale", None)
    assert await assistant_count() == 0
    # The right seq: started (streaming, its event, its reservation).
    outcome, message = await _start(db, seeded, seq + 1, asked)
    assert outcome == "started" and message is not None
    started = json.loads(message)
    assert started["status"] == "streaming" and started["seq"] == seq + 1
    event = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = $2",
        seeded.thread_id,
        seq + 1,
    )
    assert event["type"] == "message.created" and event["payload"] == started
    reserved = await db.fetchval(
        "SELECT amount_usd FROM budget_reservations WHERE message_id = $1", started["id"]
    )
    assert reserved == Decimal("0.25")
    # A reply of the thread is streaming: busy, nothing written (the seq is right).
    assert await _start(db, seeded, seq + 2, asked) == ("busy", None)
    assert await assistant_count() == 1


async def test_the_start_checks_the_budget_under_the_project_row(db: Database) -> None:
    seeded = await seed_thread(db, ["question"], budget=Decimal("1"))
    row = await _send(db, seeded, "answer me")
    asked = json.loads(row["message"])["id"]
    outcome, message = await _start(db, seeded, int(row["seq"]) + 1, asked, reserve_usd=Decimal(2))
    assert outcome == "budget_exceeded" and message is not None
    refused = json.loads(message)
    assert refused["status"] == "failed"
    failed = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = $2",
        seeded.thread_id,
        int(row["seq"]) + 2,
    )
    assert failed["type"] == "assistant.failed" and failed["payload"]["reason"] == "budget_exceeded"
    reservations = "SELECT count(*) FROM budget_reservations WHERE project_id = $1"
    assert await db.fetchval(reservations, seeded.project_id) == 0


async def test_a_sent_message_s_reply_is_requested_once_its_start_has_committed(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """With a start COMMIT that takes 0.6 s, the provider's request arrives after it (the
    first token never waits for the start's COMMIT), and the reply is whole and in order."""
    services = llm_server.services
    db = services.db
    fake_llm.configure(tokens=5)
    tap = TimedTap(llm_server)
    committed_at: list[float] = []
    inner = services.publish

    def wall_clock_tap(event: ThreadEvent) -> None:
        if event.type == "message.created" and event.data.get("role") == "assistant":
            committed_at.append(time.time())
        inner(event)

    services.publish = wall_clock_tap
    seeded = await seed_thread(db, ["earlier"])
    principal = Principal(
        user_id=seeded.user_id,
        email="x@example.test",
        jti=uuid.uuid4().hex,
        expires_at=1e12,
        via="bearer",
    )
    async with commit_hook(db, seeded.thread_id, "PERFORM pg_sleep(0.6)"):
        await execute(
            services, principal, SendMessage(thread_id=seeded.thread_id, content="ask me later")
        )
        await tap.wait_for_type(seeded.thread_id, "assistant.completed")
    assert committed_at
    assert fake_llm.request_at_unix["ask me later"] >= committed_at[0]
    types = [e.type for _, e in tap.of(seeded.thread_id)]
    assert types[:3] == ["message.created", "message.created", "assistant.started"]
    assert types[-1] == "assistant.completed"
    prompt = [m["content"] for m in fake_llm.stats.last_messages]
    assert prompt[-2:] == ["earlier", "ask me later"]


async def test_a_stale_history_is_read_again(llm_server: RunningServer, fake_llm: FakeLLM) -> None:
    """A message written between the send and its reply's start: the start reads the thread
    again, and the reply answers (and follows) that message too."""
    db = llm_server.services.db
    fake_llm.configure(tokens=3)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, ["earlier"])
    row = await _send(db, seeded, "first ask")
    seeded.message_ids.append(json.loads(row["message"])["id"])
    await add_message(db, seeded, "and a second thought")
    request = ReplyRequest(
        thread_id=seeded.thread_id,
        project_id=seeded.project_id,
        user_message_id=seeded.message_ids[-1],
        requested_by=seeded.user_id,
        history=ReplyHistory(
            seq=int(row["seq"]) + 1,
            asked="first ask",
            summary=row["summary"],
            turns=[(role, content) for role, content in row["turns"]],
        ),
    )
    assert llm_server.services.assistant is not None
    llm_server.services.assistant.start_reply(request)
    await tap.wait_for_type(seeded.thread_id, "assistant.completed")
    created = [e for _, e in tap.of(seeded.thread_id) if e.type == "message.created"]
    assert [e.seq for e in created] == [int(row["seq"]) + 2]
    prompt = [m["content"] for m in fake_llm.stats.last_messages]
    assert prompt[-3:] == ["earlier", "first ask", "and a second thought"]


async def test_a_request_queued_behind_a_reply_keeps_no_history(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """The history read by a send whose reply must wait is dropped (it will be stale, and up to
    400 turns would be held per queued request): the reply reads the thread when it starts."""
    db = llm_server.services.db
    assistant = llm_server.services.assistant
    assert assistant is not None
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, ["earlier"])

    def request(row: Any) -> ReplyRequest:
        return ReplyRequest(
            thread_id=seeded.thread_id,
            project_id=seeded.project_id,
            user_message_id=json.loads(row["message"])["id"],
            requested_by=seeded.user_id,
            history=ReplyHistory(
                seq=int(row["seq"]) + 1,
                asked="x",
                summary=row["summary"],
                turns=[(role, content) for role, content in row["turns"]],
            ),
        )

    fake_llm.configure(tokens=3, hang=True)
    started = fake_llm.request_started
    assistant.start_reply(request(await _send(db, seeded, "first")))
    second = await _send(db, seeded, "second")
    await started.wait()
    assistant.start_reply(request(second))
    queue = assistant._queues[seeded.thread_id]  # type: ignore[attr-defined]
    assert [r.history is None for r in queue] == [False, True]
    fake_llm.configure(hang=False)
    with trio.fail_after(15):
        while len([e for _, e in tap.of(seeded.thread_id) if e.type == "assistant.completed"]) < 2:
            await tap.changed.wait()
    prompt = [m["content"] for m in fake_llm.stats.last_messages]
    assert "second" in prompt
