"""The frame path over loopback: one frame's bytes shared by every subscriber, written straight
to the socket; the outbound queue bounded in bytes (a stalled client is closed 4002 whatever
its frames' sizes, and the others never notice)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, TextMessage
from wsproto.events import Request as WSRequest

from actors.connection import Connection
from actors.thread import encode
from server import metrics
from server.events import ThreadEvent
from server.runtime import RunningServer
from tests.server.ws_support import connect, new_owner, new_thread, realtime, server_with, until


class RawClient:
    """A WebSocket client on a raw socket: sees the exact bytes of every server frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.raw = bytearray()
        self._partial = ""

    @classmethod
    async def open(cls, server: RunningServer, token: str, rcvbuf: int | None = None) -> RawClient:
        host, port = server.url.removeprefix("http://").split(":")
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, int(port)))
        client = cls(trio.SocketStream(sock))
        await client.stream.send_all(
            client.ws.send(
                WSRequest(
                    host=f"{host}:{port}",
                    target="/ws",
                    extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                )
            )
        )
        with trio.fail_after(10):
            while True:
                client.ws.receive_data(await client.stream.receive_some(65536))
                if any(isinstance(e, AcceptConnection) for e in client.ws.events()):
                    return client

    async def subscribe(self, thread_id: str, wait: bool = True) -> None:
        frame = json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id})
        await self.stream.send_all(self.ws.send(TextMessage(data=frame)))
        if wait:
            with trio.fail_after(10):
                while not any(json.loads(t)["op"] == "reply" for t in await self.texts()):
                    pass
            self.raw.clear()

    async def texts(self) -> list[str]:
        """Read once; the text messages in what arrived (raw bytes kept in ``raw``)."""
        data = await self.stream.receive_some(65536)
        assert data, "the server closed the connection"
        self.raw += data
        self.ws.receive_data(data)
        out = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self._partial += event.data
                if event.message_finished:
                    out.append(self._partial)
                    self._partial = ""
            elif isinstance(event, Ping):
                await self.stream.send_all(self.ws.send(event.response()))
        return out


def stalled_connections(server: RunningServer, before: set[int]) -> list[Connection]:
    return [c for c in realtime(server).connections if c.id not in before]


async def test_every_subscriber_gets_the_same_bytes_for_a_shared_frame(
    tmp_path: Path, pg_dsn: str
) -> None:
    # Pings every 20 ms interleave with the burst: a frame split by anything would not parse.
    async with server_with(
        tmp_path, pg_dsn, heartbeat_interval_s=0.02, heartbeat_timeout_s=10
    ) as server:
        services = server.services
        owner = await new_owner(services)
        thread_id = await new_thread(services, owner)
        clients = [await RawClient.open(server, owner.token) for _ in range(4)]
        for client in clients:
            await client.subscribe(thread_id)
        events = [
            ThreadEvent(
                thread_id,
                "assistant.delta",
                None,
                {"message_id": "m", "index": i, "text": "é✓ " * (20 + 3000 * (i % 3))},
            )
            for i in range(30)
        ]
        for event in events:
            services.publish(event)
        expected = b"".join(encode(event).data for event in events)
        for client in clients:
            texts: list[str] = []
            with trio.fail_after(20):
                while len(texts) < len(events):
                    texts += await client.texts()
            assert [json.loads(t)["data"]["index"] for t in texts] == list(range(30))
        # Same bytes, byte for byte, for every subscriber (pings aside): the frames as encoded once.
        for client in clients:
            assert strip_control_frames(bytes(client.raw)) == expected
            await client.stream.aclose()


def strip_control_frames(data: bytes) -> bytes:
    """``data`` without the Ping frames the heartbeat sent in between."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        n = data[pos + 1] & 0x7F
        head = 2 if n < 126 else 4 if n == 126 else 10
        if n == 126:
            n = int.from_bytes(data[pos + 2 : pos + 4], "big")
        elif n == 127:
            n = int.from_bytes(data[pos + 2 : pos + 10], "big")
        if data[pos] & 0x0F != 0x9:
            out += data[pos : pos + head + n]
        pos += head + n
    return bytes(out)


async def _stalled_run(server: RunningServer, text_size: int, bound: int) -> None:
    """One stalled client and one healthy one; events of ``text_size`` until the verdict."""
    services = server.services
    owner = await new_owner(services)
    thread_id = await new_thread(services, owner)
    before = {c.id for c in realtime(server).connections}
    slow_before = metrics.WS_DISCONNECTS.labels(reason="slow_consumer")._value.get()
    stalled = await RawClient.open(server, owner.token, rcvbuf=4096)
    await stalled.subscribe(thread_id)  # and never reads again
    (conn,) = stalled_connections(server, before)
    peak = 0
    async with connect(server, owner.token) as healthy:
        assert (await healthy.request("subscribe", thread_id=thread_id))["ok"]
        sent = 0
        with trio.fail_after(60):
            while conn.close_code is None:
                services.publish(
                    ThreadEvent(
                        thread_id,
                        "assistant.delta",
                        None,
                        {"message_id": "m", "index": sent, "text": "x" * text_size},
                    )
                )
                sent += 1
                peak = max(peak, conn.queued_bytes)
                if sent % 8 == 0:
                    await healthy.wait_events(sent, timeout=20)  # the others keep up
        assert conn.close_code == 4002 and conn.close_reason == "slow_consumer"
        # Never more than the bound queued (plus, at most, one frame into an empty queue).
        assert peak <= bound + text_size + 100, (peak, bound)
        # The healthy client got every event, in order, and is still served.
        await healthy.wait_events(sent, timeout=20)
        assert [e["data"]["index"] for e in healthy.events] == list(range(sent))
        assert (await healthy.request("ping"))["ok"]
    await until(
        lambda: metrics.WS_DISCONNECTS.labels(reason="slow_consumer")._value.get() > slow_before
    )
    await until(lambda: conn not in realtime(server).connections)
    await stalled.stream.aclose()


async def test_byte_bound_drops_a_stalled_client_fed_large_frames(
    tmp_path: Path, pg_dsn: str
) -> None:
    bound = 256 * 1024
    # The frame bound is far away: only the byte bound can end this client.
    async with server_with(
        tmp_path, pg_dsn, ws_outbound_queue=100_000, ws_outbound_queue_bytes=bound
    ) as server:
        await _stalled_run(server, 50_000, bound)


async def test_byte_bound_drops_a_stalled_client_fed_small_frames(
    tmp_path: Path, pg_dsn: str
) -> None:
    bound = 64 * 1024
    async with server_with(
        tmp_path, pg_dsn, ws_outbound_queue=100_000, ws_outbound_queue_bytes=bound
    ) as server:
        await _stalled_run(server, 300, bound)


async def test_a_stalled_client_reads_whole_frames_then_its_close_code(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Frames half written when the queue overflowed are completed before the close frame."""
    async with server_with(tmp_path, pg_dsn, ws_outbound_queue_bytes=128 * 1024) as server:
        services = server.services
        owner = await new_owner(services)
        thread_id = await new_thread(services, owner)
        before = {c.id for c in realtime(server).connections}
        client = await RawClient.open(server, owner.token, rcvbuf=4096)
        await client.subscribe(thread_id)
        (conn,) = stalled_connections(server, before)
        with trio.fail_after(30):
            index = 0
            while conn.close_code is None:
                services.publish(
                    ThreadEvent(
                        thread_id, "assistant.delta", None, {"index": index, "t": "y" * 7001}
                    )
                )
                index += 1
                if index % 16 == 0:
                    await trio.sleep(0)
        # Now drain: every frame parses, indexes are consecutive, and the close code comes last.
        seen: list[int] = []
        closed: CloseConnection | None = None
        partial = ""
        with trio.fail_after(20):
            while closed is None:
                data = await client.stream.receive_some(65536)
                assert data, "aborted before the close frame"
                client.ws.receive_data(data)
                for event in client.ws.events():
                    if isinstance(event, TextMessage):
                        assert closed is None
                        partial += event.data
                        if event.message_finished:
                            seen.append(json.loads(partial)["data"]["index"])
                            partial = ""
                    elif isinstance(event, CloseConnection):
                        closed = event
        assert closed.code == 4002 and closed.reason == "slow_consumer"
        assert seen == list(range(len(seen))) and seen
        await client.stream.aclose()
