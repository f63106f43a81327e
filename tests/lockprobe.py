"""Counting a unit of work's trips through the database bridge, and what it holds between them.

``TripProbe`` wraps ``AsyncioThread.run`` (every hand-over between trio and the asyncpg loop).
After each trip that ``counts`` selects, it asks PostgreSQL, from a connection of its own,
whether a thread's row is locked (``FOR UPDATE NOWAIT``): a unit of work that held the row
across a trip, waiting for this event loop, is caught there. Between its trips a one-statement
unit of work holds nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from server.db import AsyncioThread


class TripProbe:
    """Trips selected by ``counts()`` (called in the caller's task and context), and after
    each whether the row of ``thread_id`` was still locked."""

    def __init__(self, conn: psycopg.Connection[Any], counts: Callable[[], bool]) -> None:
        self._conn = conn
        self._counts = counts
        self.thread_id: str | None = None
        self.trips = 0
        self.locked_after: list[bool] = []

    def reset(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.trips = 0
        self.locked_after = []

    def _row_locked(self) -> bool:
        assert self.thread_id is not None
        try:
            self._conn.execute(
                "SELECT 1 FROM threads WHERE id = %s FOR UPDATE NOWAIT",
                (uuid.UUID(self.thread_id),),
            )
            return False
        except psycopg.errors.LockNotAvailable:
            return True
        finally:
            self._conn.rollback()

    def after_trip(self) -> None:
        if self.thread_id is not None and self._counts():
            self.trips += 1
            self.locked_after.append(self._row_locked())


@contextmanager
def trip_probe(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, counts: Callable[[], bool]
) -> Iterator[TripProbe]:
    """Install a ``TripProbe`` on the process's bridge for the block."""
    bridge = AsyncioThread.get()
    inner = bridge.run
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET lock_timeout = '1s'")
        conn.commit()
        probe = TripProbe(conn, counts)

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await inner(fn, *args, **kwargs)
            finally:
                probe.after_trip()

        monkeypatch.setattr(bridge, "run", counted)
        yield probe
