"""PostgreSQL access: asyncpg on trio through trio-asyncio, behind a small interface.

One asyncio loop is opened for the whole process (``trio_asyncio.open_loop``) by whoever runs the
server; every call here must run inside it.

Cancellation safety: a trio task cancelled while a query is in flight may leave the connection
mid-operation ("another operation is in progress"). Such a connection never goes back to the pool
usable: it is terminated, and the pool replaces it. A transaction that fails cleanly is rolled back
(shielded, with a timeout) before its connection is released.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeAlias, TypeVar

import asyncpg
import structlog
import trio
import trio_asyncio

from server.errors import Unavailable

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# asyncpg ships no type information; a row is read by column name.
Record: TypeAlias = Mapping[str, Any]

# How long cleanup (rollback, release) may take once the caller has been cancelled.
_CLEANUP_TIMEOUT_S = 5.0


def aio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Call an asyncio coroutine function from trio."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


class Tx:
    """One open transaction on one connection: the unit of work of a command."""

    __slots__ = ("_conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> str:
        return await aio(self._conn.execute)(sql, *args)  # type: ignore[no-any-return]

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await aio(self._conn.executemany)(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return await aio(self._conn.fetch)(sql, *args)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return await aio(self._conn.fetchrow)(sql, *args)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await aio(self._conn.fetchval)(sql, *args)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Figures for metrics and /readyz."""

    size: int
    idle: int
    max: int

    @property
    def in_use(self) -> int:
        return self.size - self.idle


class Database:
    """A pool of asyncpg connections usable from trio."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self.terminated_on_cancel = 0  # connections discarded because a query was cancelled

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        statement_timeout_ms: int = 5000,
        connect_timeout_s: float = 5.0,
    ) -> AsyncIterator[Database]:
        """Open a pool for the lifetime of the block. Needs a running trio-asyncio loop."""

        async def _init(conn: asyncpg.Connection) -> None:
            await conn.set_type_codec(
                "jsonb", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog"
            )

        pool = await aio(asyncpg.create_pool)(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout_s,
            command_timeout=statement_timeout_ms / 1000 + 5,
            server_settings={
                "statement_timeout": str(statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(max(statement_timeout_ms * 6, 60_000)),
                "application_name": "threadline",
            },
            init=_init,
        )
        db = cls(pool, dsn)
        try:
            yield db
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
                await aio(pool.close)()
            if scope.cancelled_caught:
                pool.terminate()

    def stats(self) -> PoolStats:
        return PoolStats(
            size=self._pool.get_size(),
            idle=self._pool.get_idle_size(),
            max=self._pool.get_max_size(),
        )

    @contextlib.asynccontextmanager
    async def connection(self, *, timeout: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
        """Borrow a connection; if cancelled mid-use, terminate it rather than return it."""
        try:
            conn = await aio(self._pool.acquire)(timeout=timeout)
        except TimeoutError:
            raise Unavailable("The database is busy; try again.") from None
        except _CONNECTION_ERRORS as exc:
            raise Unavailable("The database is unavailable.") from exc
        clean = False
        try:
            yield conn
            clean = True
        except trio.Cancelled:
            self._discard(conn)
            raise
        except asyncpg.PostgresError:
            clean = True  # the server answered: the connection itself is fine
            raise
        except BaseException:
            self._discard(conn)
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
                if clean and conn.is_in_transaction():
                    self._discard(conn)  # never hand on a connection with an open transaction
                await aio(self._pool.release)(conn)
            if scope.cancelled_caught:
                conn.terminate()

    def _discard(self, conn: asyncpg.Connection) -> None:
        if not conn.is_closed():
            self.terminated_on_cancel += 1
            conn.terminate()

    @contextlib.asynccontextmanager
    async def transaction(self, *, actor_id: str | None = None) -> AsyncIterator[Tx]:
        """Run the block in exactly one transaction: commit on success, roll back on error.

        ``actor_id`` is made visible to triggers (``threadline.actor_id``) for the audit trail.
        """
        async with self.connection() as conn:
            try:
                tr = conn.transaction()
                await aio(tr.start)()
            except _CONNECTION_ERRORS as exc:
                raise Unavailable("The database is unavailable.") from exc
            tx = Tx(conn)
            try:
                if actor_id is not None:
                    await tx.execute("SELECT set_config('threadline.actor_id', $1, true)", actor_id)
                yield tx
            except asyncpg.PostgresError:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
                    await aio(tr.rollback)()
                raise
            except trio.Cancelled:
                raise  # the connection is terminated by connection(); no rollback needed
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
                    if not conn.is_closed():
                        await aio(tr.rollback)()
                raise
            else:
                try:
                    await aio(tr.commit)()
                except _CONNECTION_ERRORS as exc:
                    raise Unavailable("The database connection was lost.") from exc

    @contextlib.asynccontextmanager
    async def statements(self) -> AsyncIterator[Tx]:
        """A connection whose statements each commit on their own (no BEGIN/COMMIT).

        For a single read on a hot path (authenticating a request, say): one round trip instead
        of three. Anything that writes more than one statement belongs in ``transaction()``.
        """
        async with self.connection() as conn:
            try:
                yield Tx(conn)
            except _CONNECTION_ERRORS as exc:
                raise Unavailable("The database connection was lost.") from exc

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        """One statement, committed on its own."""
        async with self.statements() as tx:
            return await tx.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        """One statement, committed on its own."""
        async with self.statements() as tx:
            return await tx.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One statement, committed on its own."""
        async with self.statements() as tx:
            return await tx.fetchval(sql, *args)

    async def ping(self, timeout: float = 1.0) -> float:
        """Run ``SELECT 1`` within ``timeout``; return the latency in seconds."""
        start = trio.current_time()
        with trio.fail_after(timeout):
            async with self.connection(timeout=timeout) as conn:
                await aio(conn.fetchval)("SELECT 1")
        return trio.current_time() - start


def _json_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_loads(value: str) -> Any:
    return json.loads(value)
