"""Assistant replies end to end against the fake provider over real HTTP and real PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

from server.llm.fake_server import FakeLLM
from server.runtime import RunningServer
from tests.llm.conftest import EventTap, request_for, seed_thread


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
