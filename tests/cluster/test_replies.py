"""Contract section 6: each reply is generated once in the cluster, whichever node received the
message and wherever its watchers are; cancel works from any node; a node killed mid-reply has
its reply ended ``interrupted`` (saved text kept) by another node within the timeout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.cluster.conftest import (
    NODE_TIMEOUT_S,
    Cluster,
    User,
    durable,
    new_thread,
    new_user,
    request,
    rest_send,
    subscribe,
    ws_client,
)
from tests.cluster.nodes import Node, kill_node, stop_node
from tests.server.ws_support import Client


@pytest.fixture
def fake(cluster: Cluster) -> Iterator[Cluster]:
    """The shared fake provider, back to its defaults after the test."""
    yield cluster
    cluster.fake.control(reset=True)


def _of(client: Client, thread_id: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in client.events if e["thread_id"] == thread_id and e["type"] == type_]


def _text(client: Client, thread_id: str, message_id: str) -> str:
    """What a client assembles: the ``assistant.started`` snapshot, then each delta."""
    text = ""
    for event in client.events:
        if event["thread_id"] != thread_id or event["data"].get("message_id") != message_id:
            continue
        if event["type"] == "assistant.started":
            text = event["data"].get("text", "")
        elif event["type"] == "assistant.delta":
            text += event["data"]["text"]
    return text


async def _messages(node: Node, user: User, thread_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=node.url, timeout=20) as http:
        page = await http.get(
            f"/api/v1/threads/{thread_id}/messages", params={"limit": 200}, headers=user.headers
        )
    assert page.status_code == 200, page.text
    return page.json()["items"]  # type: ignore[no-any-return]


async def test_one_provider_call_per_reply_with_watchers_on_every_node(fake: Cluster) -> None:
    nodes = fake.nodes[:3]
    fake.fake.control(tokens=40, delay_per_token_ms=20)
    user = await new_user(nodes[0])
    thread_id = await new_thread(nodes[0], user)
    async with ws_client(nodes[0], user) as a, ws_client(nodes[1], user) as b:
        async with ws_client(nodes[2], user) as c:
            watchers = [a, b, c]
            for watcher in watchers:
                await subscribe(watcher, thread_id, after_seq=0)
            before = fake.fake.requests()
            await rest_send(nodes[1], user, thread_id, "hello everyone", reply=True)
            for watcher in watchers:
                await watcher.wait_for(
                    lambda w=watcher: bool(_of(w, thread_id, "assistant.completed")), timeout=30
                )
            # One late watcher, on the node that did not generate it, mid-reply: covered below.
    assert fake.fake.requests() == before + 1
    closing = [_of(w, thread_id, "assistant.completed")[0] for w in watchers]
    final = closing[0]["data"]["content"]
    assert final and all(c["data"]["content"] == final for c in closing)
    message_id = closing[0]["data"]["message_id"]
    for watcher in watchers:
        assert [e["seq"] for e in durable(watcher, thread_id)] == [1, 2, 3]
        assert len(_of(watcher, thread_id, "assistant.started")) == 1
        deltas = _of(watcher, thread_id, "assistant.delta")
        assert [d["data"]["index"] for d in deltas] == list(range(len(deltas)))
        assert _text(watcher, thread_id, message_id) == final


async def test_a_watcher_joining_mid_reply_on_another_node_gets_the_text_so_far(
    fake: Cluster,
) -> None:
    one, two, _ = fake.nodes[:3]
    fake.fake.control(tokens=60, delay_per_token_ms=40)
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    async with ws_client(one, user) as early:
        await subscribe(early, thread_id, after_seq=0)
        await rest_send(one, user, thread_id, "tell me a story", reply=True)
        await early.wait_for(lambda: len(_of(early, thread_id, "assistant.delta")) >= 5, 20)
        async with ws_client(two, user) as late:
            await subscribe(late, thread_id, after_seq=None)  # no replay: live from here on
            await late.wait_for(lambda: bool(_of(late, thread_id, "assistant.completed")), 30)
        await early.wait_for(lambda: bool(_of(early, thread_id, "assistant.completed")), 30)
    (started,) = _of(late, thread_id, "assistant.started")
    assert started["data"]["text"], "the snapshot carries the text streamed before joining"
    final = _of(late, thread_id, "assistant.completed")[0]["data"]
    assert _text(late, thread_id, final["message_id"]) == final["content"]
    assert _text(early, thread_id, final["message_id"]) == final["content"]


async def test_cancel_from_another_node_stops_the_reply_where_it_runs(fake: Cluster) -> None:
    one, two, three = fake.nodes[:3]
    fake.fake.control(tokens=400, delay_per_token_ms=25)
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    async with ws_client(three, user) as watcher, ws_client(two, user) as canceller:
        await subscribe(watcher, thread_id, after_seq=0)
        await rest_send(one, user, thread_id, "go on and on", reply=True)
        await watcher.wait_for(lambda: len(_of(watcher, thread_id, "assistant.delta")) >= 2, 20)
        answer = await request(canceller, "cancel", thread_id=thread_id)
        assert answer["ok"] and answer["data"] == {"cancelled": True}, answer
        await watcher.wait_for(lambda: bool(_of(watcher, thread_id, "assistant.completed")), 20)
        # Nothing runs now: a second cancel, from yet another node, says so.
        again = await request(watcher, "cancel", thread_id=thread_id)
        assert again["data"] == {"cancelled": False}
    done = _of(watcher, thread_id, "assistant.completed")[0]["data"]
    assert done["status"] == "cancelled" and done["cancelled"] is True
    stored = [m for m in await _messages(two, user, thread_id) if m["role"] == "assistant"]
    assert stored[0]["status"] == "cancelled" and stored[0]["content"] == done["content"]


async def test_one_reply_per_thread_at_a_time_across_nodes(fake: Cluster) -> None:
    one, two, three = fake.nodes[:3]
    fake.fake.control(tokens=30, delay_per_token_ms=30)
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    async with ws_client(three, user) as watcher:
        await subscribe(watcher, thread_id, after_seq=0)
        before = fake.fake.requests()
        await rest_send(one, user, thread_id, "first question", reply=True)
        await watcher.wait_for(lambda: bool(_of(watcher, thread_id, "assistant.started")), 20)
        await rest_send(two, user, thread_id, "second question", reply=True)  # another node
        await watcher.wait_for(
            lambda: len(_of(watcher, thread_id, "assistant.completed")) == 2, timeout=40
        )
    assert fake.fake.requests() == before + 2
    events = durable(watcher, thread_id)
    order = [(e["type"], e["data"].get("role")) for e in events]
    # The second reply's message is created only after the first reply completed.
    assert order == [
        ("message.created", "user"),
        ("message.created", "assistant"),
        ("message.created", "user"),
        ("assistant.completed", None),
        ("message.created", "assistant"),
        ("assistant.completed", None),
    ]


async def test_a_node_killed_mid_reply_has_it_ended_interrupted_by_another(
    fake: Cluster,
) -> None:
    watcher_node = fake.nodes[0]
    doomed = fake.spare["doomed"]
    try:
        fake.fake.control(tokens=2000, delay_per_token_ms=20)
        user = await new_user(watcher_node)
        thread_id = await new_thread(watcher_node, user)
        async with ws_client(watcher_node, user) as watcher:
            await subscribe(watcher, thread_id, after_seq=0)
            await rest_send(doomed, user, thread_id, "never finished", reply=True)

            async def saved() -> str:
                mine = await _messages(watcher_node, user, thread_id)
                replies = [m for m in mine if m["role"] == "assistant"]
                return str(replies[0]["content"]) if replies else ""

            with trio.fail_after(20):  # until the streaming text has been saved once
                while not await saved():
                    await trio.sleep(0.2)  # poll interval
            kill_node(doomed)
            killed_at = trio.current_time()
            await watcher.wait_for(lambda: bool(_of(watcher, thread_id, "assistant.failed")), 30)
            took = trio.current_time() - killed_at
        failed = _of(watcher, thread_id, "assistant.failed")[0]["data"]
        assert failed["reason"] == "interrupted" and failed["status"] == "interrupted"
        # Within the node timeout plus one sweep (a third of it), with room for a loaded machine.
        assert took < NODE_TIMEOUT_S * (1 + 1 / 3) + 3.0, took
        stored = await _messages(watcher_node, user, thread_id)
        reply = next(m for m in stored if m["role"] == "assistant")
        assert reply["status"] == "interrupted" and reply["content"] == failed["content"] != ""
    finally:
        if doomed.alive():
            stop_node(doomed)
