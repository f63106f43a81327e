"""Process runtime: one trio-asyncio loop, the database pool, the supervisor and hypercorn.

Shutdown (SIGTERM/SIGINT or ``RunningServer.shutdown``): readiness turns to ``draining`` at once,
the listeners stop accepting, registered shutdown hooks run (WebSocket clients get close 1001,
in-flight replies are saved), and everything left is cancelled when the grace period ends.
"""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from server import gcwatch, httpext, migrate
from server.app import create_app
from server.auth import auth_plugin
from server.cluster import cluster_plugin
from server.config import Settings
from server.db import Database
from server.llm.plugin import assistant_plugin
from server.services import Services
from server.ws import realtime_plugin

if TYPE_CHECKING:
    from server.embedded_pg import EmbeddedPostgres

log = structlog.get_logger(__name__)

httpext.install()

# Subsystems (actors, LLM, ...) plug themselves in here; each is an async context manager factory
# that receives the Services, may fill ``services.extras`` and yields while the server runs.
Plugin = Callable[[Services], contextlib.AbstractAsyncContextManager[None]]
# Cluster membership first (every node's row outlives its work), then the revocation poller
# (authentication depends on it), then the actor system: the assistant (replies + summariser)
# runs under its thread actors.
PLUGINS: list[Plugin] = [cluster_plugin, auth_plugin, realtime_plugin, assistant_plugin]


def hypercorn_config(settings: Settings, bind: str) -> HypercornConfig:
    """Hypercorn's defaults are not ours: each value that matters is set here on purpose.

    docs/operations.md ("HTTP server settings") lists them with the reasons.
    """
    config = HypercornConfig()
    config.bind = [bind]
    # The contract's frame limit (64 KiB default), not hypercorn's 16 MiB; oversize: close 1009.
    config.websocket_max_message_size = settings.ws_max_message_bytes
    # Heartbeats are ours (actors/connection.py): ping, then close 4003 when no pong arrives.
    config.websocket_ping_interval = None
    # Our own shutdown closes clients with 1001 first; this is the hard stop after that.
    config.graceful_timeout = settings.graceful_timeout_s
    # No request in flight (idle keep-alive, or headers still arriving: slowloris) this long ->
    # closed. A client that closes first is let go at once (server/httpext.py).
    config.keep_alive_timeout = settings.http_keep_alive_timeout_s
    # No per-read timeout: idle WebSockets are bounded by our heartbeat, idle HTTP connections
    # by keep_alive_timeout, request bodies by Quart's BODY_TIMEOUT (60 s).
    config.read_timeout = None
    # Request line + headers at most 64 KiB (a bigger header block: 431 and closed).
    config.h11_max_incomplete_size = 64 * 1024
    # Room for a reconnect storm (every client of a restarted node) in the accept queue.
    config.backlog = 1024
    config.accesslog = None
    config.errorlog = None
    config.include_server_header = False
    return config


@dataclass
class RunningServer:
    """A server started by ``open_server``: its URL and a way to stop it."""

    url: str
    services: Services
    _shutdown: trio.Event = field(default_factory=trio.Event)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self.services.draining.set()
        self._shutdown.set()


@contextlib.asynccontextmanager
async def open_server(
    settings: Settings,
    dsn: str,
    *,
    bind: str | None = None,
    embedded: EmbeddedPostgres | None = None,
) -> AsyncIterator[RunningServer]:
    """Run the whole server in the caller's trio-asyncio loop for the duration of the block.

    With ``embedded`` (the embedded PostgreSQL's handle) the server also supervises it: a dead
    postmaster is started again, and ``/readyz`` reports its state meanwhile.
    """
    async with trio.open_nursery() as watchers:
        if embedded is not None:
            watchers.start_soon(embedded.supervise)
        try:
            async with _open_server(settings, dsn, bind, embedded, watchers) as running:
                yield running
        finally:
            watchers.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _open_server(
    settings: Settings,
    dsn: str,
    bind: str | None,
    embedded: EmbeddedPostgres | None,
    background: trio.Nursery,
) -> AsyncIterator[RunningServer]:
    async with Database.connect(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        connect_timeout_s=settings.db_connect_timeout_s,
    ) as db:
        await db.fetchval("UPDATE installation SET single_user = $1", settings.single_user)
        services = Services(settings=settings, db=db, head_revision=migrate.head_revision())
        # Work that must not hold a request (the readiness probe's database checks).
        services.extras["background"] = background
        if embedded is not None:
            services.extras["embedded_db"] = embedded
        # Plugins start before HTTP and stop after it: actors outlive their transports.
        # (Entered outside the HTTP nursery so a plugin's own nursery nests properly.)
        async with contextlib.AsyncExitStack() as stack:
            for plugin in PLUGINS:
                await stack.enter_async_context(plugin(services))
            async with trio.open_nursery() as nursery:
                app = create_app(services)
                running = RunningServer(url="", services=services)
                binds = await nursery.start(
                    _serve_http,
                    app,
                    hypercorn_config(settings, bind or f"{settings.host}:{settings.port}"),
                    running,
                )
                running.url = binds[0]
                cluster = services.extras.get("cluster")
                if cluster is not None:
                    cluster.url = running.url  # for operators, from the next heartbeat
                log.info("server.started", url=running.url)
                try:
                    yield running
                finally:
                    running.shutdown()
                    nursery.cancel_scope.deadline = (
                        trio.current_time() + settings.graceful_timeout_s
                    )


async def _serve_http(
    app: object,
    config: HypercornConfig,
    running: RunningServer,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def _trigger() -> None:
        await running._shutdown.wait()
        log.info("server.draining")
        for hook in running.services.shutdown_hooks:
            await hook()

    # The app's ``asgi_app`` (Quart's ``__call__`` only awaits it), so that every connection's
    # task has one coroutine frame less to keep (``server/ws.py`` fronts it for ``/ws``).
    await hypercorn_serve(
        getattr(app, "asgi_app", app),  # type: ignore[arg-type]
        config,
        shutdown_trigger=_trigger,
        task_status=task_status,
        mode="asgi",
    )


def tune_collector(settings: Settings) -> None:
    """Set the cyclic garbage collector's first threshold for this process and time its pauses
    (``threadline_gc_pause_seconds``); ``serve`` only: a process-wide choice, not one for
    whoever embeds the server."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(settings.gc_threshold, middle, oldest)
    gcwatch.install()


def freeze_started(settings: Settings) -> None:
    """Once the server is up: start-up's objects out of the collector's sight
    (``THREADLINE_GC_FREEZE``), so full collections traverse only what came after."""
    if settings.gc_freeze:
        log.info("server.gc_frozen", objects=gcwatch.freeze_startup())


async def serve_until_signalled(
    settings: Settings, dsn: str, embedded: EmbeddedPostgres | None = None
) -> None:
    """``threadline serve``: run until SIGTERM or SIGINT, then shut down gracefully."""
    tune_collector(settings)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_server(settings, dsn, embedded=embedded) as running:
            freeze_started(settings)
            print(f"threadline: serving on {running.url}", flush=True)
            async for signum in signals:
                log.info("server.signal", signal=signal.Signals(signum).name)
                running.shutdown()
                break
    log.info("server.stopped")
