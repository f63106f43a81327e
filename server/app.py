"""The quart-trio application: request ids, error envelope, HTTP metrics, routes."""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import structlog
import trio
from quart import Response, g, jsonify, request, websocket
from quart.typing import ResponseTypes
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from server import metrics, openapi, tracing, webui
from server.api import messages as messages_api
from server.api import projects as projects_api
from server.api import threads as threads_api
from server.api.auth import blueprint as auth_blueprint
from server.errors import ThreadlineError, error_envelope
from server.ops import blueprint as ops_blueprint
from server.services import Services

log = structlog.get_logger(__name__)

# How long an answered request's unread body may take to arrive (see ``_settle_body``).
BODY_DRAIN_S = 5.0

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._\-]{8,128}$")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "payload_too_large",
    415: "bad_request",
    422: "validation_failed",
    429: "rate_limited",
    503: "unavailable",
}


def request_id_from(incoming: str | None) -> str:
    """A valid incoming ``X-Request-ID`` as it is, else a new id."""
    return incoming if incoming and _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    return g.get("request_id")  # type: ignore[no-any-return]


async def _settle_body(response: Response) -> None:
    """Finish reading the request body before answering, or say the connection will close.

    A refusal decided before the body was read (429 from the limiter, 401, 404, ...) would
    otherwise go out while the body is still arriving; hypercorn then closes the keep-alive
    connection without a ``Connection: close``, and the client's next request on it is lost.
    A body that cannot be read within ``BODY_DRAIN_S`` or is over the size limit is not read:
    the response says ``Connection: close`` instead, so the client opens a new connection.
    """
    try:
        with trio.move_on_after(BODY_DRAIN_S):
            await request.get_data(as_text=False)  # cached: free if the handler read it
            return
    except HTTPException:  # the body is over MAX_CONTENT_LENGTH: never read it
        pass
    response.headers["Connection"] = "close"


def create_app(services: Services) -> QuartTrio:
    """Build the app around already-started services."""
    app = QuartTrio("threadline")
    app.config["SERVICES"] = services
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.before_request
    async def _start() -> None:
        g.request_id = request_id_from(request.headers.get("X-Request-ID"))
        g.started = trio.current_time()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id, method=request.method)
        g.span = tracing.bind_trace(request.headers.get(tracing.HEADER))

    @app.before_websocket
    async def _start_websocket() -> None:
        # WebSockets on paths other than /ws (which server/ws.py serves before Quart sees it).
        g.request_id = request_id_from(websocket.headers.get("X-Request-ID"))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)
        g.span = tracing.bind_trace(websocket.headers.get(tracing.HEADER))

    @app.after_websocket
    async def _finish_websocket(response: ResponseTypes | None) -> ResponseTypes | None:
        # A refused handshake is a plain HTTP answer: it carries the request id like any other.
        if response is not None:
            response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
            span = g.get("span")
            if span is not None:
                response.headers[tracing.HEADER] = span.traceparent()
        return response

    @app.after_request
    async def _finish(response: Response) -> Response:
        await _settle_body(response)
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        span = g.get("span")
        if span is not None:
            response.headers[tracing.HEADER] = span.traceparent()
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        started = g.get("started")
        duration = trio.current_time() - started if started is not None else 0.0
        metrics.HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        metrics.HTTP_DURATION.labels(request.method, route).observe(duration)
        if route not in ("/metrics", "/healthz", "/readyz"):
            log.info(
                "http.request",
                route=route,
                status=response.status_code,
                duration_ms=round(duration * 1000, 2),
            )
        return response

    @app.errorhandler(ThreadlineError)
    async def _domain_error(exc: ThreadlineError) -> tuple[Response, int, dict[str, str]]:
        headers: dict[str, str] = {}
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            headers["Retry-After"] = str(max(1, int(retry + 0.999)))
        return jsonify(exc.envelope(current_request_id())), exc.status, headers

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "internal" if status >= 500 else "bad_request")
        message = exc.description or exc.name
        if status == 413:
            message = "The request body is too large."
        return jsonify(error_envelope(code, message, current_request_id())), status

    @app.errorhandler(asyncpg.CharacterNotInRepertoireError)
    async def _unstorable_text(exc: Exception) -> tuple[Response, int]:
        # e.g. U+0000 in any text field: PostgreSQL cannot store it; the input is at fault.
        message = "The request contains characters that cannot be stored (such as NUL)."
        return jsonify(error_envelope("bad_request", message, current_request_id())), 400

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("http.unhandled_error")
        body: dict[str, Any] = error_envelope(
            "internal", "Something went wrong on our side.", current_request_id()
        )
        return jsonify(body), 500

    app.register_blueprint(ops_blueprint)
    # Also installs the guard: no tokens in URLs, rate limits on /api/ (server/api/auth.py).
    app.register_blueprint(auth_blueprint)
    for resource in (projects_api, threads_api, messages_api, openapi):
        app.register_blueprint(resource.blueprint)
    for register in services.extras.get("blueprints", []):
        register(app)
    # Last: the web client at / with its fallback routes, and the security headers.
    webui.register(app, services.settings.web_dir)
    return app
