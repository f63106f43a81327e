"""Assistant replies end to end against the fake provider over real HTTP and real PostgreSQL."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import trio

from server.commands.serialize import message_to_dict
from server.db import Database
from server.events import ThreadEvent
from server.llm import pricing, tokens
from server.llm.fake_server import FakeLLM
from server.llm.generation import AssistantService
from server.llm.prompt import Turn, build_prompt
from server.runtime import RunningServer, open_server
from server.storage import messages, threads
from tests.conftest import make_settings
from tests.llm.conftest import (
    EventTap,
    Seeded,
    add_message,
    llm_settings,
    request_for,
    seed_thread,
)


async def _message(running: RunningServer, message_id: str) -> dict[str, object]:
    row = await running.services.db.fetchrow(
        "SELECT status, content, seq, role, reply_to, model FROM messages WHERE id = $1",
        message_id,
    )
    assert row is not None
    return dict(row)


async def test_streamed_reply_deltas_concatenate_to_stored_content(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=40)
    tap = EventTap(llm_server)
    seeded = await seed_thread(llm_server.services.db, ["Tell me about foxes"])
    assert llm_server.services.assistant is not None
    llm_server.services.assistant.start_reply(request_for(seeded))
    t = seeded.thread_id
    await tap.wait_for(lambda: bool(tap.of(t, "assistant.completed")))

    created = [e for e in tap.of(t, "message.created")]
    assert len(created) == 1
    message_id = created[0].data["id"]
    assert created[0].data["role"] == "assistant" and created[0].data["status"] == "streaming"
    started = tap.of(t, "assistant.started")
    assert [e.data for e in started] == [{"message_id": message_id}]
    deltas = tap.of(t, "assistant.delta")
    assert [d.data["index"] for d in deltas] == list(range(len(deltas)))
    assert all(d.seq is None for d in deltas + started)
    text = "".join(d.data["text"] for d in deltas)
    completed = tap.of(t, "assistant.completed")[0]

    stored = await _message(llm_server, message_id)
    assert stored["status"] == "completed"
    assert stored["content"] == text == completed.data["content"]
    assert len(text.split()) == 40
    assert stored["reply_to"] is not None and str(stored["reply_to"]) == seeded.message_ids[-1]
    # The message's seq is its message.created seq; the closing event takes the next one.
    assert stored["seq"] == created[0].seq and completed.seq == created[0].seq + 1
    # Usage row equals what the provider reported.
    usage = await llm_server.services.db.fetchrow(
        "SELECT * FROM usage_records WHERE message_id = $1", message_id
    )
    assert usage is not None
    assert usage["completion_tokens"] == 40 and usage["estimated"] is False
    assert usage["prompt_tokens"] == completed.data["usage"]["prompt_tokens"] > 0
    expected = Decimal(usage["prompt_tokens"]) / 1000 + Decimal(40 * 2) / 1000
    assert usage["cost_usd"] == expected
    # The prompt carried the system prompt and the user's turn, in those roles.
    sent = fake_llm.stats.last_messages
    assert sent[0]["role"] == "system" and sent[-1] == {
        "role": "user",
        "content": "Tell me about foxes",
    }
    reservations = await llm_server.services.db.fetchval(
        "SELECT count(*) FROM budget_reservations WHERE message_id = $1", message_id
    )
    assert reservations == 0


async def _start_and_wait(running: RunningServer, tap: EventTap, seeded: Seeded) -> ThreadEvent:
    """Ask for a reply and wait for its closing durable event."""
    assert running.services.assistant is not None
    before = len(_closing(tap, seeded.thread_id))
    running.services.assistant.start_reply(request_for(seeded))
    await tap.wait_for(lambda: len(_closing(tap, seeded.thread_id)) > before)
    return _closing(tap, seeded.thread_id)[-1]


def _closing(tap: EventTap, thread_id: str) -> list[ThreadEvent]:
    return [e for e in tap.of(thread_id) if e.type in ("assistant.completed", "assistant.failed")]


async def test_budget_stops_the_next_call_before_the_provider(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    db = llm_server.services.db
    tap = EventTap(llm_server)
    seeded = await seed_thread(db, ["first question"], budget=Decimal("100"))
    first = await _start_and_wait(llm_server, tap, seeded)
    assert first.type == "assistant.completed"
    spent = await db.fetchval(
        "SELECT sum(cost_usd) FROM usage_records WHERE project_id = $1", seeded.project_id
    )
    assert spent > 0
    # The budget is now exactly what was spent: the next reply cannot fit.
    await db.fetchval(
        "UPDATE projects SET monthly_budget_usd = $2 WHERE id = $1", seeded.project_id, spent
    )
    requests = fake_llm.stats.requests
    seeded.message_ids.append(await add_message(db, seeded, "second question"))
    refused = await _start_and_wait(llm_server, tap, seeded)
    assert refused.type == "assistant.failed" and refused.data["reason"] == "budget_exceeded"
    assert fake_llm.stats.requests == requests  # no request reached the provider
    stored = await _message(llm_server, refused.data["message_id"])
    assert stored["status"] == "failed" and stored["content"] == ""
    assert stored["seq"] == refused.seq - 1
    rows = await db.fetchval(
        "SELECT count(*) FROM usage_records WHERE message_id = $1", refused.data["message_id"]
    )
    held = await db.fetchval(
        "SELECT count(*) FROM budget_reservations WHERE project_id = $1", seeded.project_id
    )
    assert rows == 0 and held == 0


async def test_cancel_mid_stream_keeps_partial_text(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=400, delay_per_token_ms=10)
    tap = EventTap(llm_server)
    seeded = await seed_thread(llm_server.services.db, ["write a long story"])
    assistant = llm_server.services.assistant
    assert assistant is not None
    assistant.start_reply(request_for(seeded))
    t = seeded.thread_id
    await tap.wait_for(lambda: len(tap.of(t, "assistant.delta")) >= 3)
    assert await assistant.cancel(t) is True
    await tap.wait_for(lambda: bool(_closing(tap, t)))
    closing = _closing(tap, t)[0]
    assert closing.type == "assistant.completed" and closing.data["cancelled"] is True
    text = "".join(d.data["text"] for d in tap.of(t, "assistant.delta"))
    stored = await _message(llm_server, closing.data["message_id"])
    assert stored["status"] == "cancelled"
    assert stored["content"] == text == closing.data["content"]
    assert 0 < len(text.split()) < 400
    usage = await llm_server.services.db.fetchrow(
        "SELECT * FROM usage_records WHERE message_id = $1", closing.data["message_id"]
    )
    assert usage is not None and usage["estimated"] is True
    assert usage["completion_tokens"] == tokens.count_text(text)
    assert await assistant.cancel(t) is False  # nothing running any more


async def test_provider_failure_mid_stream_keeps_partial_text(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=20, drop_after_tokens=4)
    tap = EventTap(llm_server)
    seeded = await seed_thread(llm_server.services.db, ["hi"])
    closing = await _start_and_wait(llm_server, tap, seeded)
    assert closing.type == "assistant.failed" and closing.data["reason"] == "provider_error"
    stored = await _message(llm_server, closing.data["message_id"])
    assert stored["status"] == "failed"
    assert stored["content"] == "the quick brown fox" == closing.data["content"]
    assert fake_llm.stats.requests == 1  # text had been streamed: no retry


async def test_content_filter_refuses_without_calling_the_provider(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> None:
    settings = llm_settings(tmp_path, fake_llm, content_filter="forbidden,Secret Plan")
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
        tap = EventTap(running)
        seeded = await seed_thread(running.services.db, ["tell me the SECRET plan"])
        closing = await _start_and_wait(running, tap, seeded)
    assert closing.type == "assistant.failed" and closing.data["reason"] == "content_filtered"
    assert fake_llm.stats.requests == 0


async def test_second_request_waits_for_the_running_reply(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=30, delay_per_token_ms=2)
    db = llm_server.services.db
    tap = EventTap(llm_server)
    seeded = await seed_thread(db, ["one"])
    assistant = llm_server.services.assistant
    assert assistant is not None
    assistant.start_reply(request_for(seeded))
    t = seeded.thread_id
    await tap.wait_for(lambda: bool(tap.of(t, "assistant.started")))
    seeded.message_ids.append(await add_message(db, seeded, "two"))
    assistant.start_reply(request_for(seeded))
    await tap.wait_for(lambda: len(_closing(tap, t)) == 2)
    first, second = _closing(tap, t)
    assert first.type == second.type == "assistant.completed"
    assert first.seq is not None and second.seq is not None and first.seq < second.seq
    # The second reply was generated after the first finished, and saw it in its prompt.
    sent = fake_llm.stats.last_messages
    assert [m["role"] for m in sent[-3:]] == ["user", "assistant", "user"]
    assert sent[-2]["content"] == first.data["content"]


async def test_a_request_beyond_the_thread_queue_is_refused_not_dropped(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=1000, delay_per_token_ms=10)
    db = llm_server.services.db
    tap = EventTap(llm_server)
    seeded = await seed_thread(db, ["first"])
    assistant = llm_server.services.assistant
    assert isinstance(assistant, AssistantService)
    t = seeded.thread_id
    assistant.start_reply(request_for(seeded))
    await tap.wait_for(lambda: bool(tap.of(t, "assistant.started")))
    for n in range(8):  # the running reply is the queue's head: 7 more fit, the 8th does not
        seeded.message_ids.append(await add_message(db, seeded, f"more {n}"))
        assistant.start_reply(request_for(seeded))
    await tap.wait_for(lambda: bool(_closing(tap, t)))
    refused = _closing(tap, t)
    assert [(e.type, e.data["reason"]) for e in refused] == [("assistant.failed", "overloaded")]
    row = await _message(llm_server, refused[0].data["message_id"])
    assert (row["status"], str(row["reply_to"])) == ("failed", seeded.message_ids[-1])
    assert await assistant.cancel(t)


async def test_shutdown_saves_an_in_flight_reply_as_interrupted(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str, db: Database
) -> None:
    fake_llm.configure(tokens=1000, delay_per_token_ms=10)
    async with open_server(llm_settings(tmp_path, fake_llm), pg_dsn, bind="127.0.0.1:0") as running:
        tap = EventTap(running)
        seeded = await seed_thread(db, ["go on forever"])
        assert running.services.assistant is not None
        running.services.assistant.start_reply(request_for(seeded))
        await tap.wait_for(lambda: len(tap.of(seeded.thread_id, "assistant.delta")) >= 2)
        seeded.message_ids.append(await add_message(db, seeded, "and then?"))
        running.services.assistant.start_reply(request_for(seeded))  # queued behind it
    closing = _closing(tap, seeded.thread_id)
    assert sorted((e.type, e.data["reason"]) for e in closing) == [
        ("assistant.failed", "interrupted"),
        ("assistant.failed", "unavailable"),  # the queued request is answered, not dropped
    ]
    closing = [e for e in closing if e.data["reason"] == "interrupted"]
    row = await db.fetchrow(
        "SELECT status, content FROM messages WHERE id = $1", closing[0].data["message_id"]
    )
    assert row is not None and row["status"] == "interrupted"
    assert row["content"] and row["content"] == closing[0].data["content"]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM budget_reservations WHERE message_id = $1",
            closing[0].data["message_id"],
        )
        == 0
    )


async def test_offline_model_is_the_default(tmp_path: Path, pg_dsn: str) -> None:
    async with open_server(make_settings(tmp_path), pg_dsn, bind="127.0.0.1:0") as running:
        tap = EventTap(running)
        seeded = await seed_thread(running.services.db, ["Are you a real model?"])
        closing = await _start_and_wait(running, tap, seeded)
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            ready = (await http.get("/readyz")).json()
        stored = await _message(running, closing.data["message_id"])
    assert ready["checks"]["llm"]["provider"] == "offline"
    assert ready["checks"]["llm"]["ok"] is True
    assert closing.type == "assistant.completed"
    assert "offline model" in str(stored["content"]) and stored["model"] == "threadline-offline"
    assert "Are you a real model?" in str(stored["content"])
    assert closing.data["usage"]["cost_usd"] == 0.0


async def test_replies_left_streaming_by_a_dead_process_are_interrupted(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    db = llm_server.services.db
    seeded = await seed_thread(db, ["hello?"])
    # What a crashed process leaves behind: a streaming reply, partly saved, and its reservation.
    async with db.transaction() as tx:
        seq = await threads.lock_next_seq(tx, seeded.thread_id)
        row = await messages.insert_message(
            tx,
            thread_id=seeded.thread_id,
            seq=seq,
            role="assistant",
            author_id=None,
            content="half an ans",
            status="streaming",
            reply_to=seeded.message_ids[0],
            model="fake-gpt",
        )
        await threads.append_event(
            tx, seeded.thread_id, seq, "message.created", message_to_dict(row)
        )
        await tx.execute(
            "INSERT INTO budget_reservations (message_id, project_id, amount_usd)"
            " VALUES ($1, $2, 1)",
            row["id"],
            seeded.project_id,
        )
    assistant = llm_server.services.assistant
    assert isinstance(assistant, AssistantService)
    assert await assistant.recover_stale() == 0  # young: it may belong to a live process
    await db.fetchval(
        "UPDATE messages SET created_at = created_at - interval '1 hour' WHERE id = $1", row["id"]
    )
    tap = EventTap(llm_server)
    assert await assistant.recover_stale() == 1
    stored = await _message(llm_server, str(row["id"]))
    assert stored["status"] == "interrupted" and stored["content"] == "half an ans"
    failed = tap.of(seeded.thread_id, "assistant.failed")
    assert [e.data["reason"] for e in failed] == ["interrupted"] and failed[0].seq == seq + 1
    assert failed[0].data["content"] == "half an ans"  # the text saved, in the event too
    logged = await db.fetchval(
        "SELECT payload FROM thread_events WHERE thread_id = $1 AND seq = $2",
        seeded.thread_id,
        seq + 1,
    )
    assert logged == failed[0].data
    held = await db.fetchval(
        "SELECT count(*) FROM budget_reservations WHERE message_id = $1", row["id"]
    )
    assert held == 0
    assert await assistant.recover_stale() == 0


async def test_streaming_text_is_saved_while_it_streams(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=2000, delay_per_token_ms=5)
    assistant = llm_server.services.assistant
    assert isinstance(assistant, AssistantService)
    assistant.save_interval_s = 0.05
    tap = EventTap(llm_server)
    seeded = await seed_thread(llm_server.services.db, ["stream slowly"])
    assistant.start_reply(request_for(seeded))
    t = seeded.thread_id
    await tap.wait_for(lambda: bool(tap.of(t, "assistant.started")))
    message_id = tap.of(t, "assistant.started")[0].data["message_id"]
    with trio.fail_after(10):
        while True:  # bounded poll: the saved text grows while the status stays streaming
            stored = await _message(llm_server, message_id)
            if stored["content"]:
                break
            await trio.sleep(0.02)
    assert stored["status"] == "streaming"
    assert await assistant.cancel(t)
    await tap.wait_for(lambda: bool(_closing(tap, t)))
    final = _closing(tap, t)[0].data["content"]
    assert final.startswith(str(stored["content"])) and len(final) >= len(str(stored["content"]))


async def test_reservations_stop_concurrent_replies_overshooting_a_budget(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    db = llm_server.services.db
    settings = llm_server.services.settings
    tap = EventTap(llm_server)
    first = await seed_thread(db, ["same question"])
    prompt = build_prompt(settings, summary=None, turns=[Turn("user", "same question")])
    estimate = pricing.reply_estimate_usd(settings, "fake-gpt", prompt.tokens)
    budget = estimate * Decimal("1.5")  # room for one worst-case reply, not two
    await db.fetchval(
        "UPDATE projects SET monthly_budget_usd = $2 WHERE id = $1", first.project_id, budget
    )
    # A second thread in the same project.
    async with db.transaction() as tx:
        second_thread = str(
            await tx.fetchval(
                "INSERT INTO threads (project_id, title) VALUES ($1, 't2') RETURNING id",
                first.project_id,
            )
        )
    second = Seeded(first.user_id, first.project_id, second_thread)
    second.message_ids.append(await add_message(db, second, "same question"))
    assistant = llm_server.services.assistant
    assert assistant is not None
    fake_llm.configure(hang=True)
    assistant.start_reply(request_for(first))
    with trio.fail_after(10):
        while fake_llm.stats.in_flight < 1:  # the first reply holds its reservation
            await trio.sleep(0.005)
    held = await db.fetchval(
        "SELECT sum(amount_usd) FROM budget_reservations WHERE project_id = $1", first.project_id
    )
    assert held == estimate
    refused = await _start_and_wait(llm_server, tap, second)
    assert refused.data["reason"] == "budget_exceeded" and fake_llm.stats.requests == 1
    fake_llm.configure(hang=False)
    await tap.wait_for(lambda: bool(_closing(tap, first.thread_id)))
    assert _closing(tap, first.thread_id)[0].type == "assistant.completed"
    spent = await db.fetchval(
        "SELECT sum(cost_usd) FROM usage_records WHERE project_id = $1", first.project_id
    )
    assert 0 < spent <= estimate  # settled at the real cost, within the reservation


async def test_a_message_deleted_before_its_reply_starts_gets_none(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    db = llm_server.services.db
    seeded = await seed_thread(db, ["never mind"])
    await db.fetchval(
        "UPDATE messages SET content = '', version = 2, deleted_at = clock_timestamp()"
        " WHERE id = $1",
        seeded.message_ids[0],
    )
    tap = EventTap(llm_server)
    assistant = llm_server.services.assistant
    assert isinstance(assistant, AssistantService)
    assistant.start_reply(request_for(seeded))
    with trio.fail_after(10):
        while assistant.in_flight() or assistant._queues:  # bounded: the worker ends at once
            await trio.sleep(0.005)
    assert tap.of(seeded.thread_id) == [] and fake_llm.stats.requests == 0
