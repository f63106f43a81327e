"""Verified access tokens kept in memory, and the revocation feed that keeps them honest.

Authenticating a request used to cost a JWT verification and a database round trip (does the
user exist, is the ``jti`` revoked). A ``TokenCache`` remembers, per token string, the verified
claims and, once the database has confirmed it, the user's e-mail; later requests with the same
token cost a dictionary look-up.

The bound. A token revoked (logout) or whose user is deleted, on any node sharing the database,
is refused by every node at most ``bound_s`` (``THREADLINE_AUTH_REVOCATION_BOUND_S``, 1 s) after
the revoking transaction committed. How:

* each node polls the feed (``storage.tokens.revocations_since``: what was revoked since the
  horizon of its previous poll, by transaction id, so nothing committed late is missed) every
  ``bound_s / 2``;
* the cache answers without the database only while its last *successful* poll **started** less
  than ``bound_s`` ago. A poll sees every revocation committed before it started, so an answer
  from the cache is never more than ``bound_s`` behind the database;
* otherwise (the poller is late, the database is failing, or ``bound_s`` is 0) every request is
  checked in the database, as before.

A revocation made on this node (``revoke_local``) applies at once. Tokens are remembered until
they expire, at most ``max_entries`` of them (least recently used leave first).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

log = structlog.get_logger(__name__)

_DEFAULT_MAX_ENTRIES = 100_000


@dataclass(slots=True)
class Verified:
    """A token whose signature and claims have been checked."""

    user_id: str
    jti: str
    expires_at: float  # Unix time (the ``exp`` claim)
    email: str | None = None  # set once the database confirmed the user and the jti


@dataclass(frozen=True, slots=True)
class Revocations:
    """One poll's answer: the next horizon, revoked ``(jti, expires_at)`` and deleted users."""

    horizon: int
    revoked: list[tuple[str, float]]
    deleted: list[str]


class TokenCache:
    """Per-process memory of verified tokens and known revocations (see the module docstring).

    ``clock`` (trio's by default, so tests can use a MockClock) measures freshness; ``wall``
    (Unix time) is compared with token expiry.
    """

    def __init__(
        self,
        *,
        bound_s: float,
        leeway_s: float = 5.0,
        max_entries: int = _DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.bound_s = bound_s
        self.leeway_s = leeway_s
        self.max_entries = max_entries
        self._clock = clock
        self._wall = wall
        self._tokens: collections.OrderedDict[str, Verified] = collections.OrderedDict()
        self._revoked: dict[str, float] = {}  # jti -> expires_at (Unix)
        self._deleted: set[str] = set()
        self._horizon = 0
        self._polled_at: float | None = None  # clock time the last successful poll started
        self.polls = 0
        self.hits = 0  # requests answered without the database

    # -- tokens ------------------------------------------------------------------------------

    def get(self, token: str) -> Verified | None:
        """The verified claims of ``token`` if it was seen before and has not expired."""
        entry = self._tokens.get(token)
        if entry is None:
            return None
        if entry.expires_at + self.leeway_s < self._wall():
            del self._tokens[token]
            return None
        self._tokens.move_to_end(token)
        return entry

    def put(self, token: str, user_id: str, jti: str, expires_at: float) -> Verified:
        """Remember a token just verified (signature and claims)."""
        entry = Verified(user_id=user_id, jti=jti, expires_at=expires_at)
        self._tokens[token] = entry
        if len(self._tokens) > self.max_entries:
            self._tokens.popitem(last=False)
        return entry

    def is_revoked(self, entry: Verified) -> bool:
        """True if this node knows the token was revoked or its user deleted."""
        return entry.jti in self._revoked or entry.user_id in self._deleted

    def confirmed(self, entry: Verified) -> str | None:
        """The user's e-mail if ``entry`` may be accepted without asking the database now."""
        if entry.email is None or not self.fresh() or self.is_revoked(entry):
            return None
        self.hits += 1
        return entry.email

    def fresh(self) -> bool:
        """True while the last successful poll started less than ``bound_s`` ago."""
        return self._polled_at is not None and self._clock() - self._polled_at < self.bound_s

    # -- revocations -------------------------------------------------------------------------

    def revoke_local(self, jti: str, expires_at: float) -> None:
        """A revocation committed by this process: applies at once."""
        self._revoked[jti] = expires_at

    @property
    def horizon(self) -> int:
        return self._horizon

    def apply(self, started_at: float, result: Revocations) -> None:
        """Take in a poll that started at ``started_at`` (clock time) and succeeded."""
        for jti, expires_at in result.revoked:
            self._revoked[jti] = expires_at
        self._deleted.update(result.deleted)
        self._horizon = max(self._horizon, result.horizon)
        if self._polled_at is None or started_at > self._polled_at:
            self._polled_at = started_at
        self.polls += 1
        self._prune()

    def _prune(self) -> None:
        # A revoked token that has expired is refused on ``exp`` anyway.
        limit = self._wall() - self.leeway_s
        for jti in [j for j, exp in self._revoked.items() if exp < limit]:
            del self._revoked[jti]


Fetch = Callable[[int], Awaitable[Revocations]]


async def poll_revocations(cache: TokenCache, fetch: Fetch, *, interval_s: float) -> None:
    """Poll the revocation feed every ``interval_s`` until cancelled.

    A failed poll is logged and retried on the next tick; meanwhile the cache goes stale after
    ``bound_s`` and requests are checked in the database.
    """
    failures = 0
    while True:
        started = trio.current_time()
        try:
            cache.apply(started, await fetch(cache.horizon))
            if failures:
                log.info("auth.revocation_poll_recovered", failures=failures)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - retried next tick; the cache is bypassed meanwhile
            failures += 1
            if failures == 1 or failures % 60 == 0:
                log.warning("auth.revocation_poll_failed", error=type(exc).__name__, n=failures)
        await trio.sleep_until(started + interval_s)


@contextlib.asynccontextmanager
async def revocation_poller(cache: TokenCache, fetch: Fetch) -> AsyncIterator[None]:
    """Run ``poll_revocations`` (every ``bound_s / 2``) for the duration of the block.

    With ``bound_s`` 0 nothing runs: every request is checked in the database.
    """
    if cache.bound_s <= 0:
        yield
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: poll_revocations(cache, fetch, interval_s=max(cache.bound_s / 2, 0.01))
        )
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def revocations_from_row(row: Any) -> Revocations:
    """A ``storage.tokens.revocations_since`` row as ``Revocations``."""
    return Revocations(
        horizon=int(row["horizon"]),
        revoked=[(str(jti), float(exp)) for jti, exp in row["revoked"]],
        deleted=[str(user) for user in row["deleted"]],
    )
