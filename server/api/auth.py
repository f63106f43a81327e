"""``/api/v1/auth``: register, login, logout, me; and the guard every HTTP request passes.

The guard (a ``before_app_request`` hook) refuses any request with a credential in its query
string (401, on every path), then charges the rate limiter on ``/api/`` routes: the client-IP
bucket always (auth routes cost ``AUTH_COST`` tokens: they run Argon2 and invite guessing), and
the user's bucket when the request carries a validly signed token.
"""

from __future__ import annotations

import re

import structlog
from pydantic import BaseModel, Field, field_validator
from quart import Blueprint, Response, jsonify, request

from server import auth, login_throttle, metrics
from server.api.context import client_ip, current_principal, current_services, parse_body
from server.errors import CsrfFailed, RateLimited, ThreadlineError, Unauthorized
from server.passwords import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS
from server.services import Services

log = structlog.get_logger(__name__)

blueprint = Blueprint("auth", __name__, url_prefix="/api/v1/auth")

AUTH_COST = 5.0
_AUTH_PATHS = frozenset({"/api/v1/auth/register", "/api/v1/auth/login"})
# The same shape the database's CHECK on users.email enforces.
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


class RegisterBody(BaseModel):
    """``POST /api/v1/auth/register``."""

    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip()
        if not _EMAIL_RE.match(value) or len(value) < 3:
            raise ValueError("must be an e-mail address")
        return value


class LoginBody(BaseModel):
    """``POST /api/v1/auth/login``: no strength rules here, a wrong password is simply wrong."""

    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)


@blueprint.before_app_request
async def guard_request() -> None:
    """Refuse credentials in URLs everywhere; rate-limit ``/api/`` by client IP and by user."""
    if auth.query_has_token(request.query_string):
        raise Unauthorized("Tokens are never accepted in a URL; use a header or the cookie.")
    if not request.path.startswith("/api/"):
        return
    services = current_services()
    try:
        cost = AUTH_COST if request.path in _AUTH_PATHS else 1.0
        # acquire_*: in a cluster a refusal by this node's share waits briefly for the shared
        # bucket's answer (server/cluster_limits.py); alone, the same as check_*.
        await services.limiter.acquire_ip(client_ip(), cost)
        user_id = _claimed_user_id(services)
        if user_id is not None:
            await services.limiter.acquire_user(user_id)
    except RateLimited as exc:
        metrics.RATE_LIMITED.labels(transport="http").inc()
        log.info("ratelimit.refused", transport="http", retry_after_s=round(exc.retry_after_s, 3))
        raise


@blueprint.post("/register")
async def register() -> tuple[Response, int]:
    """Create an account: 201 ``{"user": {...}}``."""
    _refuse_foreign_origin()
    body = await parse_body(RegisterBody)
    user = await auth.create_user(current_services(), body.email, body.password)
    return jsonify({"user": user.public()}), 201


@blueprint.post("/login")
async def login() -> Response:
    """Exchange credentials for an access token, a CSRF token and the two session cookies."""
    _refuse_foreign_origin()
    body = await parse_body(LoginBody)
    services = current_services()
    email = body.email.strip()
    device = request.cookies.get(login_throttle.DEVICE_COOKIE)
    user, issued = await auth.login(services, email, body.password, device)
    response = jsonify(
        {"user": user.public(), "access_token": issued.token, "csrf_token": issued.csrf_token}
    )
    secure = _cookies_secure(services)
    max_age = services.settings.access_token_ttl_s
    response.set_cookie(
        auth.SESSION_COOKIE,
        issued.token,
        max_age=max_age,
        path="/",
        secure=secure,
        httponly=True,
        samesite="Strict",
    )
    response.set_cookie(
        auth.CSRF_COOKIE,
        issued.csrf_token,
        max_age=max_age,
        path="/",
        secure=secure,
        httponly=False,
        samesite="Strict",
    )
    if login_throttle.device_key(services.settings, email, device) is None:
        # This browser is now a known device of the account (see server/login_throttle.py).
        response.set_cookie(
            login_throttle.DEVICE_COOKIE,
            login_throttle.device_token(services.settings, email),
            max_age=login_throttle.DEVICE_TTL_S,
            path="/api/v1/auth/login",
            secure=secure,
            httponly=True,
            samesite="Strict",
        )
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.post("/logout")
async def logout() -> Response:
    """Revoke the token used for this request and clear the cookies: 204."""
    principal = await current_principal()
    services = current_services()
    await auth.revoke(services, principal)
    realtime = services.extras.get("realtime")
    if realtime is not None:  # sockets opened with this token close too (4001 token_revoked)
        realtime.close_token(principal.jti)
    response = Response("", status=204)
    secure = _cookies_secure(services)
    for name, http_only in ((auth.SESSION_COOKIE, True), (auth.CSRF_COOKIE, False)):
        response.delete_cookie(name, path="/", secure=secure, httponly=http_only, samesite="Strict")
    return response


@blueprint.get("/me")
async def me() -> Response:
    """The authenticated user: ``{"user": {"id", "email"}}``."""
    principal = await current_principal()
    return jsonify({"user": {"id": principal.user_id, "email": principal.email}})


def _refuse_foreign_origin() -> None:
    # Login CSRF: a foreign page must not log a browser into the attacker's account.
    origin = request.headers.get("Origin")
    if origin is not None and not auth.origin_allowed(current_services().settings, origin):
        raise CsrfFailed("The request comes from an origin that is not allowed.")


def _cookies_secure(services: Services) -> bool:
    settings = services.settings
    if settings.env == "production" or request.scheme in ("https", "wss"):
        return True
    if (settings.public_url or "").startswith("https://"):
        return True
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "").lower()
    # TLS ended at a trusted proxy in front of us.
    return forwarded_proto == "https" and services.limiter.is_trusted_proxy(request.remote_addr)


def _claimed_user_id(services: Services) -> str | None:
    """The ``sub`` of a validly signed token on the request (no database), for rate limiting."""
    try:
        token = auth.bearer_token(request.headers) or request.cookies.get(auth.SESSION_COOKIE)
        if not token:
            return None
        return auth.verified_token(services, token).user_id
    except ThreadlineError:
        return None  # the handler will refuse it properly if it needs a user
