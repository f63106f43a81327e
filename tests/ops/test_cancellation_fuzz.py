"""Cancellation fuzz: requests and WebSocket ops abandoned at random points leave nothing behind.

Clients over raw sockets go away mid-request (half the headers, half the body), at a random
moment after a whole request (during authentication, the transaction, the commit or the
answer), mid-stream (a WebSocket watching a streaming reply), and with WebSocket ops in flight;
half of them close with a FIN, half with a RST. Afterwards: no pooled connection still in use
(``threadline_db_pool_connections{state="in_use"}``), no session ``idle in transaction`` and no
more backends than the pool may hold (``pg_stat_activity``), no 5xx, WebSocket gauge back to 0,
the server ready.

``make test`` abandons 500; ``make soak`` 10,000 (``THREADLINE_CANCEL_FUZZ_OPS``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psycopg
import trio

from server.auth import create_user_with_token
from server.llm.fake_server import open_fake_llm
from server.runtime import open_server
from tests.figures import record
from tests.llm.conftest import llm_settings

OPS = int(os.environ.get("THREADLINE_CANCEL_FUZZ_OPS", "500"))
CONCURRENCY = 40
POOL_MAX = 5


def _metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


def _frame(payload: dict[str, object]) -> bytes:
    """One masked client text frame."""
    data = json.dumps(payload).encode()
    mask = os.urandom(4)
    if len(data) < 126:
        header = bytes([0x81, 0x80 | len(data)])
    else:
        header = bytes([0x81, 0x80 | 126]) + struct.pack("!H", len(data))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class Fuzzer:
    """Abandons requests against one server; counts what it did."""

    def __init__(self, port: int, tokens: list[str], threads: list[str], seed: int) -> None:
        self.port = port
        self.tokens = tokens
        self.threads = threads
        self.rng = random.Random(seed)
        self.done: Counter[str] = Counter()
        self.modes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("rest_partial_headers", self.rest_partial_headers),
            ("rest_partial_body", self.rest_partial_body),
            ("rest_send_abandoned", self.rest_send_abandoned),
            ("rest_read_abandoned", self.rest_read_abandoned),
            ("ws_partial_handshake", self.ws_partial_handshake),
            ("ws_op_abandoned", self.ws_op_abandoned),
            ("ws_mid_stream", self.ws_mid_stream),
        ]

    async def run(self, count: int) -> None:
        limiter = trio.Semaphore(CONCURRENCY)

        async def one(name: str, fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server may close first: that is an outcome, not a failure
            finally:
                self.done[name] += 1
                limiter.release()

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                await limiter.acquire()
                name, fn = self.rng.choice(self.modes)
                nursery.start_soon(one, name, fn)

    # -- helpers -------------------------------------------------------------------------

    async def _open(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def _abandon(self, stream: trio.SocketStream) -> None:
        """Close with a FIN or, half the time, a RST (SO_LINGER 0)."""
        if self.rng.random() < 0.5:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    def _delay(self) -> float:
        return self.rng.uniform(0, 0.03)

    def _headers(self, method: str, path: str, length: int | None = None) -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            f"Authorization: Bearer {self.rng.choice(self.tokens)}",
        ]
        if length is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {length}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _send_body(self, reply: bool) -> bytes:
        return json.dumps(
            {
                "content": "fuzz " + uuid.uuid4().hex,
                "client_msg_id": uuid.uuid4().hex,
                "reply": reply,
            }
        ).encode()

    async def _ws_open(self) -> trio.SocketStream:
        stream = await self._open()
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {self.rng.choice(self.tokens)}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        seen = b""
        while b"\r\n\r\n" not in seen:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise OSError("closed during the handshake")
            seen += chunk
        if not seen.startswith(b"HTTP/1.1 101"):
            raise OSError("handshake refused")
        return stream

    # -- the ways to go away -------------------------------------------------------------

    async def rest_partial_headers(self) -> None:
        stream = await self._open()
        wire = self._headers("POST", f"/api/v1/threads/{self.rng.choice(self.threads)}/messages")
        await stream.send_all(wire[: self.rng.randrange(1, len(wire) - 4)])
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def rest_partial_body(self) -> None:
        stream = await self._open()
        body = self._send_body(reply=False)
        path = f"/api/v1/threads/{self.rng.choice(self.threads)}/messages"
        await stream.send_all(self._headers("POST", path, len(body)))
        await stream.send_all(body[: self.rng.randrange(0, len(body) - 1)])
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def rest_send_abandoned(self) -> None:
        stream = await self._open()
        body = self._send_body(reply=self.rng.random() < 0.3)
        path = f"/api/v1/threads/{self.rng.choice(self.threads)}/messages"
        await stream.send_all(self._headers("POST", path, len(body)) + body)
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def rest_read_abandoned(self) -> None:
        stream = await self._open()
        path = f"/api/v1/threads/{self.rng.choice(self.threads)}/messages?limit=200"
        await stream.send_all(self._headers("GET", path))
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def ws_partial_handshake(self) -> None:
        stream = await self._open()
        wire = f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
        await stream.send_all(wire.encode()[: self.rng.randrange(1, len(wire))])
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def ws_op_abandoned(self) -> None:
        stream = await self._ws_open()
        thread_id = self.rng.choice(self.threads)
        op = self.rng.choice(
            [
                {
                    "op": "send",
                    "ref": "s",
                    "thread_id": thread_id,
                    "content": "ws fuzz",
                    "client_msg_id": uuid.uuid4().hex,
                    "reply": self.rng.random() < 0.3,
                },
                {"op": "subscribe", "ref": "b", "thread_id": thread_id, "after_seq": 0},
                {"op": "ping", "ref": "p"},
                {"op": "cancel", "ref": "c", "thread_id": thread_id},
            ]
        )
        await stream.send_all(_frame(op))
        await trio.sleep(self._delay())
        await self._abandon(stream)

    async def ws_mid_stream(self) -> None:
        stream = await self._ws_open()
        thread_id = self.rng.choice(self.threads)
        await stream.send_all(_frame({"op": "subscribe", "ref": "b", "thread_id": thread_id}))
        await stream.send_all(
            _frame(
                {
                    "op": "send",
                    "ref": "s",
                    "thread_id": thread_id,
                    "content": "stream please",
                    "client_msg_id": uuid.uuid4().hex,
                    "reply": True,
                }
            )
        )
        seen = b""
        with trio.move_on_after(2):
            while b"assistant.delta" not in seen:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                seen += chunk[-200:]
        await self._abandon(stream)


def _database_at_rest(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM pg_stat_activity WHERE application_name = 'threadline'"
            " GROUP BY state"
        ).fetchall()
    return {str(state): int(count) for state, count in rows}


async def test_abandoned_requests_leave_nothing_behind(tmp_path: Path, pg_dsn: str) -> None:
    async with open_fake_llm() as fake:
        fake.configure(tokens=30, delay_per_token_ms=5)
        settings = llm_settings(
            tmp_path,
            fake,
            db_pool_min=2,
            db_pool_max=POOL_MAX,
            rate_limit_per_s=100_000.0,
            rate_limit_burst=100_000,
            ip_rate_limit_per_s=100_000.0,
            ip_rate_limit_burst=100_000,
        )
        async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
            tokens, threads = [], []
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
                for _ in range(4):
                    _, token = await create_user_with_token(running.services)
                    tokens.append(token)
                    headers = {"Authorization": f"Bearer {token}"}
                    project = (
                        await http.post("/api/v1/projects", json={"name": "fuzz"}, headers=headers)
                    ).json()
                    for _ in range(3):
                        thread = await http.post(
                            f"/api/v1/projects/{project['id']}/threads",
                            json={"title": "fuzz"},
                            headers=headers,
                        )
                        threads.append(thread.json()["id"])
                # Each user can only reach their own threads: a wrong pairing is a 404,
                # which is one more way for a request to end.
                before = (await http.get("/metrics")).text
                port = int(running.url.rsplit(":", 1)[1])
                fuzzer = Fuzzer(port, tokens, threads, seed=12)
                started = trio.current_time()
                await fuzzer.run(OPS)
                fuzz_s = trio.current_time() - started

                # Settle: replies finish, cancelled handlers clean up. Then nothing is in use.
                settle_started = trio.current_time()
                with trio.fail_after(60):
                    while True:
                        text = (await http.get("/metrics")).text
                        in_use = _metric(text, "threadline_db_pool_connections", 'state="in_use"')
                        sockets = _metric(text, "threadline_ws_connections")
                        states = await trio.to_thread.run_sync(_database_at_rest, pg_dsn)
                        if (
                            in_use == 0
                            and sockets == 0
                            and fake.stats.in_flight == 0
                            and not states.get("idle in transaction")
                            and not states.get("active")
                        ):
                            break
                        await trio.sleep(0.2)  # poll interval
                settle_s = trio.current_time() - settle_started
                ready = await http.get("/readyz")
                errors_5xx = _metric(text, "threadline_http_requests_total", 'status="5') - (
                    _metric(before, "threadline_http_requests_total", 'status="5')
                )
            backends = sum(states.values())
            discarded = running.services.db.terminated_on_cancel
    record(
        f"cancellation fuzz ({OPS} abandoned)",
        modes=dict(fuzzer.done),
        fuzz_s=round(fuzz_s, 1),
        settle_s=round(settle_s, 2),
        connections_discarded_on_cancel=discarded,
        backends_after=backends,
        http_5xx=errors_5xx,
    )
    assert sum(fuzzer.done.values()) == OPS and len(fuzzer.done) == len(fuzzer.modes)
    assert ready.status_code == 200, ready.text
    assert backends <= POOL_MAX, states
    assert errors_5xx == 0
