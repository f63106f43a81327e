"""Lean WebSocket subscribers for the fan-out benchmark: many sockets per process, no event loop
library, so the load generator costs little CPU per frame and is not the bottleneck.

One process (``subscribers(share, link)``, run by ``harness.ClientProcesses``) opens
``share.count`` connections with a raw-socket RFC 6455 client (at most ``IN_FLIGHT`` handshakes
at a time: hypercorn's listen backlog is 100), subscribes each to ``share.thread_id``, reports
ready, then reads with ``epoll`` until the driver says stop. For every ``message.created`` frame it
records the delay from the publish time the publisher put in the message's ``content``
(``time.time()`` of the publisher, same machine) to the frame being parsed here, with that
publish time (``sent``: which event the frame carried), and checks seqs
are consecutive per connection. Pings are answered. ``share.stalled`` extra connections subscribe
with a 4 KiB receive buffer and then never read (slow consumers).

It speaks only what Threadline and the naive baseline both speak: the handshake with
``Authorization: Bearer``, ``{"op":"subscribe"}`` and its reply, event frames.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

IN_FLIGHT = 16


@dataclass(frozen=True)
class Share:
    """What one client process does."""

    host: str
    port: int
    token: str
    thread_id: str
    count: int
    stalled: int = 0
    expect: int = 0  # message.created events per connection; 0: run until told to stop
    quiet_s: float = 15.0  # ... or until nothing arrived for this long after the first frame
    max_latencies: int = 200_000  # per process; later frames are counted, not timed


@dataclass
class _Conn:
    sock: socket.socket
    state: str = "connecting"  # connecting -> handshake -> subscribing -> live | closed
    buf: bytearray = field(default_factory=bytearray)
    last_seq: int | None = None
    stalled: bool = False
    received: int = 0


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked as clients must)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete (opcode, payload) server frames at the front of ``buf``; consumes them."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        opcode = buf[pos] & 0x0F
        n = buf[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if end - pos < 4:
                break
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            head = 4
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if end - pos < head + n:
            break
        out.append((opcode, bytes(buf[pos + head : pos + head + n])))
        pos += head + n
    if pos:
        del buf[:pos]
    return out


def _handshake(share: Share) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: {share.host}:{share.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {share.token}\r\n\r\n"
    ).encode()


def _int_after(payload: bytes, key: bytes) -> int | None:
    i = payload.find(key)
    if i < 0:
        return None
    i += len(key)
    while i < len(payload) and payload[i] == 0x20:
        i += 1
    j = i
    while j < len(payload) and payload[j] in b"0123456789":
        j += 1
    return int(payload[i:j]) if j > i else None


def _open_all(share: Share, conns: dict[int, _Conn], ep: select.epoll) -> int:
    """Connect, handshake and subscribe every connection (``IN_FLIGHT`` at a time)."""
    total = share.count + share.stalled
    started = 0
    retries = 0
    busy = 0
    done = 0
    subscribe = masked(
        0x1, json.dumps({"op": "subscribe", "ref": "s", "thread_id": share.thread_id}).encode()
    )
    deadline = time.monotonic() + 60 + total * 0.05
    while done < total:
        while busy < IN_FLIGHT and started < total:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            stalled = started >= share.count  # the stalled ones come last
            if stalled:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            err = sock.connect_ex((share.host, share.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            conns[sock.fileno()] = _Conn(sock, stalled=stalled)
            ep.register(sock.fileno(), select.EPOLLOUT)
            started += 1
            busy += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done}/{total} connections subscribed")
        for fd, _ in ep.poll(1.0):
            conn = conns[fd]
            if conn.state == "connecting":
                conn.sock.send(_handshake(share))
                conn.state = "handshake"
                ep.modify(fd, select.EPOLLIN)
                continue
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError(
                    f"server closed a connection during set-up ({conn.state}, {bytes(conn.buf)!r})"
                )
            conn.buf += data
            if conn.state == "live":  # waiting for the others: answer the server's pings
                for opcode, payload in frames(conn.buf):
                    if opcode == 0x9:
                        conn.sock.send(masked(0xA, payload))
                continue
            if conn.state == "handshake":
                end = conn.buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                status = bytes(conn.buf[:end]).split(b"\r\n", 1)[0]
                if b" 503 " in status or b" 429 " in status:  # busy: try that one again
                    ep.unregister(fd)
                    conn.sock.close()
                    del conns[fd]
                    busy -= 1
                    started -= 1
                    retries += 1
                    continue
                if b" 101 " not in status:
                    raise ConnectionError(f"handshake refused: {status!r}")
                del conn.buf[: end + 4]
                conn.sock.send(subscribe)
                conn.state = "subscribing"
            if conn.state == "subscribing":
                for opcode, payload in frames(conn.buf):
                    if opcode != 0x1:
                        continue
                    reply = json.loads(payload)
                    if reply.get("op") != "reply":
                        continue
                    if not reply.get("ok"):
                        if reply["error"]["code"] not in ("unavailable", "rate_limited"):
                            raise ConnectionError(f"subscribe refused: {reply}")
                        conn.sock.send(subscribe)  # busy: ask again
                        retries += 1
                        break
                    conn.last_seq = reply["data"].get("last_seq")
                    conn.state = "live"
                    busy -= 1
                    done += 1
                    if conn.stalled:
                        ep.unregister(fd)  # never read again
                    break
    return retries


def subscribers(share: Share, link: Any) -> None:
    """The body of one client process (see the module docstring)."""
    conns: dict[int, _Conn] = {}
    ep = select.epoll()
    retries = _open_all(share, conns, ep)
    link.ready({"connections": len(conns), "handshake_retries": retries})
    latencies: list[float] = []
    sent: list[float] = []  # the publish time of each timed frame: which event it was
    received = 0
    gaps = 0
    closes: dict[str, int] = {}
    first_at = last_at = 0.0
    content_key = b'"content":'
    limit = share.max_latencies
    waiting = sum(1 for c in conns.values() if not c.stalled) if share.expect else -1
    while waiting != 0 and not link.stopping():
        if first_at and time.time() - last_at > share.quiet_s:
            break
        for fd, _ in ep.poll(0.05):
            conn = conns[fd]
            try:
                data = conn.sock.recv(262144)
            except ConnectionError:
                data = b""
            if not data:
                ep.unregister(fd)
                conn.state = "closed"
                closes["eof"] = closes.get("eof", 0) + 1
                if share.expect and conn.received < share.expect:
                    waiting -= 1
                continue
            conn.buf += data
            now = time.time()
            for opcode, payload in frames(conn.buf):
                if opcode == 0x1:
                    if b'"message.created"' not in payload:
                        continue
                    received += 1
                    conn.received += 1
                    if conn.received == share.expect:
                        waiting -= 1
                    if not first_at:
                        first_at = now
                    last_at = now
                    seq = _int_after(payload, b'"seq":')
                    if seq is not None:
                        if conn.last_seq is not None and seq != conn.last_seq + 1:
                            gaps += 1
                        conn.last_seq = seq
                    if len(latencies) < limit:
                        i = payload.find(content_key)
                        if i >= 0:
                            i = payload.index(b'"', i + len(content_key)) + 1
                            published = float(payload[i : payload.index(b'"', i)])
                            latencies.append(now - published)
                            sent.append(published)
                elif opcode == 0x9:
                    conn.sock.send(masked(0xA, payload))
                elif opcode == 0x8:
                    code = str(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else "?"
                    closes[code] = closes.get(code, 0) + 1
                    if share.expect and conn.received < share.expect:
                        waiting -= 1
                    ep.unregister(fd)
                    conn.state = "closed"
                    break
    result = {
        "received": received,
        "gaps": gaps,
        "latencies": latencies,
        "sent": sent,
        "closes": closes,
        "first_at": first_at,
        "last_at": last_at,
    }
    link.result(result)
    # Keep the connections until the driver has read the server's CPU: closing thousands of
    # sockets costs the server time that is not fan-out.
    while not link.stopping():
        time.sleep(0.02)
    for conn in conns.values():
        conn.sock.close()
