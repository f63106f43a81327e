"""Per-account login throttling: slows guessing one account's password from any number of
addresses, without becoming a lock-out.

Beside the per-IP limiter (``server/ratelimit.py``), which slows one address guessing many
accounts, this slows many addresses guessing one account. Its state lives in PostgreSQL (table
``login_throttle``, one row per e-mail address being tried), so it holds for the whole cluster:
spreading guesses over nodes gains nothing.

Rules (settings ``THREADLINE_LOGIN_*``; docs/api.md "Login throttling"):

* The first ``login_free_attempts`` (5) attempts for an address go through at once. Each attempt
  after them must wait for the one before's delay: ``login_delay_base_s`` (1 s), then twice as
  long each time, at most ``login_delay_max_s`` (300 s; the schema refuses more than an hour).
* An attempt that comes too early is refused with 429 ``rate_limited`` and ``Retry-After``,
  without looking at the password (no hashing cost, and nothing learnt).
* Attempts are counted when admitted (so concurrent guesses cannot slip through together) and a
  successful login resets the count: the owner, arriving after the delay, gets in as usual.
  After ``login_forget_after_s`` (1 h) without attempts the address starts afresh.
* The key is the SHA-256 of the normalised address, known account or not: the throttle behaves
  the same for addresses with no account, so it reveals nothing about which ones exist.
"""

from __future__ import annotations

import hashlib

import structlog

from server import metrics
from server.errors import RateLimited
from server.services import Services
from server.storage import login_throttle as store

log = structlog.get_logger(__name__)


class LoginThrottled(RateLimited):
    """Too many login attempts for one account: 429 ``rate_limited`` with ``Retry-After``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(retry_after_s)
        self.message = "Too many login attempts for this account; try again later."
        self.args = (self.message,)


def account_key(email: str) -> bytes:
    """The throttle's key for an e-mail address (case and surrounding spaces ignored)."""
    return hashlib.sha256(b"login:" + email.strip().lower().encode("utf-8")).digest()


async def admit(services: Services, email: str) -> None:
    """Count a login attempt for ``email``, or raise ``LoginThrottled`` if it must wait."""
    settings = services.settings
    wait = await store.admit_attempt(
        services.db,
        account_key(email),
        free=settings.login_free_attempts,
        base_s=settings.login_delay_base_s,
        max_s=settings.login_delay_max_s,
        forget_after_s=settings.login_forget_after_s,
    )
    if wait is not None:
        metrics.RATE_LIMITED.labels(transport="http").inc()
        log.info("auth.login_throttled", retry_after_s=round(wait, 3))
        raise LoginThrottled(wait)


async def succeeded(services: Services, email: str) -> None:
    """The right password was given: the account's attempts are forgotten."""
    await store.forget(services.db, account_key(email))
