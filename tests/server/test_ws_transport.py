"""WebSocket transport limits over loopback: slow consumers, oversized frames, abuse,
heartbeats through the hypercorn extension, and no state left behind by many connections."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping
from wsproto.events import Request as WSRequest
from wsproto.extensions import PerMessageDeflate

from server import metrics
from server.auth import decode_access_token, issue_token
from server.events import ThreadEvent
from server.runtime import RunningServer
from tests.server.ws_support import (
    connect,
    new_owner,
    new_thread,
    post,
    realtime,
    server_with,
    until,
    ws_url,
)


def disconnects(reason: str) -> float:
    return metrics.WS_DISCONNECTS.labels(reason=reason)._value.get()


async def test_stalled_client_is_closed_4002_and_others_keep_receiving(
    tmp_path: Path, pg_dsn: str
) -> None:
    # The frame bound on its own (the byte bound has tests of its own in test_ws_frames.py):
    # the healthy client here reads in the server's own process, 60 KB frames at ~24 MB/s.
    async with server_with(
        tmp_path, pg_dsn, ws_outbound_queue=128, ws_outbound_queue_bytes=64 << 20
    ) as server:
        services = server.services
        owner = await new_owner(services)
        thread_id = await new_thread(services, owner)
        before = disconnects("slow_consumer")
        headers = [("Authorization", f"Bearer {owner.token}")]
        # Two stalled clients: one resumes reading after the verdict, one never does.
        async with (
            open_websocket_url(ws_url(server), extra_headers=headers) as resumes,
            open_websocket_url(ws_url(server), extra_headers=headers) as never,
            connect(server, owner.token) as healthy,
        ):
            for ws in (resumes, never):
                await ws.send_message(
                    json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id})
                )
                assert json.loads(await ws.get_message())["ok"]
            assert (await healthy.request("subscribe", thread_id=thread_id))["ok"]
            by_id = sorted(realtime(server).connections, key=lambda c: c.id)
            stalled = by_id[:2]  # opened first, in this order
            stalled_ids = {c.id for c in stalled}
            # A burst of large events: far more than the stalled clients' socket buffers hold.
            big = "x" * 60_000
            burst = 300
            started = trio.current_time()
            for i in range(burst):
                services.publish(
                    ThreadEvent(
                        thread_id,
                        "assistant.delta",
                        None,
                        {"message_id": "m", "index": i, "text": big},
                    )
                )
                if i % 4 == 3:
                    await trio.sleep(0.01)  # a publisher's pace, not a wait for a condition
            await healthy.wait_events(burst, timeout=20)
            healthy_done = trio.current_time() - started
            assert healthy_done < 10, healthy_done
            # The server's verdict on both stalled clients (their close is now pending).
            await until(lambda: all(c.close_code == 4002 for c in stalled))
            # The one that drains its socket finds the 4002 close frame after the frames.
            with trio.fail_after(10):
                try:
                    while True:
                        await resumes.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 4002
            # The one that never reads is aborted; nothing of either is left on the server.
            await until(lambda: disconnects("slow_consumer") - before == 2)
            await until(lambda: not ({c.id for c in realtime(server).connections} & stalled_ids))
            assert [c for c in realtime(server).hub.actors[thread_id].subscribers] == [
                c for c in realtime(server).connections
            ]
            # And the healthy client still gets durable events, in order.
            message = await post(services, owner, thread_id, "after the storm")
            await healthy.wait_for(lambda: any(e["seq"] == message["seq"] for e in healthy.events))


async def test_oversized_frame_closes_1009(server: RunningServer) -> None:
    owner = await new_owner(server.services)
    before = disconnects("too_large")
    async with connect(server, owner.token) as client:
        await client.ws.send_message(json.dumps({"op": "ping", "ref": "x", "pad": "y" * 70_000}))
        assert (await client.wait_closed())[0] == 1009
    await until(lambda: disconnects("too_large") - before == 1)
    await until(lambda: not realtime(server).connections)


async def test_rate_limit_refusals_then_4029(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(
        tmp_path, pg_dsn, rate_limit_per_s=1, rate_limit_burst=5, ws_abuse_strikes=10
    ) as server:
        owner = await new_owner(server.services)
        limited = metrics.RATE_LIMITED.labels(transport="ws")._value.get()
        async with connect(server, owner.token) as client:
            for i in range(30):
                with contextlib.suppress(ConnectionClosed):
                    await client.ws.send_message(json.dumps({"op": "ping", "ref": f"p{i}"}))
            code, _ = await client.wait_closed()
            replies = [r for r in client._replies.values()]
        assert code == 4029
        refusals = [r for r in replies if not r["ok"]]
        assert refusals and all(r["error"]["code"] == "rate_limited" for r in refusals)
        assert all("retry_after_s" in r["error"]["details"] for r in refusals)
        assert sum(r["ok"] for r in replies) <= 6
        assert metrics.RATE_LIMITED.labels(transport="ws")._value.get() - limited >= 10


async def test_handshakes_are_rate_limited_per_ip_with_retry_after(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with server_with(
        tmp_path, pg_dsn, ip_rate_limit_per_s=0.01, ip_rate_limit_burst=3
    ) as server:
        limited = metrics.RATE_LIMITED.labels(transport="ws")._value.get()
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            answers = [await http.get("/ws", headers=upgrade) for _ in range(5)]
        assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]
        refused = answers[-1]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.json()["error"]["request_id"] == refused.headers["X-Request-ID"]
        assert metrics.RATE_LIMITED.labels(transport="ws")._value.get() - limited == 2


async def test_heartbeat_pings_go_out_and_pongs_come_back(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(
        tmp_path, pg_dsn, heartbeat_interval_s=0.05, heartbeat_timeout_s=5
    ) as server:
        owner = await new_owner(server.services)
        async with connect(server, owner.token) as client:
            await until(lambda: len(realtime(server).connections) == 1)
            (conn,) = realtime(server).connections
            await until(lambda: conn.heartbeat.pongs >= 3)
            assert (await client.request("ping"))["ok"]
            assert conn.close_code is None


async def test_thousand_connections_leave_nothing_behind(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(
        tmp_path,
        pg_dsn,
        thread_idle_timeout_s=0.2,
        rate_limit_per_s=1e6,
        rate_limit_burst=1_000_000,
        ip_rate_limit_per_s=1e6,
        ip_rate_limit_burst=1_000_000,
    ) as server:
        await _thousand_cycles(server)


async def _thousand_cycles(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    threads = [await new_thread(services, owner) for _ in range(5)]
    url = ws_url(server)
    headers = [("Authorization", f"Bearer {owner.token}")]
    hub = realtime(server).hub
    opened: list[weakref.ref[Any]] = []

    async def cycle(i: int) -> None:
        async with open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(
                json.dumps(
                    {"op": "subscribe", "ref": "s", "thread_id": threads[i % 5], "after_seq": 0}
                )
            )
            assert json.loads(await ws.get_message())["ok"]
            opened.extend(weakref.ref(conn) for conn in realtime(server).connections)

    async def worker(start: int) -> None:
        for i in range(start, 1000, 20):
            await cycle(i)

    async with trio.open_nursery() as nursery:
        for w in range(20):
            nursery.start_soon(worker, w)
    await until(lambda: not realtime(server).connections)
    assert not realtime(server).tokens
    # A closed connection is freed at once: nothing (a timer for its token's expiry, say) keeps
    # its ~30 KiB alive after it is gone.
    gc.collect()
    assert len(opened) >= 1000 and not [ref for ref in opened if ref() is not None]
    await until(lambda: all(not a.subscribers for a in hub.actors.values()))
    assert hub.spawned >= 5
    # Idle actors then stop on their own (idle timeout 0.2 s here).
    await until(lambda: not hub.actors)
    assert hub.health()["subscribers"] == 0


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    server: RunningServer,
) -> None:
    """A closed WebSocket leaves no reference cycle among the server's objects for it (ours,
    hypercorn's, wsproto's): reference counting frees them as it ends. With 10,000 connections
    open a full collection stalls the process for a second or more; closed connections must not
    be what makes one necessary, nor wait for one to give their memory back."""
    owner = await new_owner(server.services)
    thread_id = await new_thread(server.services, owner)
    gc.collect()
    gc.disable()  # so that only reference counting can free anything below
    try:
        async with connect(server, owner.token) as client:
            assert (await client.request("subscribe", thread_id=thread_id))["ok"]
            (conn,) = realtime(server).connections
            control = conn.transport.control
            assert control is not None and control._tcp is not None
            refs = [weakref.ref(o) for o in (conn, control, control._tcp, control._stream)]
            del conn, control
        await until(lambda: not realtime(server).connections)
        await until(lambda: all(ref() is None for ref in refs), timeout=10)
    finally:
        gc.enable()


async def test_permessage_deflate_is_declined(server: RunningServer) -> None:
    owner = await new_owner(server.services)
    host, port = server.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(
        ws.send(
            WSRequest(
                host=f"{host}:{port}",
                target="/ws",
                extensions=[PerMessageDeflate()],
                extra_headers=[(b"authorization", f"Bearer {owner.token}".encode())],
            )
        )
    )
    accepted: list[AcceptConnection] = []
    with trio.fail_after(10):
        while not accepted:
            ws.receive_data(await stream.receive_some(65536))
            accepted = [e for e in ws.events() if isinstance(e, AcceptConnection)]
    assert accepted[0].extensions == []
    await stream.aclose()


async def test_client_that_never_pongs_is_closed_4003(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(
        tmp_path, pg_dsn, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3
    ) as server:
        owner = await new_owner(server.services)
        before = disconnects("heartbeat_timeout")
        host, port = server.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        # wsproto answers pings only when asked to; this client reads but never answers.
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(
                WSRequest(
                    host=f"{host}:{port}",
                    target="/ws",
                    extra_headers=[(b"authorization", f"Bearer {owner.token}".encode())],
                )
            )
        )
        pings = 0
        closed: CloseConnection | None = None
        with trio.fail_after(10):
            while closed is None:
                data = await stream.receive_some(65536)
                assert data, "the server dropped the connection without a close frame"
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Ping):
                        pings += 1
                    elif isinstance(event, CloseConnection):
                        closed = event
        assert closed.code == 4003 and closed.reason == "heartbeat_timeout"
        assert pings >= 1
        await stream.aclose()
        await until(lambda: disconnects("heartbeat_timeout") - before == 1)


async def test_close_token_ends_only_that_tokens_sockets(server: RunningServer) -> None:
    services = server.services
    owner = await new_owner(services)
    other_token = await issue_token(services, owner.principal.user_id)
    jti = decode_access_token(services.settings, owner.token)["jti"]
    before = disconnects("token_revoked")
    async with connect(server, owner.token) as revoked, connect(server, other_token) as kept:
        assert (await revoked.request("ping"))["ok"] and (await kept.request("ping"))["ok"]
        assert realtime(server).close_token(jti) == 1
        assert await revoked.wait_closed() == (4001, "token_revoked")
        assert (await kept.request("ping"))["ok"]
    await until(lambda: disconnects("token_revoked") - before == 1)
    await until(lambda: not realtime(server).tokens)


async def test_logout_closes_the_sockets_opened_with_that_token(server: RunningServer) -> None:
    owner = await new_owner(server.services)
    async with (
        connect(server, owner.token) as client,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        assert (await client.request("ping"))["ok"]
        response = await http.post(
            "/api/v1/auth/logout", headers={"Authorization": f"Bearer {owner.token}"}
        )
        assert response.status_code == 204
        assert await client.wait_closed() == (4001, "token_revoked")


async def test_invalid_frames_are_rate_limited_too(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(
        tmp_path, pg_dsn, rate_limit_per_s=1, rate_limit_burst=5, ws_abuse_strikes=10
    ) as server:
        owner = await new_owner(server.services)
        async with connect(server, owner.token) as client:
            for _ in range(30):
                with contextlib.suppress(ConnectionClosed):
                    await client.ws.send_message("{garbage")
            assert (await client.wait_closed())[0] == 4029
