"""PostgreSQL access: asyncpg, reached from trio, behind a small interface.

asyncpg runs on one asyncio loop in a daemon thread of its own (``AsyncioThread``), started on
first use; trio hands it whole units of work (``aio``). This replaced trio-asyncio, which ran the
asyncio loop inside trio's and cost about three times the CPU per unit of work
(``loadtests/bench_bridge.py``, docs/performance.md). Nothing here needs a trio-asyncio loop;
``threadline serve`` still opens one for any other asyncio code.

Cancellation safety: a trio task cancelled while a query is in flight may leave the connection
mid-operation ("another operation is in progress"). Such a connection never goes back to the pool
usable: it is terminated, and the pool replaces it. A transaction that fails cleanly is rolled back
(shielded, with a timeout) before its connection is released.

Trips through the bridge: each ``aio`` call is a hand-over between trio and the asyncio thread,
the main cost of a query under load. A one-statement unit of work (``Database.oneshot`` for
reads and ``fetch*``, ``Database.atomic`` for a write in its own transaction) makes one trip:
borrowing, BEGIN, the statement, COMMIT and returning the connection happen inside asyncio
(``Database.one``). ``transaction()`` makes one per statement plus one: borrowing and BEGIN
ride with its first statement, COMMIT with the release (``TransactionTx``); a block that ends
with ``TransactionTx.commit_with`` sends its last statement, COMMIT and the release in one trip
(k statements, k trips), so the locks that statement takes are not held across a wait for trio.
Returning a connection skips asyncpg's reset query (see ``_keep_session``).

``Database.listen`` opens the one connection that is not from the pool: a node's LISTEN/NOTIFY
connection for the broker (``server/broker.py``); see ``Listener``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeAlias, TypeVar

import asyncpg
import outcome
import structlog
import trio

from server.errors import Unavailable

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# asyncpg ships no type information; a row is read by column name.
Record: TypeAlias = Mapping[str, Any]

# How long cleanup (rollback, release) may take once the caller has been cancelled.
_CLEANUP_TIMEOUT_S = 5.0


class AsyncioThread:
    """The process's asyncio loop, running in a daemon thread of its own: where asyncpg lives.

    ``run(fn, *args)`` hands ``fn(*args)`` to that loop as one task and waits for it in trio:
    one hand-over each way (``call_soon_threadsafe``, then trio's token). Measured against
    trio-asyncio (``loadtests/bench_bridge.py``), a unit of work costs about a third of the CPU.

    Cancellation: the task is cancelled in its loop and trio waits until it has finished, its
    cleanup included (like ``trio_asyncio.aio_as_trio``), then raises ``trio.Cancelled``; so a
    connection is never left mid-operation by a caller that has already moved on.
    """

    _instance: AsyncioThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        started = threading.Event()
        made: list[asyncio.AbstractEventLoop] = []

        def main() -> None:
            # Made in its own thread: trio-asyncio, if loaded, refuses a new loop in trio's.
            loop = asyncio.SelectorEventLoop()
            made.append(loop)
            started.set()
            loop.run_forever()

        self.thread = threading.Thread(target=main, name="threadline-asyncpg", daemon=True)
        self.thread.start()
        started.wait()
        self.loop = made[0]

    @classmethod
    def get(cls) -> AsyncioThread:
        """The process's one instance, started on first use."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def in_loop(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def call(self, fn: Callable[[], object]) -> None:
        """Run a plain function in the loop (now, if already there): e.g. ``terminate()``."""
        if self.in_loop():
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        token = trio.lowlevel.current_trio_token()
        waiter = trio.lowlevel.current_task()
        tasks: list[asyncio.Task[T]] = []

        def wake(task: asyncio.Task[T]) -> None:
            result = outcome.capture(task.result)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, waiter, result)

        async def call() -> T:
            return await fn(*args, **kwargs)  # an awaitable that is no coroutine works too

        def submit() -> None:
            task = self.loop.create_task(call())
            task.add_done_callback(wake)
            tasks.append(task)

        self.loop.call_soon_threadsafe(submit)
        raise_cancel: Callable[[], NoReturn] | None = None

        def abort(raise_cancel_arg: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
            nonlocal raise_cancel
            raise_cancel = raise_cancel_arg
            # Runs after ``submit`` (the loop takes callbacks in order): the task exists.
            self.loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            return trio.lowlevel.Abort.FAILED  # wait for the task to finish its cleanup

        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if raise_cancel is not None:
                raise_cancel()
            raise


def aio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Call an asyncio coroutine function from trio: it runs on the asyncpg loop's thread."""
    bridge = AsyncioThread.get()

    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return await bridge.run(fn, *args, **kwargs)

    return call


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
)
# A connection lost mid-use: the socket broke, or the server ended the session (administrator
# command, crash). The request fails as 503 ``unavailable`` (a client may retry: sends are
# idempotent by client_msg_id), never as a 500, and the connection is not reused.
# (InternalClientError: asyncpg found the protocol in a state it cannot go on from, seen when
# the server died mid-operation; the connection is unusable.)
_LOST_ERRORS = (
    *_CONNECTION_ERRORS,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,
)


def _is_closed(conn: asyncpg.Connection) -> bool:
    """Closed, or already detached by the pool (it does that itself when a connection is lost,
    and every call on the detached proxy then raises InterfaceError)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.exceptions.InterfaceError:
        return True


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


class OneShot(Tx):
    """Statements that each borrow a connection for themselves alone: one unit of work each.

    Borrowing the connection, running the statement (inside BEGIN/COMMIT when ``atomic``) and
    handing the connection back happen in one trip through the trio-asyncio bridge
    (``Database.one``) instead of three to five. ``Database.oneshot`` runs reads on their own
    (no BEGIN/COMMIT); ``Database.atomic`` wraps each statement in a transaction of its own, for
    writes: a statement cancelled before its COMMIT was sent commits nothing, because the
    connection is terminated and the server rolls the transaction back (an autocommitted
    statement would still commit once a lock it waits for is released).
    """

    __slots__ = ("_atomic", "_db")

    def __init__(self, db: Database, *, atomic: bool) -> None:  # no connection of its own
        self._db = db
        self._atomic = atomic

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._db.one("execute", sql, args, atomic=self._atomic)  # type: ignore[no-any-return]

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._db.one("executemany", sql, (args,), atomic=self._atomic)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return await self._db.one("fetch", sql, args, atomic=self._atomic)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return await self._db.one("fetchrow", sql, args, atomic=self._atomic)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._db.one("fetchval", sql, args, atomic=self._atomic)


class TransactionTx(Tx):
    """The statements of one ``Database.transaction()``, on one connection borrowed lazily.

    The first statement borrows the connection, sends BEGIN (and the actor's ``set_config``)
    and runs, in one trip through the bridge (``Database._begin_and_run``); the others take one
    trip each; the end of the block commits (or rolls back) and returns the connection in one
    more (``_end``).
    """

    __slots__ = ("_actor_id", "_db", "_ended", "_timeout")

    def __init__(self, db: Database, actor_id: str | None, timeout: float) -> None:
        self._conn: asyncpg.Connection | None = None
        self._db = db
        self._actor_id = actor_id
        self._timeout = timeout
        self._ended = False  # by ``commit_with``: a later statement would begin a new one

    async def _run(self, method: str, sql: str, args: Sequence[Any]) -> Any:
        if self._conn is not None:
            return await aio(getattr(self._conn, method))(sql, *args)
        if self._ended:
            raise RuntimeError("this transaction has already been committed (commit_with)")
        try:
            self._conn, result = await aio(self._db._begin_and_run)(
                method, sql, args, self._actor_id, self._timeout
            )
        except TimeoutError:
            raise Unavailable("The database is busy; try again.") from None
        except _LOST_ERRORS as exc:
            raise Unavailable("The database is unavailable.") from exc
        return result

    async def _end(self, how: str, *, discard: bool = False) -> None:
        """Commit, roll back or discard (terminate) the transaction and return the connection:
        one trip, shielded (with a timeout) unless committing. COMMIT's errors propagate."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if how == "commit":
            try:
                await aio(self._db._settle)(conn, how)
            except _LOST_ERRORS as exc:
                raise Unavailable("The database connection was lost.") from exc
            return
        if how == "discard":
            self._db._discard(conn)  # in the loop's thread, before the release below
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
            with contextlib.suppress(*_LOST_ERRORS, asyncpg.PostgresError):
                await aio(self._db._settle)(conn, how, discard=discard)
        if scope.cancelled_caught:
            self._db._discard(conn)

    async def commit_with(
        self,
        method: str,
        sql: str,
        *args: Any,
        before_commit: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run the transaction's last statement (``connection.<method>``), COMMIT and return the
        connection, in one trip: nothing waits for this event loop between the statement and
        the COMMIT, so the locks it took are held as briefly as the database allows.

        ``before_commit(result)`` runs in this event loop, in the caller's context, as soon as
        the statement has answered, while the COMMIT is on its way (it must not block; an
        exception it raises is logged). The transaction has ended when this returns: the end
        of the block does nothing more, and another statement in it raises ``RuntimeError``.
        COMMIT's errors propagate, the connection settled.
        """
        if self._conn is None:  # the first statement too: BEGIN rides with it as usual
            result = await self._run(method, sql, args)
            self._ended = True
            if before_commit is not None:
                try:
                    before_commit(result)
                except Exception:
                    log.exception("db.before_commit_failed")
            await self._end("commit")
            return result
        report: Callable[[Any], None] | None = None
        if before_commit is not None:
            token = trio.lowlevel.current_trio_token()
            context = contextvars.copy_context()
            hook = before_commit

            def guarded(result: Any) -> None:
                try:
                    hook(result)
                except Exception:
                    log.exception("db.before_commit_failed")

            def report(result: Any) -> None:  # in the asyncpg loop's thread
                token.run_sync_soon(context.run, guarded, result)

        conn, self._conn = self._conn, None  # the trip settles it, whatever happens
        self._ended = True
        try:
            return await aio(self._db._run_and_commit)(conn, method, sql, args, report)
        except _LOST_ERRORS as exc:
            raise Unavailable("The database connection was lost.") from exc

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._run("execute", sql, args)  # type: ignore[no-any-return]

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._run("executemany", sql, (args,))

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return await self._run("fetch", sql, args)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return await self._run("fetchrow", sql, args)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run("fetchval", sql, args)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Figures for metrics and /readyz."""

    size: int
    idle: int
    max: int

    @property
    def in_use(self) -> int:
        return self.size - self.idle


class ListenerLost(Exception):
    """The listening connection is gone (its backend ended, the network failed, or overflow)."""


class Listener:
    """A dedicated connection LISTENing on one channel: ``receive()`` payloads, ``notify()`` some.

    Notifications are handed from asyncpg's callback to trio through the run's token (safe
    whichever thread or loop asyncpg runs in) into a bounded buffer of ``buffer`` payloads. A
    full buffer loses the connection on purpose (``ListenerLost``): the caller reconnects and
    re-reads what it missed from the database, so a slow reader delays, never loses.
    """

    def __init__(self, conn: asyncpg.Connection, channel: str, buffer: int) -> None:
        self._conn = conn
        self.channel = channel
        self._send, self._receive = trio.open_memory_channel[str](buffer)
        self._token = trio.lowlevel.current_trio_token()
        self.lost: str | None = None

    @property
    def backend_pid(self) -> int:
        return int(self._conn.get_server_pid())

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._token.run_sync_soon(self._push, payload)

    def _on_termination(self, _conn: object) -> None:
        self._token.run_sync_soon(self._lose, "terminated")

    def _push(self, payload: str) -> None:
        if self.lost is not None:
            return
        try:
            self._send.send_nowait(payload)
        except trio.WouldBlock:
            self._lose("overflow")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self._send.close()  # the reader gets what is buffered, then ListenerLost

    async def receive(self) -> str:
        """The next payload, in the order PostgreSQL delivered them; ``ListenerLost`` at the end."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ListenerLost(self.lost or "closed") from None

    async def notify(self, payloads: Sequence[str]) -> None:
        """``pg_notify`` each payload on this channel, in order, in one statement (one
        transaction: delivered together, after commit)."""
        try:
            await aio(self._conn.execute)(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS u(p, i)"
                " ORDER BY i",
                self.channel,
                list(payloads),
            )
        except _CONNECTION_ERRORS as exc:
            self._lose("terminated")
            raise ListenerLost("terminated") from exc

    async def ping(self) -> None:
        """One round trip; ``ListenerLost`` if the connection is gone."""
        try:
            await aio(self._conn.fetchval)("SELECT 1")
        except _CONNECTION_ERRORS as exc:
            self._lose("terminated")
            raise ListenerLost("terminated") from exc


class Database:
    """A pool of asyncpg connections usable from trio."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self.terminated_on_cancel = 0  # connections discarded because a query was cancelled
        self.oneshot = OneShot(self, atomic=False)  # reads: each statement on its own
        self.atomic = OneShot(self, atomic=True)  # writes: each statement in its own transaction

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
        """Open a pool for the lifetime of the block (on the asyncpg loop's thread)."""

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
            # No 300 s timers: asyncpg re-arms one on every pool release (idle connections) and
            # on every use of a cached statement (statement expiry). Under trio-asyncio a
            # cancelled timer kept the contextvars of the task that armed it (a request's or a
            # WebSocket's whole object graph) until it fell due: ~35 KB per WebSocket for 5
            # minutes (found by loadtests/ws_fuzz.py). On the asyncpg thread's own loop tasks
            # carry that thread's context, not a request's; still no timer is needed: the pool
            # stays between min_size and max_size, and the statement cache is bounded by count.
            max_inactive_connection_lifetime=0,
            max_cached_statement_lifetime=0,
            server_settings={
                "statement_timeout": str(statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(max(statement_timeout_ms * 6, 60_000)),
                "application_name": "threadline",
            },
            init=_init,
            reset=_keep_session,
        )
        db = cls(pool, dsn)
        try:
            yield db
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
                await aio(pool.close)()
            if scope.cancelled_caught:
                AsyncioThread.get().call(pool.terminate)

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
        except _LOST_ERRORS as exc:
            self._discard(conn)
            raise Unavailable("The database connection was lost.") from exc
        except asyncpg.PostgresError:
            clean = True  # the server answered: the connection itself is fine
            raise
        except BaseException:
            self._discard(conn)
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
                if clean and not _is_closed(conn) and conn.is_in_transaction():
                    self._discard(conn)  # never hand on a connection with an open transaction
                try:
                    await aio(self._pool.release)(conn)  # a no-op for a detached proxy
                except (*_LOST_ERRORS, asyncpg.PostgresError):
                    # It died while being reset for reuse (asyncpg then terminates it and
                    # frees its slot): the request's own work is done and must not fail.
                    self._discard(conn)
            if scope.cancelled_caught:
                self._discard(conn)

    def _discard(self, conn: asyncpg.Connection) -> None:
        if not _is_closed(conn):
            self.terminated_on_cancel += 1
            # In the loop's thread (queued before any release that follows it).
            AsyncioThread.get().call(conn.terminate)

    @contextlib.asynccontextmanager
    async def transaction(
        self, *, actor_id: str | None = None, timeout: float = 10.0
    ) -> AsyncIterator[TransactionTx]:
        """Run the block in exactly one transaction: commit on success, roll back on error.

        ``actor_id`` is made visible to triggers (``threadline.actor_id``) for the audit trail.

        Trips through the bridge: borrowing the connection and BEGIN ride with the block's first
        statement, COMMIT with returning the connection (``TransactionTx``): a transaction of k
        statements makes k + 1 trips. A block that runs no statement borrows nothing.
        ``Unavailable`` when no connection comes within ``timeout`` or the connection is lost.
        """
        tx = TransactionTx(self, actor_id, timeout)
        try:
            yield tx
        except trio.Cancelled:
            # Maybe mid-statement: the connection is terminated, never returned mid-operation
            # (an open transaction dies with it: nothing commits).
            await tx._end("discard")
            raise
        except _LOST_ERRORS as exc:
            await tx._end("discard")
            raise Unavailable("The database connection was lost.") from exc
        except asyncpg.PostgresError:
            await tx._end("rollback")  # the server answered: the connection itself is fine
            raise
        except BaseException:
            await tx._end("rollback", discard=True)
            raise
        else:
            await tx._end("commit")

    async def _begin_and_run(
        self, method: str, sql: str, args: Sequence[Any], actor_id: str | None, timeout: float
    ) -> tuple[asyncpg.Connection, Any]:
        """In the asyncpg loop, one task: borrow, BEGIN, (``set_config``), the first statement.

        All or nothing: if any step fails (or the task is cancelled) the connection goes back
        to the pool (terminated unless the server answered cleanly) and the error propagates.
        """
        conn = await self._pool.acquire(timeout=timeout)
        try:
            await conn.execute("BEGIN")
            if actor_id is not None:
                await conn.execute("SELECT set_config('threadline.actor_id', $1, true)", actor_id)
            result = await getattr(conn, method)(sql, *args)
        except asyncpg.PostgresError as exc:
            await self._settle(conn, "discard" if isinstance(exc, _LOST_ERRORS) else "rollback")
            raise
        except BaseException:  # cancelled mid-statement, or the connection broke
            await self._settle(conn, "discard")
            raise
        return conn, result

    async def _run_and_commit(
        self,
        conn: asyncpg.Connection,
        method: str,
        sql: str,
        args: Sequence[Any],
        report: Callable[[Any], None] | None,
    ) -> Any:
        """In the asyncpg loop, one task: a statement, ``report(result)``, COMMIT, release."""
        try:
            result = await getattr(conn, method)(sql, *args)
        except asyncpg.PostgresError as exc:
            await self._settle(conn, "discard" if isinstance(exc, _LOST_ERRORS) else "rollback")
            raise
        except BaseException:  # cancelled mid-statement, or the connection broke
            await self._settle(conn, "discard")
            raise
        if report is not None:
            # Never in the way of the COMMIT (trio's run may have ended meanwhile).
            with contextlib.suppress(Exception):
                report(result)
        await self._settle(conn, "commit")
        return result

    async def _settle(self, conn: asyncpg.Connection, how: str, *, discard: bool = False) -> None:
        """In the asyncpg loop: end ``conn``'s transaction (``commit``, ``rollback``, or
        ``discard``: terminate the connection) and return it to the pool, in one task.

        The COMMIT's error (a deferred constraint, a serialization failure, a lost session)
        propagates once the connection is settled; a connection whose ending failed or was
        cancelled is terminated, never reused.
        """
        error: BaseException | None = None
        try:
            if how == "commit":
                try:
                    await conn.execute("COMMIT")
                except asyncpg.PostgresError as exc:
                    error = exc
                    how = "discard" if isinstance(exc, _LOST_ERRORS) else "rollback"
            if how == "rollback" and not _is_closed(conn) and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the release
            error = error or exc
            discard = True
        if how == "discard" or discard or (not _is_closed(conn) and conn.is_in_transaction()):
            self._discard(conn)
        try:
            await self._pool.release(conn)  # a closed connection: bookkeeping only, no I/O
        except (*_LOST_ERRORS, asyncpg.PostgresError):
            self._discard(conn)
        if error is not None:
            raise error

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
        """One statement, committed on its own (one trip through the bridge)."""
        return await self.oneshot.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        """One statement, committed on its own (one trip through the bridge)."""
        return await self.oneshot.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One statement, committed on its own (one trip through the bridge)."""
        return await self.oneshot.fetchval(sql, *args)

    async def one(
        self,
        method: str,
        sql: str,
        args: Sequence[Any],
        *,
        atomic: bool = False,
        timeout: float = 10.0,
    ) -> Any:
        """``connection.<method>(sql, *args)`` on a pooled connection, in one bridge trip;
        with ``atomic``, between BEGIN and COMMIT.

        ``Unavailable`` when no connection comes within ``timeout`` or the connection is lost;
        PostgreSQL's own errors pass through (the transaction rolled back). Cancelled while it
        runs: the connection is terminated (never returned mid-operation; an open transaction
        dies with it) and ``trio.Cancelled`` raised.
        """
        try:
            return await aio(self._one_in_asyncio)(method, sql, args, atomic, timeout)
        except TimeoutError:
            raise Unavailable("The database is busy; try again.") from None
        except _LOST_ERRORS as exc:
            raise Unavailable("The database connection was lost.") from exc

    async def _one_in_asyncio(
        self, method: str, sql: str, args: Sequence[Any], atomic: bool, timeout: float
    ) -> Any:
        # Runs as one asyncio task: trio waits for it to finish, cleanup included, even when
        # cancelled (trio-asyncio cancels the task and waits), so no connection is left behind.
        conn = await self._pool.acquire(timeout=timeout)
        try:
            if atomic:
                await conn.execute("BEGIN")
            result = await getattr(conn, method)(sql, *args)
            if atomic:
                await conn.execute("COMMIT")
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _LOST_ERRORS):  # the session ended: never reuse it
                self._discard(conn)
                await self._pool.release(conn)
                raise
            # The server answered: the connection is fine; end the failed transaction.
            try:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
            except BaseException:
                self._discard(conn)
                await self._pool.release(conn)
                raise
            await self._pool.release(conn)
            raise
        except BaseException:  # cancelled mid-statement, or the connection broke
            self._discard(conn)
            await self._pool.release(conn)  # a closed connection: bookkeeping only, no I/O
            raise
        await self._pool.release(conn)
        return result

    @contextlib.asynccontextmanager
    async def listen(
        self,
        channel: str,
        *,
        buffer: int = 10_000,
        connect_timeout_s: float = 5.0,
        application_name: str = "threadline-broker",
    ) -> AsyncIterator[Listener]:
        """A dedicated connection (never from the pool) LISTENing on ``channel`` for the block.

        Its session commits asynchronously (``synchronous_commit=off``): what it notifies
        itself is ephemeral, and durable events are notified by the transactions that write
        them. Raises ``Unavailable`` if it cannot connect; the connection is closed on exit
        (terminated if closing does not finish in time, or if the block was cancelled).
        """
        try:
            conn = await aio(asyncpg.connect)(
                self._dsn,
                timeout=connect_timeout_s,
                server_settings={
                    "application_name": application_name[:63],
                    "synchronous_commit": "off",
                },
            )
        except (TimeoutError, *_CONNECTION_ERRORS) as exc:
            raise Unavailable("The database is unavailable.") from exc
        listener = Listener(conn, channel, buffer)
        try:
            conn.add_termination_listener(listener._on_termination)
            try:
                await aio(conn.add_listener)(channel, listener._on_notification)
            except _CONNECTION_ERRORS as exc:
                raise Unavailable("The database is unavailable.") from exc
            yield listener
        finally:
            listener._lose("closed")
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S) as scope:
                if not conn.is_closed():
                    try:
                        await aio(conn.close)()
                    except _CONNECTION_ERRORS:
                        pass
            if scope.cancelled_caught or not conn.is_closed():
                AsyncioThread.get().call(conn.terminate)

    async def ping(self, timeout: float = 1.0) -> float:
        """Run ``SELECT 1`` within ``timeout``; return the latency in seconds."""
        start = trio.current_time()
        with trio.fail_after(timeout):
            async with self.connection(timeout=timeout) as conn:
                await aio(conn.fetchval)("SELECT 1")
        return trio.current_time() - start


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (``RESET ALL; UNLISTEN *; ...``): one
    round trip saved per borrowed connection. Pooled connections carry no session state: no
    code here runs a session-level SET, LISTEN (the broker has a connection of its own), session
    advisory locks or held cursors on them. An open transaction is still rolled back by asyncpg
    (and ``connection()`` terminates such a connection before that)."""


def _json_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_loads(value: str) -> Any:
    return json.loads(value)
