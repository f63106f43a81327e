"""Assistant replies as WebSocket subscribers see them: send, stream, late join, cancel."""

from __future__ import annotations

import uuid
from typing import Any

from server.llm.fake_server import FakeLLM
from server.runtime import RunningServer
from tests.server.ws_support import connect, new_owner, new_thread


def _of(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def _closed(events: list[dict[str, Any]]) -> bool:
    return any(e["type"] in ("assistant.completed", "assistant.failed") for e in events)


async def test_ws_send_streams_the_reply_to_every_subscriber(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=30, delay_per_token_ms=2)
    owner = await new_owner(llm_server.services)
    thread_id = await new_thread(llm_server.services, owner)
    async with connect(llm_server, owner.token) as a, connect(llm_server, owner.token) as b:
        for c in (a, b):
            assert (await c.request("subscribe", thread_id=thread_id))["ok"]
        sent = await a.request(
            "send", thread_id=thread_id, content="hello there", client_msg_id=uuid.uuid4().hex
        )
        assert sent["ok"], sent
        for c in (a, b):
            await c.wait_for(lambda c=c: _closed(c.events))
        for c in (a, b):
            durable = [e for e in c.events if e["seq"] is not None]
            assert [e["seq"] for e in durable] == [1, 2, 3]
            assert [e["type"] for e in durable] == [
                "message.created",
                "message.created",
                "assistant.completed",
            ]
            text = "".join(e["data"]["text"] for e in _of(c.events, "assistant.delta"))
            assert text == durable[-1]["data"]["content"] and len(text.split()) == 30
            assert (
                _of(c.events, "assistant.started")[0]["data"]["message_id"]
                == (durable[1]["data"]["id"])
            )


async def test_ws_late_subscriber_gets_text_so_far_and_cancel_stops_the_reply(
    llm_server: RunningServer, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=2000, delay_per_token_ms=5)
    owner = await new_owner(llm_server.services)
    thread_id = await new_thread(llm_server.services, owner)
    async with connect(llm_server, owner.token) as early:
        assert (await early.request("subscribe", thread_id=thread_id))["ok"]
        await early.request(
            "send", thread_id=thread_id, content="go", client_msg_id=uuid.uuid4().hex
        )
        await early.wait_for(lambda: len(_of(early.events, "assistant.delta")) >= 3)
        async with connect(llm_server, owner.token) as late:
            assert (await late.request("subscribe", thread_id=thread_id))["ok"]
            await late.wait_for(lambda: bool(_of(late.events, "assistant.started")))
            started = _of(late.events, "assistant.started")[0]
            assert started["data"]["text"]  # the text so far, then live deltas
            reply = await late.request("cancel", thread_id=thread_id)
            assert reply["ok"] and reply["data"] == {"cancelled": True}
            for c in (early, late):
                await c.wait_for(lambda c=c: _closed(c.events))
            completed = _of(late.events, "assistant.completed")[0]
            assert completed["data"]["cancelled"] is True
            late_text = started["data"]["text"] + "".join(
                e["data"]["text"] for e in _of(late.events, "assistant.delta")
            )
            early_text = "".join(e["data"]["text"] for e in _of(early.events, "assistant.delta"))
            assert late_text == early_text == completed["data"]["content"]
            again = await late.request("cancel", thread_id=thread_id)
            assert again["data"] == {"cancelled": False}
