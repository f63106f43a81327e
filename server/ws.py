"""``GET /ws``: the WebSocket transport, and the plugin that starts the actor system.

``/ws`` is served at the ASGI level, in front of the Quart app (``RealtimeASGI``, installed as
``app.asgi_app``): a connection costs hypercorn's objects, its app task and our actor, and no
Quart websocket object, request context, tasks or queues (memory per idle connection is what
limits how many one process holds). The handshake is authenticated before the upgrade: a refusal
is a plain HTTP 401/403 (429, 503 while draining) with the contract's error body, sent through
the ASGI ``websocket.http.response`` extension, which hypercorn supports. Once accepted, the
socket is handed to a connection actor (``actors/connection.py``) that runs in the ASGI app
task, which hypercorn owns (its per-connection task group); the actor ends when the client goes
(hypercorn's ``websocket.disconnect``) or when the actor closes the socket.

``realtime_plugin`` (in ``server.runtime.PLUGINS``) opens the actor system's nursery: a
supervisor running the hub; it sets ``services.actors``/``services.publish``, registers this
route and a shutdown hook that closes every client with 1001 within the grace period.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from quart_trio import QuartTrio
from werkzeug.http import parse_cookie

from actors.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_TOKEN_EXPIRED,
    Connection,
    Heartbeat,
    TransportClosed,
)
from actors.frames import Frame
from actors.hub import Hub
from actors.supervisor import Supervisor
from actors.timers import Timers
from server import metrics, tracing, wsext
from server.app import request_id_from
from server.auth import authenticate_handshake
from server.errors import InternalError, RateLimited, ThreadlineError, Unavailable
from server.principal import Principal
from server.services import Services
from server.storage.events import EventLog
from server.wsops import WSOps

log = structlog.get_logger(__name__)

wsext.install()

# A close frame gets this long to reach a client before its TCP stream is aborted.
CLOSE_TIMEOUT_S = 2.0
WS_PATH = "/ws"


@dataclass
class Realtime:
    """The actor system of one server: ``services.extras["realtime"]``."""

    hub: Hub
    supervisor: Supervisor
    connections: set[Connection] = field(default_factory=set)
    # Every connection's heartbeat and token expiry, served by one task (actors/timers.py).
    timers: Timers = field(default_factory=Timers)
    # The credential (JWT id) each connection was opened with, so a logout can end its sockets.
    tokens: dict[Connection, str] = field(default_factory=dict)

    def close_token(self, jti: str) -> int:
        """Close (4001 ``token_revoked``) every socket opened with token ``jti``; how many.

        For the auth layer to call after revoking a token (logout). Never blocks.
        """
        closing = [conn for conn, token in self.tokens.items() if token == jti]
        for conn in closing:
            conn.close(CLOSE_TOKEN_EXPIRED, "token_revoked")
        return len(closing)

    async def close_all(self, timeout_s: float) -> None:
        """Close every connection with 1001 and wait (at most ``timeout_s``) until all are gone."""
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "shutdown")
        with trio.move_on_after(timeout_s):
            for conn in list(self.connections):
                await conn.closed.wait()
        log.info("ws.drained", remaining=len(self.connections))


class ASGITransport:
    """``actors.connection.Transport`` over hypercorn's ASGI ``receive``/``send`` and our
    hypercorn extension (``server/wsext.py``).

    With a direct ``WSControl`` (HTTP/1.1, plain TCP) the connection actor writes frames to the
    socket itself (``direct`` is the control). Otherwise frames go through hypercorn
    (``send_frames``) or, with no extension at all, as ASGI ``websocket.send`` messages.
    """

    __slots__ = ("_receive", "_send", "control", "direct")

    def __init__(self, receive: Receive, send: Send, control: wsext.WSControl | None) -> None:
        self._receive = receive
        self._send = send
        self.control = control
        self.direct = control if control is not None and control.direct else None

    async def receive(self) -> str | bytes:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                return text if text is not None else bytes(message.get("bytes") or b"")
            if kind == "websocket.disconnect":
                raise TransportClosed("disconnected")

    async def send(self, frames: Sequence[Frame]) -> None:
        if self.control is not None:
            await self.control.send_frames(frames)
        else:
            for frame in frames:
                await self._send({"type": "websocket.send", "text": frame.text()})

    async def ping(self, payload: bytes) -> None:
        if self.control is not None:
            await self.control.ping(payload)

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def abort(self) -> None:
        if self.control is not None:
            await self.control.abort()

    def server_close_code(self) -> int | None:
        return self.control.server_close_code if self.control is not None else None


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RealtimeASGI:
    """ASGI middleware in front of the Quart app (``app.asgi_app``): serves ``GET /ws`` itself.

    A WebSocket on ``/ws`` never reaches Quart: no request context, no websocket object, no
    tasks and queues of Quart's own per connection. Everything else goes to the app.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], services: Services) -> None:
        self.app = app
        self.services = services

    def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function returning the coroutine: one frame less on every connection's stack.
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            return serve_websocket(self.services, scope, receive, send)
        return self.app(scope, receive, send)


def _header_map(raw: Sequence[tuple[bytes, bytes]]) -> tuple[dict[str, str], str]:
    """The handshake's headers (lower-case names, the first of each) and its cookies, joined."""
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "cookie":
            cookies.append(text)
        headers.setdefault(key, text)
    return headers, ";".join(cookies)


async def _refuse(
    send: Send, exc: ThreadlineError, request_id: str, span: tracing.Span | None
) -> None:
    """Answer the handshake with a plain HTTP error (ASGI ``websocket.http.response``)."""
    body = json.dumps(exc.envelope(request_id)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        # hypercorn closes the connection after a refused upgrade: say so.
        (b"connection", b"close"),
    ]
    if span is not None:
        headers.append((tracing.HEADER.encode(), span.traceparent().encode()))
    if isinstance(exc, RateLimited):
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after_s))).encode()))
    await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def serve_websocket(
    services: Services, scope: dict[str, Any], receive: Receive, send: Send
) -> None:
    """One ``/ws`` connection: authenticate, accept, run its connection actor until it ends.

    Runs in the ASGI app task hypercorn starts for the connection; the connection actor's reader
    runs in this task too. A refusal is a plain HTTP answer before any upgrade.
    """
    admitted = await _handshake(services, scope, receive, send)
    if admitted is None:
        return
    principal, client_ip, request_id = admitted
    await send({"type": "websocket.accept"})
    # The handshake's headers are read; hypercorn (the scope's other holder) no longer needs
    # them after the 101, and an open socket would keep them for its whole life.
    scope["headers"] = ()
    found = (scope.get("extensions") or {}).get(wsext.EXTENSION_KEY)
    control = found if isinstance(found, wsext.WSControl) else None
    settings = services.settings
    realtime: Realtime = services.extras["realtime"]
    heartbeat = Heartbeat(settings.heartbeat_interval_s, settings.heartbeat_timeout_s)
    ops = WSOps(services, realtime.hub, principal, client_ip, request_id)
    conn = Connection(
        ASGITransport(receive, send, control),
        ops,
        heartbeat,
        outbound_size=settings.ws_outbound_queue,
        outbound_bytes=settings.ws_outbound_queue_bytes,
        inbound_size=settings.ws_inbound_queue,
        close_timeout_s=CLOSE_TIMEOUT_S,
        expires_in_s=principal.expires_at - time.time(),
        timers=realtime.timers,
    )
    if control is not None:
        control.on_pong = heartbeat.pong
        control.on_server_close = conn.server_closed
        control.on_ping = functools.partial(ops.charge_ping, conn)
    structlog.contextvars.bind_contextvars(user_id=principal.user_id)
    realtime.connections.add(conn)
    realtime.tokens[conn] = principal.jti
    log.info("ws.opened", connection_id=conn.id)
    # Nothing of the handshake is kept in this frame for the connection's life.
    del admitted, principal, found, heartbeat, ops
    try:
        await conn.run()
    finally:
        realtime.connections.discard(conn)
        realtime.tokens.pop(conn, None)
        for thread_id in conn.subscriptions:
            realtime.hub.forget(thread_id, conn)
        conn.subscriptions.clear()
        if control is not None:
            control.detach()


async def _handshake(
    services: Services, scope: dict[str, Any], receive: Receive, send: Send
) -> tuple[Principal, str, str] | None:
    """Authenticate the handshake: (principal, client IP, request id), or None once refused.

    Binds the request id (and trace) into the log context of the task. Kept apart from the
    connection's own coroutine so that the headers it reads are not held for the socket's life.
    """
    headers, cookie = _header_map(scope["headers"])
    # A WebSocket is one long request: its id and trace flow to every line it logs.
    request_id = request_id_from(headers.get("x-request-id"))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    span = tracing.bind_trace(headers.get(tracing.HEADER))
    await receive()  # websocket.connect
    try:
        if services.draining.is_set():
            raise Unavailable("The server is shutting down.")
        peer = (scope.get("client") or ("unknown",))[0]
        client_ip = services.limiter.client_ip(peer, headers.get("x-forwarded-for"))
        try:
            services.limiter.check_ip(client_ip)  # a handshake is an op too
        except RateLimited:
            metrics.RATE_LIMITED.labels(transport="ws").inc()
            raise
        principal = await authenticate_handshake(
            services, headers, parse_cookie(cookie), scope.get("query_string", b"")
        )
        # In a cluster: lease the user's share of the shared bucket before frames arrive.
        await services.limiter.warm_user(principal.user_id)
    except ThreadlineError as exc:
        await _refuse(send, exc, request_id, span)
        return None
    except Exception:
        log.exception("ws.handshake_failed")
        await _refuse(send, InternalError("Something went wrong on our side."), request_id, span)
        return None
    return principal, client_ip, request_id


def register(app: QuartTrio) -> None:
    """Serve ``/ws`` in front of the app (``RealtimeASGI``)."""
    app.asgi_app = RealtimeASGI(app.asgi_app, app.config["SERVICES"])  # type: ignore[method-assign,assignment]


@contextlib.asynccontextmanager
async def realtime_plugin(services: Services) -> AsyncIterator[None]:
    """Run the actor system for as long as the server runs (a ``server.runtime`` plugin)."""
    broker = services.extras.get("broker")

    async def snapshots(thread_id: str, message_id: str, owner: str | None) -> Any:
        # Looked up per call: the assistant plugin starts after this one.
        assistant = services.assistant
        snapshot = getattr(assistant, "snapshot", None)
        return await snapshot(thread_id, message_id, owner) if snapshot is not None else None

    hub = Hub.from_settings(EventLog(services.db, snapshots), services.settings, broker)
    if broker is not None:
        broker.attach(hub)  # events of other nodes (and our own commits) reach the thread actors
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery)
        supervisor.probes["hub"] = hub.health
        supervisor.supervise("hub", hub.run)
        await hub.wait_ready()
        realtime = Realtime(hub=hub, supervisor=supervisor)
        nursery.start_soon(realtime.timers.run)
        supervisor.probes["connections"] = lambda: {"open": len(realtime.connections)}
        services.actors = hub
        services.publish = hub.publish
        services.extras["realtime"] = realtime
        services.extras["supervisor"] = supervisor
        services.extras.setdefault("blueprints", []).append(register)

        async def _close_clients() -> None:
            # Leave a part of the grace period for in-flight replies and the listeners.
            await realtime.close_all(services.settings.graceful_timeout_s * 0.5)

        services.shutdown_hooks.append(_close_clients)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
