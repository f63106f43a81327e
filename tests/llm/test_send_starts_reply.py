"""A send that asks for a reply starts it in the same statement (``tl_send_and_start``,
migration 0014): the turns that fit chosen in SQL from stored token counts exactly as
``build_prompt`` chooses them, the reservation, the budget under the project row, the assistant
message and its event, all in the send's transaction; a missing count falls back on the start
from the send's history."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from server.commands.bus import execute
from server.commands.models import EditMessage, SendMessage
from server.config import Settings
from server.db import Database
from server.llm import pricing
from server.llm.fake_server import FakeLLM
from server.llm.prompt import Turn, build_prompt, message_tokens, prompt_costs
from server.principal import Principal
from server.runtime import RunningServer
from server.services import ReplyRequest, ReplyStart, StartedReply
from server.storage import assistant as store
from server.storage import messages
from tests.conftest import make_settings
from tests.llm.conftest import PRICES, Seeded, seed_thread
from tests.llm.test_reply_start import TimedTap


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path, llm_model="fake-gpt", llm_prices=PRICES, **overrides)


def _start(settings: Settings, content: str, **kw: Any) -> ReplyStart:
    costs = prompt_costs(settings)
    price = settings.price_for("fake-gpt")
    values: dict[str, Any] = {
        "tokens": message_tokens(settings, content),
        "start": True,
        "head_tokens": costs.head,
        "summary_overhead": costs.summary_overhead,
        "user_overhead": costs.user_overhead,
        "assistant_overhead": costs.assistant_overhead,
        "prompt_budget": costs.budget,
        "price_prompt": Decimal(str(price.prompt_per_1k)),
        "price_completion": Decimal(str(price.completion_per_1k)),
        "max_reply": settings.llm_max_reply_tokens,
        "model": "fake-gpt",
        "claimed_by": None,
        "refuse": None,
        "refuse_text": None,
        "budget_text": "over budget",
    }
    values.update(kw)
    return ReplyStart(**values)


async def _send(
    db: Database,
    settings: Settings,
    seeded: Seeded,
    text: str,
    *,
    client_msg_id: str | None = None,
    reply: bool = True,
    **kw: Any,
) -> Any:
    return await messages.send_and_start(
        db.atomic,
        author_id=seeded.user_id,
        thread_id=seeded.thread_id,
        content=text,
        client_msg_id=client_msg_id,
        reply=reply,
        history=store.HISTORY_LIMIT,
        start=_start(settings, text, **kw),
    )


async def _assistant_rows(db: Database, seeded: Seeded) -> list[Any]:
    return list(
        await db.fetch(
            "SELECT id, status, seq FROM messages WHERE thread_id = $1 AND role = 'assistant'"
            " ORDER BY seq",
            seeded.thread_id,
        )
    )


async def _reservations(db: Database, seeded: Seeded) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM budget_reservations WHERE project_id = $1", seeded.project_id
        )
    )


async def _thread_with_counts(db: Database, settings: Settings, texts: list[str]) -> Seeded:
    """A thread whose turns (alternately user and assistant) carry their token counts."""
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(texts))]
    seeded = await seed_thread(db, texts, roles=roles)
    for message_id, text in zip(seeded.message_ids, texts, strict=True):
        await db.fetchval(
            "UPDATE messages SET content_tokens = $2 WHERE id = $1",
            message_id,
            message_tokens(settings, text),
        )
    return seeded


async def test_a_send_starts_its_reply_in_its_own_statement(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    seeded = await _thread_with_counts(db, settings, ["hello there", "hi! how can I help?"])
    row = await _send(db, settings, seeded, "tell me a story")
    assert row["outcome"] == "created" and row["reply"] == "started"
    turns = [Turn(role, content) for role, content in row["turns"]]
    assert row["turns"] == [
        ["user", "tell me a story"],
        ["assistant", "hi! how can I help?"],
        ["user", "hello there"],
    ]
    prompt = build_prompt(settings, summary=None, turns=turns)
    assert row["prompt_tokens"] == prompt.tokens and row["whole"] is True
    estimate = pricing.reply_estimate_usd(settings, "fake-gpt", prompt.tokens)
    assert row["reserve"] == estimate
    message = json.loads(row["reply_message"])
    assert message["status"] == "streaming" and message["seq"] == row["seq"] + 1
    assert message["reply_to"] == json.loads(row["message"])["id"]
    event = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = $2",
        seeded.thread_id,
        row["seq"] + 1,
    )
    assert event["type"] == "message.created" and event["payload"] == message
    reserved = await db.fetchval(
        "SELECT amount_usd FROM budget_reservations WHERE message_id = $1", message["id"]
    )
    assert reserved == estimate
    stored = await db.fetchval(
        "SELECT content_tokens FROM messages WHERE id = $1", json.loads(row["message"])["id"]
    )
    assert stored == message_tokens(settings, "tell me a story")
    # A reply is streaming now: the next send is written, its reply not started (busy).
    busy = await _send(db, settings, seeded, "and another")
    assert busy["outcome"] == "created" and busy["reply"] == "busy"
    assert [r["status"] for r in await _assistant_rows(db, seeded)] == ["completed", "streaming"]


async def test_the_turns_chosen_are_build_prompt_s(db: Database, tmp_path: Path) -> None:
    """A small context: only the newest turns fit; SQL picks the same ones, the same count."""
    settings = _settings(tmp_path, llm_context_tokens=1200, llm_max_reply_tokens=1000)
    texts = [f"turn number {i} " + "words " * (5 + 7 * i) for i in range(12)]
    seeded = await _thread_with_counts(db, settings, texts)
    asked = "the question " * 9
    row = await _send(db, settings, seeded, asked)
    assert row["reply"] == "started" and row["whole"] is False
    everything = [Turn("user", asked)] + [
        Turn("user" if i % 2 == 0 else "assistant", texts[i]) for i in reversed(range(12))
    ]
    expected = build_prompt(settings, summary=None, turns=everything)
    assert 1 < len(row["turns"]) == expected.turns_included < len(everything)
    assert row["prompt_tokens"] == expected.tokens
    chosen = [Turn(role, content) for role, content in row["turns"]]
    assert build_prompt(settings, summary=None, turns=chosen).messages == expected.messages


async def test_a_summary_counts_and_a_missing_count_falls_back(
    db: Database, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    seeded = await _thread_with_counts(db, settings, ["one", "two", "three"])
    await db.fetchval(  # a summary without its count: the start falls back
        "INSERT INTO summaries (thread_id, start_message_id, end_message_id, start_seq, end_seq,"
        " content, model) VALUES ($1, $2, $3, 1, 2, 'the first two', 'm')",
        seeded.thread_id,
        seeded.message_ids[0],
        seeded.message_ids[1],
    )
    row = await _send(db, settings, seeded, "four")
    assert row["reply"] == "fallback" and row["reply_message"] is None
    assert row["summary"] == "the first two"
    assert row["turns"] == [["user", "four"], ["user", "three"]]
    assert [r["status"] for r in await _assistant_rows(db, seeded)] == ["completed"]
    assert await _reservations(db, seeded) == 0
    # With its count, the summary is in the prompt and the count is build_prompt's.
    await db.fetchval(
        "UPDATE summaries SET content_tokens = $2 WHERE thread_id = $1",
        seeded.thread_id,
        build_prompt(settings, summary="the first two", turns=[]).tokens
        - build_prompt(settings, summary=None, turns=[]).tokens
        - prompt_costs(settings).summary_overhead,
    )
    row = await _send(db, settings, seeded, "five")
    assert row["reply"] == "started"
    turns = [Turn(role, content) for role, content in row["turns"]]
    assert (
        row["prompt_tokens"] == build_prompt(settings, summary="the first two", turns=turns).tokens
    )
    # A message without a count (written before 0014, or edited since) in the window: fallback.
    other = await seed_thread(db, ["an old message"])
    fallback = await _send(db, settings, other, "new")
    assert fallback["reply"] == "fallback"
    assert fallback["turns"] == [["user", "new"], ["user", "an old message"]]
    assert await _assistant_rows(db, other) == []


async def test_a_newest_turn_too_long_to_fit_falls_back(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path, llm_context_tokens=1100, llm_max_reply_tokens=1000)
    seeded = await seed_thread(db, [])
    row = await _send(db, settings, seeded, "many words " * 200)
    assert row["outcome"] == "created" and row["reply"] == "fallback"
    assert await _assistant_rows(db, seeded) == []


async def test_refusals_write_the_refused_reply_or_nothing(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    # The reservation does not fit the budget: a failed reply and its event, no reservation.
    seeded = await seed_thread(db, [], budget=Decimal("0.001"))
    row = await _send(db, settings, seeded, "expensive")
    assert row["outcome"] == "created" and row["reply"] == "budget_exceeded"
    assert [r["status"] for r in await _assistant_rows(db, seeded)] == ["failed"]
    failed = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = $2",
        seeded.thread_id,
        row["seq"] + 2,
    )
    assert failed["type"] == "assistant.failed"
    assert failed["payload"]["reason"] == "budget_exceeded"
    assert failed["payload"]["message"] == "over budget"
    assert await _reservations(db, seeded) == 0
    # A budget already spent: the send itself is refused, nothing written at all.
    await db.fetchval("UPDATE projects SET monthly_budget_usd = 0 WHERE id = $1", seeded.project_id)
    before = await db.fetchval(
        "SELECT count(*) FROM thread_events WHERE thread_id = $1", seeded.thread_id
    )
    spent = await _send(db, settings, seeded, "again")
    assert spent["outcome"] == "budget_exceeded" and spent["reply"] is None
    after = await db.fetchval(
        "SELECT count(*) FROM thread_events WHERE thread_id = $1", seeded.thread_id
    )
    assert after == before
    # A refusal decided before (the content filter): failed with that reason, no reservation.
    other = await seed_thread(db, [])
    filtered = await _send(
        db, settings, other, "bad words", refuse="content_filtered", refuse_text="no"
    )
    assert filtered["reply"] == "content_filtered"
    assert [r["status"] for r in await _assistant_rows(db, other)] == ["failed"]
    assert await _reservations(db, other) == 0
    # A stranger's thread: nothing written.
    stranger = await messages.send_and_start(
        db.atomic,
        author_id=str(uuid.uuid4()),
        thread_id=other.thread_id,
        content="hi",
        client_msg_id=None,
        reply=True,
        history=10,
        start=_start(settings, "hi"),
    )
    assert stranger["outcome"] == "not_found" and stranger["reply"] is None


async def test_a_retried_send_starts_no_second_reply(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    seeded = await seed_thread(db, [])
    first = await _send(db, settings, seeded, "once", client_msg_id="c-1")
    assert first["reply"] == "started"
    # The reply ends (so a second one would not merely be "busy").
    await db.fetchval(
        "UPDATE messages SET status = 'completed' WHERE id = $1",
        json.loads(first["reply_message"])["id"],
    )
    again = await _send(db, settings, seeded, "once", client_msg_id="c-1")
    assert again["outcome"] == "existing" and again["reply"] is None
    assert len(await _assistant_rows(db, seeded)) == 1
    # Without a reply or with p_model NULL (the caller starts it) only the message is written,
    # with its count.
    quiet = await _send(db, settings, seeded, "no reply", reply=False)
    held = await _send(db, settings, seeded, "later", start=False)
    assert quiet["reply"] is None and held["reply"] is None
    assert len(await _assistant_rows(db, seeded)) == 1
    counts = await db.fetch(
        "SELECT content_tokens FROM messages WHERE thread_id = $1 AND role = 'user'",
        seeded.thread_id,
    )
    assert all(r["content_tokens"] is not None for r in counts)


async def test_a_changed_content_drops_its_count(db: Database, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    seeded = await seed_thread(db, [])
    row = await _send(db, settings, seeded, "first words", reply=False)
    message_id = json.loads(row["message"])["id"]
    await db.fetchval(
        "UPDATE messages SET content = 'other words', version = 2 WHERE id = $1", message_id
    )
    assert (
        await db.fetchval("SELECT content_tokens FROM messages WHERE id = $1", message_id) is None
    )
    # Setting the count with the content keeps it.
    await db.fetchval(
        "UPDATE messages SET content = 'third', content_tokens = 1, version = 3 WHERE id = $1",
        message_id,
    )
    assert await db.fetchval("SELECT content_tokens FROM messages WHERE id = $1", message_id) == 1


def _completed(tap: TimedTap, seeded: Seeded) -> int:
    return len([e for _, e in tap.of(seeded.thread_id) if e.type == "assistant.completed"])


def _principal(seeded: Seeded) -> Principal:
    return Principal(
        user_id=seeded.user_id,
        email="x@example.test",
        jti=uuid.uuid4().hex,
        expires_at=1e12,
        via="bearer",
    )


async def test_replies_in_a_conversation_start_with_their_send(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """Through the bus: each reply ends with its count stored, so the next send starts its
    reply in its own statement; the prompt carries the whole conversation; an edit drops the
    edited message's count and the next reply starts the old way, with the edited text."""
    services = llm_server.services
    db = services.db
    fake_llm.configure(tokens=3)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(db, [])
    principal = _principal(seeded)
    assistant = services.assistant
    assert assistant is not None
    requests: list[ReplyRequest] = []
    hand_over = assistant.start_reply

    def spy(request: ReplyRequest) -> None:
        requests.append(request)
        hand_over(request)

    assistant.start_reply = spy  # type: ignore[method-assign]
    sent: list[str] = []
    for i, text in enumerate(["first question", "second question", "third question"]):
        result = await execute(
            services, principal, SendMessage(thread_id=seeded.thread_id, content=text)
        )
        sent.append(result.data["id"])
        with trio.fail_after(15):
            while _completed(tap, seeded) < i + 1:
                await tap.changed.wait()
    rows = await db.fetch(
        "SELECT role, status, content, content_tokens FROM messages WHERE thread_id = $1"
        " ORDER BY seq",
        seeded.thread_id,
    )
    assert [r["role"] for r in rows] == ["user", "assistant"] * 3
    assert all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert r["content_tokens"] == message_tokens(services.settings, r["content"])
    prompt = [m["content"] for m in fake_llm.stats.last_messages]
    assert prompt[1:] == [r["content"] for r in rows[:5]]
    assert await _reservations(db, seeded) == 0
    types = [e.type for _, e in tap.of(seeded.thread_id)]
    assert types[:3] == ["message.created", "message.created", "assistant.started"]
    # An edit: its count is dropped; the next reply starts from the send's history, edited.
    await execute(
        services, principal, EditMessage(message_id=sent[0], content="edited", expected_version=1)
    )
    await execute(services, principal, SendMessage(thread_id=seeded.thread_id, content="fourth"))
    with trio.fail_after(15):
        while _completed(tap, seeded) < 4:
            await tap.changed.wait()
    prompt = [m["content"] for m in fake_llm.stats.last_messages]
    assert prompt[1] == "edited" and prompt[-1] == "fourth"
    # Started by the send three times; after the edit, from the send's history.
    assert [r.started is not None for r in requests] == [True, True, True, False]
    assert requests[-1].history is not None


async def test_a_started_reply_queued_behind_a_waiting_request_runs_first(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    """A send's reply started while a request of the thread (not started yet) is queued here:
    that request finds the thread busy with the started one queued behind it; the started one
    runs first, then the request (neither waits for ever)."""
    services = llm_server.services
    assistant = services.assistant
    assert assistant is not None
    fake_llm.configure(tokens=2)
    tap = TimedTap(llm_server)
    seeded = await seed_thread(services.db, ["an earlier question"])
    row = await messages.send_and_start(
        services.db.atomic,
        author_id=seeded.user_id,
        thread_id=seeded.thread_id,
        content="asked now",
        client_msg_id=None,
        reply=True,
        history=store.HISTORY_LIMIT,
        start=_start(services.settings, "asked now"),
    )
    # The seeded message has no count: fallback; start it through a second send that has one.
    assert row["reply"] == "fallback"
    await services.db.fetchval(
        "UPDATE messages SET content_tokens = $2 WHERE id = $1",
        seeded.message_ids[0],
        message_tokens(services.settings, "an earlier question"),
    )
    row = await messages.send_and_start(
        services.db.atomic,
        author_id=seeded.user_id,
        thread_id=seeded.thread_id,
        content="and now",
        client_msg_id=None,
        reply=True,
        history=store.HISTORY_LIMIT,
        start=_start(services.settings, "and now"),
    )
    assert row["reply"] == "started"
    waiting = ReplyRequest(
        thread_id=seeded.thread_id,
        project_id=seeded.project_id,
        user_message_id=seeded.message_ids[0],
        requested_by=seeded.user_id,
    )
    started = ReplyRequest(
        thread_id=seeded.thread_id,
        project_id=seeded.project_id,
        user_message_id=json.loads(row["message"])["id"],
        requested_by=seeded.user_id,
        started=StartedReply(
            seq=int(row["seq"]) + 1,
            message=json.loads(row["reply_message"]),
            summary=row["summary"],
            turns=[(role, content) for role, content in row["turns"]],
            prompt_tokens=int(row["prompt_tokens"]),
            whole=bool(row["whole"]),
        ),
    )
    assistant.start_reply(waiting)
    assistant.start_reply(started)
    with trio.fail_after(10):
        while _completed(tap, seeded) < 2:
            await tap.changed.wait()
    completed = [e for _, e in tap.of(seeded.thread_id) if e.type == "assistant.completed"]
    assert completed[0].data["message_id"] == json.loads(row["reply_message"])["id"]
