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
* Known devices are not kept out by strangers (OWASP's "device cookies"): a successful login
  sets ``tl_device``, a token bound to that account by an HMAC under the signing key. A login
  for the same account that presents it is counted in that device's own row instead of the
  account's, so an attacker who keeps the account's delay at its cap does not lock the owner
  out of the browsers they already use. A device's own wrong guesses are throttled alike, and
  its success resets only its own row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import structlog

from server import metrics
from server.config import Settings
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


DEVICE_COOKIE = "tl_device"
DEVICE_TTL_S = 180 * 86_400
_MAX_DEVICE_TOKEN = 200


def account_key(email: str) -> bytes:
    """The throttle's key for an e-mail address (case and surrounding spaces ignored)."""
    return hashlib.sha256(b"login:" + email.strip().lower().encode("utf-8")).digest()


def device_token(settings: Settings, email: str) -> str:
    """A new device token for the account of ``email`` (the ``tl_device`` cookie's value)."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_device_mac(settings, email, nonce)}"


def device_key(settings: Settings, email: str, token: str | None) -> bytes | None:
    """The throttle key of ``token`` if it is a valid device token of this account, else None."""
    if not token or len(token) > _MAX_DEVICE_TOKEN:
        return None
    nonce, _, mac = token.partition(".")
    if not nonce or not hmac.compare_digest(mac, _device_mac(settings, email, nonce)):
        return None
    return hashlib.sha256(b"device:" + nonce.encode("ascii", "replace")).digest()


def _device_mac(settings: Settings, email: str, nonce: str) -> str:
    message = b"device:" + account_key(email) + b":" + nonce.encode("ascii", "replace")
    digest = hmac.new(settings.signing_key().encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def admit(services: Services, email: str, device: str | None = None) -> None:
    """Count a login attempt for ``email`` (in its device's row when ``device`` is a valid
    device token of that account), or raise ``LoginThrottled`` if it must wait."""
    settings = services.settings
    wait = await store.admit_attempt(
        services.db,
        device_key(settings, email, device) or account_key(email),
        free=settings.login_free_attempts,
        base_s=settings.login_delay_base_s,
        max_s=settings.login_delay_max_s,
        forget_after_s=settings.login_forget_after_s,
    )
    if wait is not None:
        metrics.RATE_LIMITED.labels(transport="http").inc()
        log.info("auth.login_throttled", retry_after_s=round(wait, 3))
        raise LoginThrottled(wait)


async def succeeded(services: Services, email: str, device: str | None = None) -> None:
    """The right password was given: the attempts counted in the row this login was admitted
    by are forgotten (the device's, or else the account's). A known device's success leaves the
    account's row alone, so the owner logging in does not hand strangers fresh free guesses."""
    key = device_key(services.settings, email, device) or account_key(email)
    await store.forget(services.db, key)
