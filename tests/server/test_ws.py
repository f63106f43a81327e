"""WebSocket end to end over loopback: handshake, ops, events, replay, fan-out."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from server.events import ThreadEvent
from server.runtime import RunningServer
from tests.server.ws_support import connect, new_owner, new_thread, post, ws_url


async def test_handshake_refusals_are_plain_http(server: RunningServer) -> None:
    with pytest.raises(HandshakeError) as no_auth:
        async with open_websocket_url(ws_url(server)):
            pass
    assert getattr(no_auth.value, "status_code", None) == 401
    owner = await new_owner(server.services)
    with pytest.raises(HandshakeError) as in_url:
        async with open_websocket_url(ws_url(server) + f"?access_token={owner.token}"):
            pass
    assert getattr(in_url.value, "status_code", None) == 401
    # A session cookie needs an allowed Origin (cross-site WebSocket hijacking).
    with pytest.raises(HandshakeError) as cookie_no_origin:
        async with open_websocket_url(
            ws_url(server), extra_headers=[("Cookie", f"tl_session={owner.token}")]
        ):
            pass
    assert getattr(cookie_no_origin.value, "status_code", None) == 403
    with pytest.raises(HandshakeError) as bad_token:
        async with open_websocket_url(
            ws_url(server), extra_headers=[("Authorization", "Bearer not-a-token")]
        ):
            pass
    assert getattr(bad_token.value, "status_code", None) == 401
    body = json.loads(getattr(bad_token.value, "body", b"{}") or b"{}")
    assert body.get("error", {}).get("code") == "unauthorized"


async def test_subscribe_send_edit_delete_gap_free(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    async with connect(server, owner.token) as client:
        reply = await client.request("subscribe", thread_id=thread_id, after_seq=0)
        assert reply["ok"] is True, reply
        assert reply["data"] == {"thread_id": thread_id, "last_seq": 0, "replayed": 0}
        sent = await client.request(
            "send", thread_id=thread_id, content="hello", client_msg_id="c1", reply=False
        )
        assert sent["ok"] is True, sent
        message = sent["data"]
        edited = await client.request(
            "edit", message_id=message["id"], content="hello!", expected_version=1
        )
        assert edited["ok"] is True, edited
        deleted = await client.request("delete", message_id=message["id"], expected_version=2)
        assert deleted["ok"] is True, deleted
        events = await client.wait_events(3)
        assert [e["type"] for e in events] == [
            "message.created",
            "message.updated",
            "message.deleted",
        ]
        assert [e["seq"] for e in events] == [1, 2, 3]
        assert message["seq"] == 1
        assert all(e["thread_id"] == thread_id for e in events)


async def test_errors_keep_the_connection(server: RunningServer) -> None:
    owner = await new_owner(server.services)
    async with connect(server, owner.token) as client:
        await client.ws.send_message("{not json")
        # No ref can be read from it: the error reply carries ref null.
        await client.wait_for(lambda: None in client._replies)
        invalid = client._replies.pop(None)
        assert invalid["ok"] is False and invalid["error"]["code"] == "bad_request", invalid
        assert invalid["error"]["request_id"]
        unknown = await client.request("fly")
        assert unknown["ok"] is False and unknown["error"]["code"] == "bad_request"
        assert unknown["error"]["request_id"]  # the handshake's request id
        bad = await client.request("send", thread_id="x")
        assert bad["ok"] is False and bad["error"]["code"] == "validation_failed"
        assert "content" in bad["error"]["details"]["fields"]
        other = await new_owner(server.services)
        foreign = await new_thread(server.services, other)
        refused = await client.request("subscribe", thread_id=foreign)
        assert refused["error"]["code"] == "not_found"
        pong = await client.request("ping")
        assert pong == {"op": "reply", "ref": pong["ref"], "ok": True, "data": {}}
        cancel = await client.request("cancel", thread_id=await new_thread(server.services, owner))
        assert cancel["ok"] is True and cancel["data"] == {"cancelled": False}


async def test_rest_message_reaches_ws_subscribers(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    async with connect(server, owner.token) as client:
        assert (await client.request("subscribe", thread_id=thread_id))["ok"]
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            response = await http.post(
                f"/api/v1/threads/{thread_id}/messages",
                json={"content": "via rest", "client_msg_id": "r1", "reply": False},
                headers={"Authorization": f"Bearer {owner.token}"},
            )
        assert response.status_code == 201, response.text
        events = await client.wait_events(1)
        assert events[0]["type"] == "message.created"
        assert events[0]["data"]["content"] == "via rest"


async def test_reconnect_with_after_seq_loses_and_repeats_nothing(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    total = 60

    async def writer() -> None:
        # Another WebSocket client keeps sending while the reader reconnects.
        async with connect(server, owner.token) as sender:
            for i in range(total):
                sent = await sender.request(
                    "send", thread_id=thread_id, content=f"m{i}", client_msg_id=f"c{i}", reply=False
                )
                assert sent["ok"], sent

    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        after = 0
        while after < total:
            async with connect(server, owner.token) as client:
                reply = await client.request("subscribe", thread_id=thread_id, after_seq=after)
                assert reply["ok"], reply
                want = min(total, after + 5)
                await client.wait_events(want - after)
                seqs = [e["seq"] for e in client.events]
                seen.extend(seqs)
                after = seqs[-1]
    assert seen == list(range(1, total + 1))


async def test_fifty_subscribers_get_every_event_in_order(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    count = 20
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(50):
            client = await nursery.start(_open_subscribed, server, owner.token, thread_id)
            clients.append(client)
        for i in range(count):
            await post(services, owner, thread_id, f"m{i}")
        for client in clients:
            events = await client.wait_events(count)
            assert [e["seq"] for e in events] == list(range(1, count + 1))
        nursery.cancel_scope.cancel()


async def _open_subscribed(
    server: RunningServer, token: str, thread_id: str, *, task_status: trio.TaskStatus
) -> None:
    async with connect(server, token) as client:
        assert (await client.request("subscribe", thread_id=thread_id, after_seq=0))["ok"]
        task_status.started(client)
        await trio.sleep_forever()


async def test_late_subscriber_gets_the_reply_so_far_then_live_deltas(
    server: RunningServer,
) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    async with connect(server, owner.token) as first:
        assert (await first.request("subscribe", thread_id=thread_id))["ok"]
        services.publish(ThreadEvent(thread_id, "assistant.started", None, {"message_id": "m1"}))
        for i, text in enumerate(["Hel", "lo"]):
            services.publish(
                ThreadEvent(
                    thread_id,
                    "assistant.delta",
                    None,
                    {"message_id": "m1", "index": i, "text": text},
                )
            )
        await first.wait_events(3)
        async with connect(server, owner.token) as late:
            reply = await late.request("subscribe", thread_id=thread_id, after_seq=0)
            assert reply["data"]["replayed"] == 0
            services.publish(
                ThreadEvent(
                    thread_id,
                    "assistant.delta",
                    None,
                    {"message_id": "m1", "index": 2, "text": "!"},
                )
            )
            events = await late.wait_events(2)
            assert [(e["type"], e["data"].get("text")) for e in events] == [
                ("assistant.started", "Hello"),
                ("assistant.delta", "!"),
            ]


async def test_unsubscribe_stops_the_events(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    async with connect(server, owner.token) as client, connect(server, owner.token) as watcher:
        assert (await client.request("subscribe", thread_id=thread_id))["ok"]
        assert (await watcher.request("subscribe", thread_id=thread_id))["ok"]
        await post(services, owner, thread_id, "one")
        await client.wait_events(1)
        assert (await client.request("unsubscribe", thread_id=thread_id))["data"] == {}
        await post(services, owner, thread_id, "two")
        # Once the watcher has seq 2, the actor has fanned it out to every subscriber; a ping's
        # reply is queued after anything queued for the client before it.
        await watcher.wait_events(2)
        assert (await client.request("ping"))["ok"]
        assert [e["seq"] for e in client.events] == [1]
        hub = server.services.extras["realtime"].hub
        assert len(hub.actors[thread_id].subscribers) == 1


async def test_readyz_reports_the_actor_system(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    async with connect(server, owner.token) as client:
        assert (await client.request("subscribe", thread_id=thread_id))["ok"]
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            actors = (await http.get("/readyz")).json()["checks"]["actors"]
    assert actors["ok"] is True
    assert actors["supervised"]["hub"] == {"running": True, "restarts": 0}
    assert actors["hub"]["thread_actors"] == 1 and actors["hub"]["subscribers"] == 1
    assert actors["connections"] == {"open": 1}
