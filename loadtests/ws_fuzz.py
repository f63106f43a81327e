"""Hostile WebSocket input over raw sockets, against a ``threadline serve`` subprocess.

No WebSocket library on the client side: every frame is built by hand, so it can be wrong in
every way RFC 6455 forbids. Each case opens one connection (authenticated by a bearer token),
sends its hostile frames and waits for the outcome it must get:

* a protocol violation (reserved bits, unknown opcodes, unmasked frames, oversized or fragmented
  control frames, stray continuations, invalid close codes, lying lengths) -> close 1002;
* invalid UTF-8 in a text frame or a close reason -> close 1007;
* a message over the size limit, whatever its framing -> close 1009;
* a frame that stalls mid-way -> the heartbeat closes it 4003 (it cannot pong mid-frame);
* a frame announcing more than it sends, then EOF -> the stream is dropped;
* ops with wrong types, huge numbers, deep nesting, NUL bytes, junk JSON, ping floods,
  legal fragmentation -> error replies (or pongs), and the connection lives on: a ``ping`` op
  is answered afterwards and a clean close is echoed with 1000;
* half-finished handshakes (partial upgrade request, upgrade then gone, refused upgrades) ->
  nothing left behind.

Every outcome must arrive within 5 s of the last hostile frame. Meanwhile ``/readyz`` is polled
and must stay 200; afterwards the server's RSS growth (after a warm-up round), its sockets in
CLOSE_WAIT, its open WebSocket count and its error log lines are read.

    .venv/bin/python loadtests/ws_fuzz.py --rounds 40     # prints the figures as JSON

``tests/server/test_ws_fuzz.py`` runs a quick version in ``make test``; ``make soak`` a long one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUTCOME_TIMEOUT_S = 5.0
MAX_MESSAGE = 64 * 1024  # the server's THREADLINE_WS_MAX_MESSAGE_BYTES in the fuzz run

# Opcodes (RFC 6455 section 5.2).
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
ALIVE = "alive"  # the expectation of a case after which the connection must still serve
DROPPED = "dropped"  # the stream ended without a close frame


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame; ``length`` overrides the announced payload length (a lie)."""
    announced = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        head.append(mask_bit | announced)
    elif announced < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", announced)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", announced)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(payload: str | bytes, **kw: Any) -> bytes:
    return frame(TEXT, payload.encode() if isinstance(payload, str) else payload, **kw)


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def op(**fields: Any) -> bytes:
    return text(json.dumps(fields))


@dataclass
class Case:
    """One connection's hostile frames and the outcome they must get."""

    kind: str
    frames: list[bytes]
    expect: frozenset[int | str]
    half_close: bool = False  # shut our write side after the frames (a lying length, then EOF)
    answer_pings: bool = True  # False when a frame is left half-sent on the wire
    pongs: int = 0  # pongs the server must answer with (ping floods)
    replies: int = 0  # replies owed before the liveness check's (one per message sent)

    @property
    def hostile(self) -> int:
        return len(self.frames)


def _invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(
        [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
    )
    return b'{"op": "ping", "x": "' + bad + b'"}'


def _junk_ops(rng: random.Random, thread_id: str) -> list[bytes]:
    """Ops with wrong types, huge numbers, deep nesting, NUL bytes and non-objects."""
    wrong_types: list[dict[str, Any]] = [
        {"op": 5},
        {"op": ["send"]},
        {"op": None, "ref": {}},
        {"op": "send", "ref": 7, "thread_id": 5, "content": ["x"]},
        {"op": "send", "thread_id": thread_id, "content": {"a": 1}, "client_msg_id": 3},
        {"op": "send", "thread_id": thread_id, "content": "x", "reply": "maybe"},
        {"op": "subscribe", "thread_id": {"$ne": None}},
        {"op": "subscribe", "thread_id": thread_id, "after_seq": -1},
        {"op": "subscribe", "thread_id": thread_id, "after_seq": "1; DROP TABLE users"},
        {"op": "subscribe", "thread_id": thread_id, "after_seq": 10**30},
        {"op": "subscribe", "thread_id": thread_id, "after_seq": 1.5},
        {"op": "edit", "message_id": thread_id, "content": "x", "expected_version": 2**70},
        {"op": "edit", "message_id": "", "content": "", "expected_version": "1"},
        {"op": "delete", "message_id": [thread_id], "expected_version": True},
        {"op": "cancel", "thread_id": 1e308},
        {"op": "unsubscribe"},
        {"op": "x" * 5000},
        {"op": "send", "thread_id": thread_id, "content": "a\u0000b", "reply": False},
        {"op": "send", "thread_id": "\u0000", "content": "x"},
        {"op": "subscribe", "thread_id": "00000000-0000-0000-0000-00000000000\u0000"},
        {"op": "send", "thread_id": thread_id, "content": "", "reply": False},
        {"op": "send", "thread_id": thread_id, "content": "x" * 40_000, "reply": False},
    ]
    raw: list[bytes] = [text(json.dumps(item)) for item in wrong_types]
    depth = rng.randint(100, 5000)
    raw += [
        text('{"op": "ping", "x": ' + "[" * depth + "]" * depth + "}"),
        text('{"op": "ping", "x": ' + '{"a":' * 200 + "1" + "}" * 200 + "}"),
        text('{"op": "ping", "x": ' + "9" * rng.randint(41, 20_000) + "}"),
        text('{"op": "ping", "x": -' + "1" * 5000 + ".5e99999}"),
        text('{"op": "ping", "x": NaN}'),
        text('{"op": "ping", "x": Infinity}'),
        text(b'{"op": "ping"\x00}'),
        text(b"\x00" * rng.randint(1, 100)),
        text(""),
        text("[]"),
        text('"ping"'),
        text("null"),
        text("{" * 10),
        text(bytes(rng.randrange(0x20, 0x7F) for _ in range(rng.randint(1, 300)))),
        frame(BINARY, os.urandom(rng.randint(1, 300))),
        frame(BINARY, b'{"op": "ping", "ref": "bin"}'),
    ]
    rng.shuffle(raw)
    return raw


def make_cases(rng: random.Random, thread_id: str, heartbeat_stalls: bool) -> list[Case]:
    """One round: every kind of hostile input once, with random details."""
    c: list[Case] = []
    p1002 = frozenset({1002})

    def add(kind: str, frames: list[bytes], expect: frozenset[int | str], **kw: Any) -> None:
        c.append(Case(kind, frames, expect, **kw))

    ping = json.dumps({"op": "ping"})
    add("reserved_bits", [text(ping, rsv=rng.choice([1, 2, 4, 3, 7]))], p1002)
    add(
        "unknown_opcode", [frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x")], p1002
    )
    add("unmasked", [text(ping, mask=False)], p1002)
    add("oversized_control", [frame(PING, os.urandom(rng.randint(126, 400)))], p1002)
    add("fragmented_control", [frame(rng.choice([PING, PONG, CLOSE]), b"ab", fin=False)], p1002)
    add("stray_continuation", [frame(CONT, b'{"op":"ping"}')], p1002)
    add("new_message_inside_fragmented", [text('{"op":', fin=False), text('"ping"}')], p1002)
    add("invalid_utf8_text", [text(_invalid_utf8(rng))], frozenset({1007}))
    add(
        "invalid_utf8_fragmented",
        [text(b'{"op": "\xe2\x82', fin=False), frame(CONT, b"\xff\xfe")],
        frozenset({1007}),
    )
    add("invalid_utf8_close_reason", [close_frame(1000, b"bye \xff\xfe")], frozenset({1007}))
    bad_code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
    add("invalid_close_code", [close_frame(bad_code)], p1002)
    add("close_payload_one_byte", [frame(CLOSE, b"\x03")], p1002)
    add(
        "length_msb_set",
        [text(b"x" * 10, length=(1 << 63) + rng.randint(0, 1000))],
        frozenset({1002, 1009, DROPPED}),
    )
    # Announces fewer bytes than it sends: what follows is read as a frame header with RSV bits.
    add("length_short", [text(b'{"op":"ping"}', length=5)[:-8] + b'\xff\xff{"op":"ping"}'], p1002)
    add(
        "length_huge_body_over_limit",
        [frame(TEXT, b"a" * (MAX_MESSAGE + 1024), length=rng.choice([1 << 32, 1 << 40]))],
        frozenset({1009}),
    )
    add(
        "length_long_then_eof",
        [text(b'{"op":"ping"}', length=rng.randint(100, 60_000))],
        frozenset({DROPPED, 1000, 1002}),
        half_close=True,
    )
    if heartbeat_stalls:
        add(
            "length_long_then_stall",
            [text(b'{"op":"ping"}', length=rng.randint(100, 60_000))],
            frozenset({4003, DROPPED}),
            answer_pings=False,
        )
    add(
        "message_over_limit", [text(b"x" * (MAX_MESSAGE + rng.randint(1, 4096)))], frozenset({1009})
    )
    chunk = b"y" * 16_384
    add(
        "fragments_over_limit",
        [text(chunk, fin=False)]
        + [frame(CONT, chunk, fin=False) for _ in range(4)]
        + [frame(CONT, chunk)],
        frozenset({1009}),
    )
    flood = rng.randint(50, 200)
    add(
        "ping_flood",
        [frame(PING, os.urandom(rng.randint(0, 125))) for _ in range(flood)],
        frozenset({ALIVE}),
        pongs=flood,
    )
    add("unsolicited_pongs", [frame(PONG, os.urandom(8)) for _ in range(20)], frozenset({ALIVE}))
    junk = _junk_ops(rng, thread_id)
    add("junk_ops", junk, frozenset({ALIVE}), replies=len(junk))
    add(
        "legal_fragmentation_with_ping_inside",
        [text('{"op": "pi', fin=False), frame(PING, b"mid"), frame(CONT, b'ng", "ref": "f"}')],
        frozenset({ALIVE}),
        pongs=1,
        replies=1,
    )
    app_code = rng.randint(3000, 4999)
    add("valid_app_close_code", [close_frame(app_code, b"ok")], frozenset({app_code}))
    add("close_without_code", [close_frame(None)], frozenset({1005}))
    return c


# -- the raw client ------------------------------------------------------------------------------


class Peer:
    """One raw WebSocket connection: handshake, send bytes, read server frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.messages: list[bytes] = []
        self.pongs = 0
        self.close_code: int | None = None
        self.eof = False
        self.reset = False  # the stream ended with a reset (unread data may have been lost)
        self.answer_pings = True
        self._pending_pong: bytes | None = None

    @classmethod
    async def open(cls, host: str, port: int, token: str) -> Peer:
        stream = await trio.open_tcp_stream(host, port)
        peer = cls(stream)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in peer.buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("handshake: connection closed")
            peer.buffer += chunk
        head, _, rest = bytes(peer.buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head[:40]!r}")
        peer.buffer = bytearray(rest)
        return peer

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def _parse(self) -> bool:
        """Consume one complete server frame from the buffer; False if none is complete."""
        buf = self.buffer
        if len(buf) < 2:
            return False
        opcode, length, at = buf[0] & 0xF, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return False
            length, at = struct.unpack("!H", buf[2:4])[0], 4
        elif length == 127:
            if len(buf) < 10:
                return False
            length, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + length:
            return False
        payload = bytes(buf[at : at + length])
        del buf[: at + length]
        if opcode in (TEXT, BINARY):
            self.messages.append(payload)
        elif opcode == PONG:
            self.pongs += 1
        elif opcode == PING and self.answer_pings:
            self._pending_pong = frame(PONG, payload)
        elif opcode == CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        return True

    async def read_until(self, predicate: Any) -> None:
        """Read frames until ``predicate()`` or the stream ends (EOF/reset)."""
        while not predicate():
            while self._parse():
                pong = self._pending_pong
                if pong is not None:
                    self._pending_pong = None
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.stream.send_all(pong)
                if predicate():
                    return
            if self.eof:
                return
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
                self.reset = True
            if not chunk:
                self.eof = True
            self.buffer += chunk

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.messages]


# -- running -------------------------------------------------------------------------------------


@dataclass
class Report:
    """The figures of one run."""

    frames: int = 0
    connections: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    close_times: list[float] = field(default_factory=list)
    readyz_polls: int = 0
    readyz_failures: int = 0
    readyz_errors: list[str] = field(default_factory=list)
    handshake_probes: int = 0

    def figures(self) -> dict[str, Any]:
        times = sorted(self.close_times)

        def pct(q: float) -> float:
            return round(times[min(len(times) - 1, int(q * (len(times) - 1)))], 3) if times else 0.0

        return {
            "hostile_frames": self.frames,
            "connections": self.connections,
            "handshake_probes": self.handshake_probes,
            "outcomes": dict(sorted(self.outcomes.items(), key=str)),
            "time_to_outcome_s": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "readyz_polls": self.readyz_polls,
            "readyz_failures": self.readyz_failures,
            "readyz_errors": self.readyz_errors[:5],
            "failures": self.failures[:20],
        }


async def run_case(host: str, port: int, token: str, case: Case, report: Report) -> None:
    peer = await Peer.open(host, port, token)
    peer.answer_pings = case.answer_pings
    report.connections += 1
    report.kinds[case.kind] += 1
    try:
        for data in case.frames:
            try:
                await peer.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break  # the server already closed on an earlier frame
        report.frames += case.hostile
        if case.half_close:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await peer.stream.send_eof()
        started = trio.current_time()
        outcome = await _outcome(peer, case)
        report.close_times.append(trio.current_time() - started)
        report.outcomes[str(outcome)] += 1
        if outcome not in case.expect:
            expected = sorted(map(str, case.expect))
            report.failures.append(f"{case.kind}: got {outcome}, expected {expected}")
        # A closed WebSocket must also end its TCP stream (no half-dead connection).
        if not peer.eof:
            if peer.close_code is not None and case.answer_pings:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await peer.send(close_frame(peer.close_code))
            with trio.move_on_after(OUTCOME_TIMEOUT_S):
                await peer.read_until(lambda: False)
            if not peer.eof:
                report.failures.append(f"{case.kind}: TCP stream not closed after the close")
    except trio.TooSlowError:
        report.failures.append(f"{case.kind}: no outcome within {OUTCOME_TIMEOUT_S} s")
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await peer.stream.aclose()


async def _outcome(peer: Peer, case: Case) -> int | str:
    """What the server did: ALIVE (served on, then echoed our clean close), a close code the
    server sent, DROPPED (stream ended without one), or what went wrong."""
    with trio.fail_after(OUTCOME_TIMEOUT_S):
        if ALIVE not in case.expect:
            await peer.read_until(lambda: peer.close_code is not None)
            if peer.close_code is None:
                return "reset" if peer.reset else DROPPED
            return peer.close_code
        await peer.send(op(op="ping", ref="still-alive"))
        await peer.read_until(
            lambda: peer.close_code is not None or any(b'"still-alive"' in m for m in peer.messages)
        )
        if peer.close_code is not None or peer.eof:
            return peer.close_code or DROPPED
        replies = peer.replies()
        if not all(r.get("op") == "reply" for r in replies):
            return "unexpected_frame"
        if len(replies) != case.replies + 1:  # exactly one reply per message
            return f"replies_{len(replies) - 1}_of_{case.replies}"
        if not replies[-1].get("ok"):
            return "no_alive_reply"
        await peer.read_until(lambda: peer.pongs >= case.pongs)
        if peer.pongs < case.pongs:
            return "missing_pongs"
        await peer.send(close_frame(1000))
        await peer.read_until(lambda: peer.close_code is not None)
        return ALIVE if peer.close_code == 1000 else (peer.close_code or DROPPED)


async def half_handshakes(host: str, port: int, token: str, report: Report) -> None:
    """Handshakes that never finish, or finish and vanish; and refused ones."""
    upgrade = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
    )
    variants = [
        b"",  # connect, send nothing, go
        upgrade.encode()[:30],  # a partial request line
        upgrade.encode(),  # headers never finished
        (upgrade + f"Authorization: Bearer {token}\r\n\r\n").encode(),  # accepted, then gone
        (upgrade + "\r\n").encode(),  # no credentials: 401
        upgrade.replace("Version: 13", "Version: 8").encode() + b"\r\n",  # refused version
    ]
    for data in variants:
        stream = await trio.open_tcp_stream(host, port)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if data:
                await stream.send_all(data)
        await stream.aclose()
        report.handshake_probes += 1


async def poll_readyz(base: str, report: Report, stop: trio.Event) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=OUTCOME_TIMEOUT_S) as http:
        while not stop.is_set():
            report.readyz_polls += 1
            try:
                response = await http.get("/readyz")
                if response.status_code != 200:
                    report.readyz_failures += 1
                    report.readyz_errors.append(response.text[:300])
            except httpx.HTTPError as exc:
                report.readyz_failures += 1
                report.readyz_errors.append(repr(exc))
            with trio.move_on_after(0.2):
                await stop.wait()


async def setup_users(base: str, count: int) -> list[tuple[str, str]]:
    """Register ``count`` users over REST; each gets a project and a thread: [(token, thread)]."""
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for i in range(count):
            email = f"fuzz-{os.getpid()}-{time.time_ns()}-{i}@example.com"
            creds = {"email": email, "password": "fuzz-password-1"}
            (await http.post("/api/v1/auth/register", json=creds)).raise_for_status()
            login = await http.post("/api/v1/auth/login", json=creds)
            login.raise_for_status()
            token = login.json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            project = await http.post("/api/v1/projects", json={"name": "fuzz"}, headers=auth)
            thread = await http.post(
                f"/api/v1/projects/{project.json()['id']}/threads", json={}, headers=auth
            )
            out.append((token, thread.json()["id"]))
    return out


async def fuzz(
    base: str, *, rounds: int, concurrency: int, seed: int, heartbeat_stalls: bool, pid: int
) -> dict[str, Any]:
    """Run ``rounds`` rounds of every case (the first is a warm-up for the memory figure)."""
    host, port_text = base.removeprefix("http://").split(":")
    port = int(port_text)
    rng = random.Random(seed)
    users = await setup_users(base, 8)
    report = Report()
    stop = trio.Event()
    rss_warm = 0
    async with trio.open_nursery() as outer:
        outer.start_soon(poll_readyz, base, report, stop)
        for round_no in range(rounds):
            cases = []
            for token, thread_id in users[: max(1, len(users) // 2)]:
                for case in make_cases(rng, thread_id, heartbeat_stalls):
                    cases.append((token, case))
            rng.shuffle(cases)

            async def one(token: str, case: Case, limiter: trio.CapacityLimiter) -> None:
                async with limiter:
                    try:
                        await run_case(host, port, token, case, report)
                    except (ConnectionError, OSError) as exc:
                        report.failures.append(f"{case.kind}: {type(exc).__name__}: {exc}")

            limiter = trio.CapacityLimiter(concurrency)
            async with trio.open_nursery() as nursery:
                for token, case in cases:
                    nursery.start_soon(one, token, case, limiter)
                nursery.start_soon(half_handshakes, host, port, users[0][0], report)
            if round_no == 0:
                rss_warm = psutil.Process(pid).memory_info().rss
        stop.set()
    figures = report.figures()
    figures["rss_growth_mb"] = round((psutil.Process(pid).memory_info().rss - rss_warm) / 2**20, 1)
    figures.update(await settle(base, pid, port))
    return figures


def server_socket_states(pid: int, port: int) -> Counter[str]:
    """The server process's TCP sockets on ``port`` by state (LISTEN excluded)."""
    return Counter(
        c.status
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
    )


async def settle(base: str, pid: int, port: int) -> dict[str, Any]:
    """After the run: wait (at most 5 s) for the server to let go of every connection."""
    deadline = trio.current_time() + OUTCOME_TIMEOUT_S
    states: Counter[str] = Counter()
    open_ws = -1
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while True:
            states = server_socket_states(pid, port)
            ready = await http.get("/readyz")
            open_ws = _find(ready.json(), "open")
            # Our own poller's keep-alive connection may still be there (ESTABLISHED).
            if states.get(psutil.CONN_CLOSE_WAIT, 0) == 0 and open_ws == 0:
                break
            if trio.current_time() > deadline:
                break
            await trio.sleep(0.1)
        disconnects = {}
        for line in (await http.get("/metrics")).text.splitlines():
            if line.startswith("threadline_ws_disconnects_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                disconnects[reason] = int(float(line.rsplit(" ", 1)[1]))
    return {
        "server_disconnects_by_reason": disconnects,
        "close_wait_after": states.get(psutil.CONN_CLOSE_WAIT, 0),
        "server_sockets_after": dict(states),
        "open_websockets_after": open_ws,
    }


def _find(tree: Any, key: str) -> int:
    """The first integer under ``key`` anywhere in a JSON tree, or -1."""
    if isinstance(tree, dict):
        if isinstance(tree.get(key), int):
            return int(tree[key])
        for value in tree.values():
            found = _find(value, key)
            if found >= 0:
                return found
    return -1


# -- the server under test -------------------------------------------------------------------------


def fuzz_env(dsn: str, data_dir: str) -> dict[str, str]:
    """``threadline serve`` as the fuzzer runs it: real limits, quick heartbeat, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_DATABASE_URL=dsn,
        THREADLINE_DATA_DIR=data_dir,
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_WS_MAX_MESSAGE_BYTES=str(MAX_MESSAGE),
        # A frame stalled mid-way cannot be followed by a pong: the heartbeat ends it.
        THREADLINE_HEARTBEAT_INTERVAL_S="1",
        THREADLINE_HEARTBEAT_TIMEOUT_S="1.5",
        # Junk must be answered, not refused for volume (the limiter has its own tests).
        THREADLINE_RATE_LIMIT_PER_S="100000",
        THREADLINE_RATE_LIMIT_BURST="100000",
        THREADLINE_IP_RATE_LIMIT_PER_S="100000",
        THREADLINE_IP_RATE_LIMIT_BURST="100000",
        THREADLINE_ARGON2_TIME_COST="1",
        THREADLINE_ARGON2_MEMORY_KIB="8",
        THREADLINE_ARGON2_PARALLELISM="1",
    )
    return env


@contextlib.contextmanager
def serve(dsn: str, log_path: Path) -> Iterator[tuple[int, str]]:
    """A ``threadline serve`` subprocess on a free port; yields (pid, base URL)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tl-fuzz-") as data_dir, log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            env=fuzz_env(dsn, data_dir),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("threadline: serving on"):
                raise RuntimeError(f"server did not start: {line!r}; log: {log_path}")
            yield proc.pid, line.rsplit(" ", 1)[1].strip()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def error_lines(log_path: Path) -> list[str]:
    """Server log lines at error level or worse (unhandled errors, failed ops)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Error" in line:
                found.append(line)
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical", "exception"):
            found.append(line[:300])
    return found


def run(
    dsn: str, *, rounds: int, concurrency: int, seed: int, log: Path | None = None
) -> dict[str, Any]:
    """Start a server, fuzz it, stop it; the figures (with the server's error log lines).

    ``log`` keeps the server's log there (else it goes with a temporary directory).
    """
    with tempfile.TemporaryDirectory(prefix="tl-fuzz-log-") as tmp:
        log_path = log or Path(tmp) / "server.log"
        with serve(dsn, log_path) as (pid, base):
            figures = trio.run(
                lambda: fuzz(
                    base,
                    rounds=rounds,
                    concurrency=concurrency,
                    seed=seed,
                    heartbeat_stalls=True,
                    pid=pid,
                )
            )
        figures["server_error_log_lines"] = error_lines(log_path)[:20]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    # Hostile input, not load: a few connections at a time (load has its own tools).
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--log", type=Path, help="keep the server's log in this file")
    args = parser.parse_args()
    from loadtests import harness

    with harness.database() as dsn:
        figures = run(
            dsn, rounds=args.rounds, concurrency=args.concurrency, seed=args.seed, log=args.log
        )
    print(json.dumps(figures, indent=2))
    ok = (
        not figures["failures"]
        and figures["readyz_failures"] == 0
        and figures["close_wait_after"] == 0
        and figures["open_websockets_after"] == 0
        and figures["rss_growth_mb"] < 30
        and not figures["server_error_log_lines"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
