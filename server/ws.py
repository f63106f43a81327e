"""``GET /ws``: the WebSocket transport, and the plugin that starts the actor system.

The handshake is authenticated before the upgrade: a refusal is a plain HTTP 401/403 (503 while
draining) with the contract's error body -- Quart sends a response returned before
``websocket.accept()`` as an HTTP response through the ASGI ``websocket.http.response``
extension, which hypercorn supports. Once accepted, the socket is handed to a connection actor
(``actors/connection.py``) that runs inside this handler: the handler's task, and so the
connection's nursery, belongs to hypercorn's per-connection task group; the actor ends when the
client goes (Quart cancels the handler) or when the actor closes the socket.

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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from quart import Response, current_app, websocket
from quart_trio import QuartTrio

from actors.connection import CLOSE_GOING_AWAY, CLOSE_TOKEN_EXPIRED, Connection, Heartbeat
from actors.frames import Frame
from actors.hub import Hub
from actors.supervisor import Supervisor
from actors.timers import Timers
from server import metrics, wsext
from server.app import current_request_id
from server.auth import authenticate_handshake
from server.errors import RateLimited, ThreadlineError, Unavailable
from server.services import Services
from server.storage.events import EventLog
from server.wsops import WSOps

log = structlog.get_logger(__name__)

wsext.install()

# A close frame gets this long to reach a client before its TCP stream is aborted.
CLOSE_TIMEOUT_S = 2.0


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


class QuartTransport:
    """``actors.connection.Transport`` over Quart's websocket and our hypercorn extension.

    With a direct ``WSControl`` (HTTP/1.1, plain TCP) the connection actor writes frames to the
    socket itself; the bound methods are copied onto this object so the hot path makes no
    extra call. Otherwise frames go through hypercorn (``send_frames``) or, with no extension at
    all, through Quart one by one.
    """

    def __init__(self, ws: Any, control: wsext.WSControl | None) -> None:
        self._ws = ws
        self._control = control
        self.direct = control is not None and control.direct
        if control is not None and control.direct:
            self.send_now = control.send_now  # type: ignore[method-assign]
            self.hold = control.hold  # type: ignore[method-assign]
            self.acquire = control.acquire  # type: ignore[method-assign]
            self.release = control.release  # type: ignore[method-assign]
            self.can_start_frame = control.can_start_frame  # type: ignore[method-assign]
            self.send_some = control.send_some  # type: ignore[method-assign]
            self.wait_writable = control.wait_writable  # type: ignore[method-assign]
            self.abort_now = control.abort_now  # type: ignore[method-assign]

    async def receive(self) -> str | bytes:
        return await self._ws.receive()  # type: ignore[no-any-return]

    def send_now(self, data: bytes) -> int:
        return -1

    def hold(self) -> None:
        raise RuntimeError("not a direct transport")

    async def acquire(self) -> None:
        raise RuntimeError("not a direct transport")

    def release(self) -> None:
        raise RuntimeError("not a direct transport")

    def can_start_frame(self) -> bool:
        return False

    def send_some(self, chunks: Sequence[bytes | memoryview]) -> int:
        raise RuntimeError("not a direct transport")

    async def wait_writable(self) -> None:
        raise RuntimeError("not a direct transport")

    def abort_now(self) -> None:
        pass

    async def send(self, frames: Sequence[Frame]) -> None:
        if self._control is not None:
            await self._control.send_frames(frames)
        else:
            for frame in frames:
                await self._ws.send(frame.text())

    async def ping(self, payload: bytes) -> None:
        if self._control is not None:
            await self._control.ping(payload)

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)

    async def abort(self) -> None:
        if self._control is not None:
            await self._control.abort()

    def server_close_code(self) -> int | None:
        return self._control.server_close_code if self._control is not None else None


def _refusal(exc: ThreadlineError) -> Response:
    response = Response(
        json.dumps(exc.envelope(current_request_id())),
        status=exc.status,
        content_type="application/json",
    )
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response


async def ws_endpoint() -> Response | None:
    """The ``/ws`` handler: authenticate, accept, run a connection actor until it ends."""
    services: Services = current_app.config["SERVICES"]
    realtime: Realtime = services.extras["realtime"]
    if services.draining.is_set():
        return _refusal(Unavailable("The server is shutting down."))
    peer = (websocket.scope.get("client") or ("unknown",))[0]
    client_ip = services.limiter.client_ip(peer, websocket.headers.get("X-Forwarded-For"))
    try:
        try:
            services.limiter.check_ip(client_ip)  # a handshake is an op too
        except RateLimited:
            metrics.RATE_LIMITED.labels(transport="ws").inc()
            raise
        principal = await authenticate_handshake(
            services, websocket.headers, websocket.cookies, websocket.query_string
        )
    except ThreadlineError as exc:
        return _refusal(exc)
    # In a cluster: lease the user's share of the shared bucket before frames arrive.
    await services.limiter.warm_user(principal.user_id)
    settings = services.settings
    await websocket.accept()
    found = (websocket.scope.get("extensions") or {}).get(wsext.EXTENSION_KEY)
    control = found if isinstance(found, wsext.WSControl) else None
    heartbeat = Heartbeat(settings.heartbeat_interval_s, settings.heartbeat_timeout_s)
    if control is not None:
        control.on_pong = heartbeat.pong
    ws_object = websocket._get_current_object()  # type: ignore[attr-defined]
    ops = WSOps(services, realtime.hub, principal, client_ip, current_request_id())
    conn = Connection(
        QuartTransport(ws_object, control),
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
        control.on_server_close = conn.server_closed
        control.on_ping = functools.partial(ops.charge_ping, conn)
    structlog.contextvars.bind_contextvars(user_id=principal.user_id)
    realtime.connections.add(conn)
    realtime.tokens[conn] = principal.jti
    log.info("ws.opened", connection_id=conn.id)
    try:
        await conn.run()
    finally:
        realtime.connections.discard(conn)
        realtime.tokens.pop(conn, None)
        for thread_id in conn.subscriptions:
            realtime.hub.forget(thread_id, conn)
        conn.subscriptions.clear()
    return None


def register(app: QuartTrio) -> None:
    """Add the ``/ws`` route to the app."""
    app.add_websocket("/ws", "ws", ws_endpoint)


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
