"""HTTP connections over raw loopback sockets: nothing left in CLOSE_WAIT, idle and half-finished
connections bounded, and a refusal never loses the next request on a keep-alive connection."""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import trio

from server.runtime import RunningServer, hypercorn_config
from tests.conftest import make_settings
from tests.server.ws_support import server_with, until


def address(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def server_sockets(port: int, status: str) -> int:
    """How many of this process's sockets on the server's port are in ``status``."""
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == status
    )


async def read_response(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body; raises EOFError if the stream ends."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buffer!r}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed mid-body")
        body += chunk
    return status, headers, body


async def eof(stream: trio.SocketStream, timeout: float) -> bool:
    """True if the server closes the stream within ``timeout``."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_connections_closed_by_the_client_leave_no_close_wait(server: RunningServer) -> None:
    host, port = address(server)
    # 40 connections that send nothing at all (probes, preconnects, scanners).
    for _ in range(40):
        stream = await trio.open_tcp_stream(host, port)
        await stream.aclose()
    # 10 keep-alive connections closed by the client after one request.
    for _ in range(10):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, _ = await read_response(stream)
        assert status == 200
        await stream.aclose()
    # Without the fix each one waits out keep_alive_timeout (30 s) in CLOSE_WAIT.
    await until(lambda: server_sockets(port, psutil.CONN_CLOSE_WAIT) == 0)
    await until(lambda: server_sockets(port, psutil.CONN_ESTABLISHED) == 0)


async def test_idle_and_half_finished_connections_are_closed(tmp_path: Path, pg_dsn: str) -> None:
    async with server_with(tmp_path, pg_dsn, http_keep_alive_timeout_s=1.0) as server:
        host, port = address(server)
        idle = await trio.open_tcp_stream(host, port)
        await idle.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(idle))[0] == 200
        silent = await trio.open_tcp_stream(host, port)
        # Slowloris: request headers that never finish, one byte at a time.
        slow = await trio.open_tcp_stream(host, port)
        await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while True:
                        await slow.send_all(b"X")
                        await trio.sleep(0.1)

            nursery.start_soon(trickle)
            for name, stream in (("idle", idle), ("silent", silent), ("slow", slow)):
                assert await eof(stream, timeout=5.0), name
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started < 4.0
        for stream in (idle, silent, slow):
            await stream.aclose()
        await until(lambda: server_sockets(port, psutil.CONN_CLOSE_WAIT) == 0)


async def test_a_refusal_before_the_body_keeps_the_keep_alive_connection(
    tmp_path: Path, pg_dsn: str
) -> None:
    # Login costs 5 tokens of a burst of 5: the second login from this address is refused (429).
    async with server_with(tmp_path, pg_dsn, ip_rate_limit_burst=5, ip_rate_limit_per_s=0.01) as s:
        host, port = address(s)
        body = b'{"email": "nobody@example.com", "password": "wrong-password"}'
        head = (
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        stream = await trio.open_tcp_stream(host, port)
        for expected in (401, 429, 429):
            # The body follows its headers after a pause, as from a slow client: the refusal is
            # decided on the headers alone, before the body has arrived.
            await stream.send_all(head)
            await trio.sleep(0.2)
            await stream.send_all(body)
            status, headers, _ = await read_response(stream)
            assert status == expected
            assert headers.get("connection") != "close"
            # The next request on the same connection is answered.
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(stream))[0] == 200
        await stream.aclose()


async def test_a_body_over_the_limit_is_refused_with_connection_close(
    server: RunningServer,
) -> None:
    host, port = address(server)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n{"
    )
    status, headers, _ = await read_response(stream)
    assert status == 413
    # The body is never read, so the connection cannot be reused: the client is told so.
    assert headers.get("connection") == "close"
    assert await eof(stream, timeout=5.0)
    await stream.aclose()


def test_hypercorn_settings_are_ours(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, ws_max_message_bytes=32768, graceful_timeout_s=7, http_keep_alive_timeout_s=9
    )
    config = hypercorn_config(settings, "127.0.0.1:0")
    assert config.websocket_max_message_size == 32768  # hypercorn: 16 MiB
    assert config.websocket_ping_interval is None  # our heartbeat pings
    assert config.graceful_timeout == 7  # hypercorn: 3 s
    assert config.keep_alive_timeout == 9  # hypercorn: 5 s
    assert config.h11_max_incomplete_size == 64 * 1024
    assert config.read_timeout is None
    assert config.backlog == 1024
    assert config.include_server_header is False
