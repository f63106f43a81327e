"""Accounts and credentials: register, log in, access tokens (JWT), CSRF tokens, revocation.

Transport-neutral: HTTP (``server.api``) and the WebSocket handshake both end up in
``principal_from_token``. Every failure is a ``ThreadlineError``: ``Unauthorized`` (401) for a
missing, malformed, forged, expired, revoked or misplaced credential, ``Forbidden`` (403) for a
cookie arriving from a foreign origin, ``CsrfFailed`` (403) for a missing or wrong CSRF token.
The messages never say which part of a credential was wrong.

Tokens: HS256 only (an allow-list; ``none`` and every other algorithm are refused), with the
claims ``exp``, ``iat``, ``aud`` (``"threadline"``), ``sub`` (user id), ``jti`` and ``typ``
(``"access"``) all required. A token is accepted only while its user exists and its ``jti`` is
not in ``revoked_tokens``. The first use of a token on a node checks both in the database; later
uses are answered from ``services.tokens`` (``server.authcache``), which every node keeps within
``THREADLINE_AUTH_REVOCATION_BOUND_S`` (1 s) of the database by polling the revocation feed:
a logout on any node is honoured by every node within that bound (at once on its own node).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

import asyncpg
import jwt
import structlog
from werkzeug.datastructures import Headers

from server import login_throttle
from server.authcache import Revocations, Verified, revocation_poller, revocations_from_row
from server.config import Settings
from server.errors import Conflict, CsrfFailed, Forbidden, Unauthorized, ValidationFailed
from server.passwords import Passwords
from server.principal import Principal
from server.services import Services
from server.storage import tokens as token_store
from server.storage import users as user_store

log = structlog.get_logger(__name__)

AUDIENCE = "threadline"
ALGORITHMS = ["HS256"]
TOKEN_TYPE = "access"
SESSION_COOKIE = "tl_session"
CSRF_COOKIE = "tl_csrf"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Query parameters that would carry a credential; their mere presence is refused (401).
QUERY_TOKEN_PARAMS = frozenset({"token", "access_token", "jwt", "auth", "session"})
_REQUIRED_CLAIMS = ["exp", "iat", "aud", "sub", "jti", "typ"]
_MAX_TOKEN_CHARS = 4096
_LEEWAY_S = 5  # clock skew tolerated between processes

# Quart's ``request.headers`` (case-insensitive) or any plain mapping.
HeaderMap = Mapping[str, str] | Headers

_BAD_TOKEN = "The access token is missing, invalid, expired or revoked."
_BAD_LOGIN = "The e-mail or password is not correct."


@dataclass(frozen=True, slots=True)
class User:
    """A user as clients see it."""

    id: str
    email: str

    def public(self) -> dict[str, str]:
        """The contract's ``user`` object."""
        return {"id": self.id, "email": self.email}


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly signed access token and the CSRF token that goes with its cookie session."""

    token: str
    jti: str
    expires_at: float
    csrf_token: str


def passwords(services: Services) -> Passwords:
    """The process's password hasher (made on first use from the settings)."""
    hasher = services.extras.get("passwords")
    if not isinstance(hasher, Passwords):
        hasher = Passwords(services.settings)
        services.extras["passwords"] = hasher
    return hasher


# -- tokens ----------------------------------------------------------------------------------


def sign_access_token(settings: Settings, user_id: str, *, now: float | None = None) -> IssuedToken:
    """Sign a new access token for ``user_id`` valid for ``access_token_ttl_s``."""
    issued = int(now if now is not None else time.time())
    expires = issued + settings.access_token_ttl_s
    jti = secrets.token_urlsafe(24)
    claims = {
        "sub": user_id,
        "aud": AUDIENCE,
        "iat": issued,
        "exp": expires,
        "jti": jti,
        "typ": TOKEN_TYPE,
    }
    token = jwt.encode(claims, settings.signing_key(), algorithm=ALGORITHMS[0])
    return IssuedToken(token, jti, float(expires), csrf_token_for(settings, jti))


async def issue_token(services: Services, user_id: str) -> str:
    """A valid bearer token for an existing user (for tests and tools; no password needed)."""
    return sign_access_token(services.settings, user_id).token


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """Verify signature, algorithm, audience, expiry and type; return the claims.

    Does not consult the database (see ``principal_from_token``). Raises ``Unauthorized``.
    """
    if not token or len(token) > _MAX_TOKEN_CHARS:
        raise Unauthorized(_BAD_TOKEN)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.signing_key(),
            algorithms=ALGORITHMS,
            audience=AUDIENCE,
            leeway=_LEEWAY_S,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as exc:
        log.info("auth.token_refused", reason=type(exc).__name__)
        raise Unauthorized(_BAD_TOKEN) from None
    sub, jti = claims.get("sub"), claims.get("jti")
    if (
        claims.get("typ") != TOKEN_TYPE
        or not isinstance(sub, str)
        or not _is_uuid(sub)
        or not isinstance(jti, str)
        or not 8 <= len(jti) <= 128
    ):
        log.info("auth.token_refused", reason="claims")
        raise Unauthorized(_BAD_TOKEN)
    return claims


def verified_token(services: Services, token: str) -> Verified:
    """``token``'s checked claims: from the cache, else verified now (``Unauthorized``)."""
    entry = services.tokens.get(token)
    if entry is None:
        claims = decode_access_token(services.settings, token)
        entry = services.tokens.put(token, claims["sub"], claims["jti"], float(claims["exp"]))
    return entry


async def principal_from_token(
    services: Services, token: str, via: Literal["cookie", "bearer"]
) -> Principal:
    """The user behind ``token`` if it is valid, unrevoked and its user still exists.

    The database is asked on a token's first use on this node and whenever the revocation
    cache is not fresh (see ``server.authcache``); otherwise no I/O at all.
    """
    cache = services.tokens
    entry = verified_token(services, token)
    if cache.is_revoked(entry):
        log.info("auth.token_refused", reason="revoked")
        raise Unauthorized(_BAD_TOKEN)
    email = cache.confirmed(entry)
    if email is None:
        async with services.db.statements() as tx:  # one round trip
            row = await token_store.get_session_user(tx, entry.user_id, entry.jti)
        if row is None or row["revoked"]:
            log.info("auth.token_refused", reason="revoked" if row is not None else "no_user")
            raise Unauthorized(_BAD_TOKEN)
        email = entry.email = row["email"]
    structlog.contextvars.bind_contextvars(user_id=entry.user_id)
    return Principal(
        user_id=entry.user_id, email=email, jti=entry.jti, expires_at=entry.expires_at, via=via
    )


async def revoke(services: Services, principal: Principal) -> None:
    """Revoke the principal's token server-side until it expires."""
    expires = datetime.fromtimestamp(principal.expires_at, UTC)
    async with services.db.transaction(actor_id=principal.user_id) as tx:
        await token_store.revoke_token(tx, principal.jti, principal.user_id, expires)
        # Keeps the list as short as the set of live tokens; cheap on the expiry index.
        purged = await token_store.purge_expired(tx, services.settings.access_token_ttl_s)
    services.tokens.revoke_local(principal.jti, principal.expires_at)
    log.info("auth.logged_out", purged_revocations=purged)


@contextlib.asynccontextmanager
async def auth_plugin(services: Services) -> AsyncIterator[None]:
    """Keep ``services.tokens`` fresh: poll the revocation feed while the server runs."""

    async def fetch(horizon: int) -> Revocations:
        async with services.db.statements() as tx:
            return revocations_from_row(await token_store.revocations_since(tx, horizon))

    async with revocation_poller(services.tokens, fetch):
        yield


# -- CSRF and origins ------------------------------------------------------------------------


def csrf_token_for(settings: Settings, jti: str) -> str:
    """The CSRF token of a cookie session: an HMAC of its ``jti``, so it cannot be planted."""
    mac = hmac.new(settings.signing_key().encode(), b"csrf:" + jti.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")


def origin_allowed(settings: Settings, origin: str) -> bool:
    """True if ``origin`` is one of the allowed origins (``THREADLINE_ALLOWED_ORIGINS``)."""
    return origin.rstrip("/") in {o.rstrip("/") for o in settings.origins}


def check_csrf(
    settings: Settings,
    principal: Principal,
    method: str,
    headers: HeaderMap,
    cookies: Mapping[str, str],
) -> None:
    """Refuse (``CsrfFailed``) an unsafe cookie-authenticated request without a valid CSRF token
    or from a foreign origin. Bearer-authenticated and safe-method requests pass."""
    if principal.via != "cookie" or method.upper() not in UNSAFE_METHODS:
        return
    origin = _header(headers, "Origin")
    if origin is not None and not origin_allowed(settings, origin):
        raise CsrfFailed("The request comes from an origin that is not allowed.")
    sent = _header(headers, CSRF_HEADER) or ""
    cookie = cookies.get(CSRF_COOKIE, "")
    expected = csrf_token_for(settings, principal.jti)
    ok = bool(sent) and hmac.compare_digest(sent.encode(), cookie.encode())
    ok = hmac.compare_digest(cookie.encode(), expected.encode()) and ok
    if not ok:
        raise CsrfFailed(f"Send the {CSRF_HEADER} header equal to the {CSRF_COOKIE} cookie.")


def query_has_token(query_string: bytes | str) -> bool:
    """True if the query string carries a credential-like parameter (always refused)."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    return any(
        name.lower() in QUERY_TOKEN_PARAMS
        for name, _ in parse_qsl(query_string, keep_blank_values=True)
    )


def bearer_token(headers: HeaderMap) -> str | None:
    """The token of an ``Authorization: Bearer`` header; ``Unauthorized`` for another scheme."""
    value = _header(headers, "Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Use 'Authorization: Bearer <token>'.")
    return token.strip()


async def authenticate(
    services: Services,
    method: str,
    headers: HeaderMap,
    cookies: Mapping[str, str],
) -> Principal:
    """Authenticate an HTTP request (bearer first, else the session cookie) and enforce CSRF."""
    token = bearer_token(headers)
    if token is not None:
        return await principal_from_token(services, token, "bearer")
    cookie = cookies.get(SESSION_COOKIE)
    if not cookie:
        raise Unauthorized("Authentication is required.")
    principal = await principal_from_token(services, cookie, "cookie")
    check_csrf(services.settings, principal, method, headers, cookies)
    return principal


async def authenticate_handshake(
    services: Services,
    headers: HeaderMap,
    cookies: Mapping[str, str],
    query_string: bytes,
) -> Principal:
    """Authenticate a WebSocket handshake (before upgrading).

    A token in the query string is refused (``Unauthorized``) even next to a valid header.
    A bearer header is enough. The session cookie needs an allowed ``Origin``, else
    ``Forbidden`` (browsers send cookies on cross-site WebSocket handshakes: CSWSH).
    """
    if query_has_token(query_string):
        raise Unauthorized("Tokens are never accepted in a URL; use a header or the cookie.")
    token = bearer_token(headers)
    if token is not None:
        return await principal_from_token(services, token, "bearer")
    cookie = cookies.get(SESSION_COOKIE)
    if not cookie:
        raise Unauthorized("Authentication is required.")
    origin = _header(headers, "Origin")
    if origin is None or not origin_allowed(services.settings, origin):
        raise Forbidden("This origin may not open a WebSocket with a session cookie.")
    return await principal_from_token(services, cookie, "cookie")


# -- accounts --------------------------------------------------------------------------------


async def create_user(services: Services, email: str, password: str) -> User:
    """Register a user. ``Conflict`` if the e-mail is taken (case-insensitively); ``Forbidden``
    on a single-user installation that already has its user."""
    password_hash = await passwords(services).hash(password)
    try:
        async with services.db.transaction() as tx:
            row = await user_store.insert_user(tx, email, password_hash)
    except asyncpg.UniqueViolationError:
        raise Conflict(
            "An account with this e-mail already exists.", details={"fields": ["email"]}
        ) from None
    except asyncpg.CheckViolationError as exc:
        if getattr(exc, "constraint_name", None) == "users_single_user":
            raise Forbidden(
                "This is a single-user installation and it already has its user."
            ) from None
        raise ValidationFailed(
            "The e-mail address is not valid.", details={"fields": ["email"]}
        ) from None
    user = User(id=str(row["id"]), email=row["email"])
    log.info("auth.registered", user_id=user.id)
    return user


async def create_user_with_token(
    services: Services, email: str | None = None, password: str = "correct horse battery"
) -> tuple[User, str]:
    """A new user (random e-mail unless given) and a bearer token for it: a test helper."""
    user = await create_user(
        services, email or f"user-{uuid.uuid4().hex[:12]}@example.com", password
    )
    return user, await issue_token(services, user.id)


async def login(
    services: Services, email: str, password: str, device: str | None = None
) -> tuple[User, IssuedToken]:
    """Check the credentials and sign a token; ``Unauthorized`` without saying what was wrong.

    An unknown e-mail costs one Argon2 verification too, so timing does not tell them apart.
    Attempts are throttled per account (``server/login_throttle.py``): ``LoginThrottled`` (429);
    ``device`` is the ``tl_device`` cookie, which lets a known device past the account's delay.
    Hashes made with older parameters are upgraded on a successful login.
    """
    await login_throttle.admit(services, email, device)  # 429 while the delay runs
    hasher = passwords(services)
    async with services.db.transaction() as tx:
        row = await user_store.get_user_by_email(tx, email)
    ok = await hasher.verify(row["password_hash"] if row is not None else None, password)
    if row is None or not ok:
        log.info("auth.login_failed")
        raise Unauthorized(_BAD_LOGIN)
    await login_throttle.succeeded(services, email, device)
    user = User(id=str(row["id"]), email=row["email"])
    if hasher.needs_rehash(row["password_hash"]):
        new_hash = await hasher.hash(password)
        async with services.db.transaction(actor_id=user.id) as tx:
            await user_store.set_password_hash(tx, user.id, new_hash)
        log.info("auth.password_rehashed", user_id=user.id)
    issued = sign_access_token(services.settings, user.id)
    structlog.contextvars.bind_contextvars(user_id=user.id)
    log.info("auth.logged_in")
    return user, issued


def _header(headers: HeaderMap, name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
