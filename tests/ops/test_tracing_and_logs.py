"""W3C traceparent handling, and request ids / trace ids on every log line of a request."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import pytest
import structlog
import trio
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from server.runtime import RunningServer
from server.tracing import parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_a_valid_traceparent_gives_a_child_span_of_the_same_trace() -> None:
    span = parse_traceparent(VALID)
    assert span is not None
    assert (span.trace_id, span.parent_id, span.flags) == (TRACE_ID, PARENT_ID, "01")
    assert len(span.span_id) == 16 and span.span_id != PARENT_ID
    assert span.traceparent() == f"00-{TRACE_ID}-{span.span_id}-01"
    # A later version may carry more fields; we still join its trace, as version 00.
    future = parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-03-extra")
    assert future is not None and future.traceparent().startswith(f"00-{TRACE_ID}-")
    assert future.flags == "01"  # only the sampled bit is passed on


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE_ID}-{PARENT_ID}",  # no flags
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case is invalid
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # forbidden version
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID}0-{PARENT_ID}-01",  # trace id too long
    ],
)
def test_invalid_traceparents_are_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None


async def test_the_server_echoes_a_child_traceparent_and_logs_the_trace(
    client: httpx.AsyncClient,
) -> None:
    request_id = "trace-test-" + uuid.uuid4().hex
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = await client.get(
            "/api/v1/no/such/route", headers={"traceparent": VALID, "X-Request-ID": request_id}
        )
    assert response.status_code == 404
    echoed = parse_traceparent(response.headers["traceparent"])
    assert echoed is not None
    assert echoed.trace_id == TRACE_ID
    assert echoed.parent_id != PARENT_ID  # our span, not the caller's
    ours = [line for line in logs if line.get("request_id") == request_id]
    assert ours, logs
    for line in ours:
        assert line["trace_id"] == TRACE_ID
        assert line["parent_span_id"] == PARENT_ID
        assert line["span_id"] == echoed.parent_id  # the span we named in the response


async def test_an_invalid_traceparent_is_ignored_by_the_server(client: httpx.AsyncClient) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = await client.get(
            "/api/v1/no/such/route", headers={"traceparent": "00-xyz-abc-01"}
        )
    assert response.status_code == 404
    assert "traceparent" not in response.headers
    assert logs and all("trace_id" not in line for line in logs)
    # Trace context does not leak from one request into the next on a kept-alive connection.
    await client.get("/api/v1/no/such/route", headers={"traceparent": VALID})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await client.get("/api/v1/no/such/route")
    assert logs and all("trace_id" not in line for line in logs)


async def test_every_log_line_of_a_request_carries_its_request_id(
    client: httpx.AsyncClient,
) -> None:
    """Drive requests that log (errors, auth when present) and check each line they wrote."""
    sent: list[str] = []
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        for path, method, body in [
            ("/api/v1/no/such/route", "GET", None),
            ("/api/v1/auth/register", "POST", {"email": "x", "password": "short"}),
            ("/api/v1/auth/login", "POST", {"email": "nobody@example.com", "password": "wrong!"}),
            ("/api/v1/projects", "GET", None),
        ]:
            rid = "log-test-" + uuid.uuid4().hex
            sent.append(rid)
            await client.request(method, path, json=body, headers={"X-Request-ID": rid})
    assert len(logs) >= len(sent)
    for line in logs:
        assert line.get("request_id") in sent, line
    assert {line["request_id"] for line in logs} == set(sent)


def test_json_logs_carry_bound_context_and_never_secrets() -> None:
    """The real pipeline of ``configure_logging`` in a fresh process (it is process-global)."""
    script = (
        "import structlog\n"
        "from server.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "structlog.contextvars.bind_contextvars(request_id='rid-123456789')\n"
        "structlog.get_logger('t').info('auth.login', password='hunter2', email='a@b.c')\n"
        "import logging; logging.getLogger('foreign').warning('plain %s', 'stdlib')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    first, foreign = lines
    assert first["event"] == "auth.login"
    assert first["request_id"] == "rid-123456789"
    assert first["password"] == "[redacted]"
    assert "hunter2" not in result.stderr
    assert first["level"] == "info" and "timestamp" in first
    assert foreign["event"] == "plain stdlib" and foreign["request_id"] == "rid-123456789"


async def test_websocket_log_lines_carry_the_request_id_and_trace(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    body = {"email": f"trace-{uuid.uuid4().hex}@example.com", "password": "a long password 1"}
    assert (await client.post("/api/v1/auth/register", json=body)).status_code == 201
    token = (await client.post("/api/v1/auth/login", json=body)).json()["access_token"]
    request_id = "ws-trace-" + uuid.uuid4().hex
    url = server.url.replace("http://", "ws://") + "/ws"
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-Request-ID", request_id),
        ("traceparent", VALID),
    ]
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"op": "ping", "ref": "p"}))
            reply = json.loads(await ws.get_message())
            assert reply["ok"] is True
        with trio.fail_after(5):
            while not any(line["event"] == "ws.closed" for line in logs):
                await trio.sleep(0.05)
    ours = [line for line in logs if line["event"].startswith("ws.")]
    assert {"ws.opened", "ws.closed"} <= {line["event"] for line in ours}, logs
    for line in ours:
        assert line["request_id"] == request_id, line
        assert line["trace_id"] == TRACE_ID, line


async def test_a_refused_websocket_handshake_carries_the_request_id(
    client: httpx.AsyncClient,
) -> None:
    request_id = "ws-refused-" + uuid.uuid4().hex
    response = await client.get(
        "/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "X-Request-ID": request_id,
            "traceparent": VALID,
        },
    )
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == request_id
    assert response.json()["error"]["request_id"] == request_id
    echoed = parse_traceparent(response.headers["traceparent"])
    assert echoed is not None and echoed.trace_id == TRACE_ID


def test_logs_render_for_people_on_a_terminal_and_as_json_otherwise() -> None:
    """``THREADLINE_LOG_FORMAT=auto``: console lines on a TTY, JSON lines on a pipe."""
    import os
    import pty

    script = (
        "import structlog\n"
        "from server.logs import configure_logging\n"
        "configure_logging('auto', 'info')\n"
        "structlog.get_logger('t').info('ops.hello', figure=42)\n"
    )
    leader, follower = pty.openpty()
    try:
        try:
            subprocess.run([sys.executable, "-c", script], stderr=follower, timeout=30, check=True)
        finally:
            os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO once the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    on_terminal = b"".join(chunks).decode()
    assert "ops.hello" in on_terminal and "figure" in on_terminal
    assert not on_terminal.lstrip().startswith("{")
    piped = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(piped.stderr.strip())["figure"] == 42
