"""Per-request helpers for API handlers: who is calling, from where, and the parsed body.

Usable only inside a Quart request handler. ``current_principal`` is the single entry point
for authentication: call it first in every protected handler.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError
from quart import current_app, g, request

from server import auth, jsoninput
from server.errors import BadRequest, ValidationFailed
from server.principal import Principal
from server.services import Services

M = TypeVar("M", bound=BaseModel)


def current_services() -> Services:
    """The process's services (set by ``create_app``)."""
    return cast(Services, current_app.config["SERVICES"])


async def current_principal() -> Principal:
    """The authenticated user of this request, or raise.

    Authenticates by ``Authorization: Bearer`` or else the ``tl_session`` cookie; a
    cookie-authenticated POST/PUT/PATCH/DELETE must also pass the CSRF check. Raises
    ``Unauthorized`` (401) or ``CsrfFailed`` (403). The result is cached for the request on
    ``quart.g`` and ``user_id`` is bound into the structlog context.
    """
    cached = g.get("principal")
    if isinstance(cached, Principal):
        return cached
    principal = await auth.authenticate(
        current_services(), request.method, request.headers, request.cookies
    )
    g.principal = principal
    return principal


def client_ip() -> str:
    """The client's address (``X-Forwarded-For`` is honoured only from a trusted proxy)."""
    return current_services().limiter.client_ip(
        request.remote_addr, request.headers.get("X-Forwarded-For")
    )


async def parse_body(model: type[M]) -> M:
    """The JSON body validated as ``model``.

    ``BadRequest`` if the body is not a JSON object; ``ValidationFailed`` naming the fields
    (``details.fields``, with one ``details.errors`` entry per problem) if it does not fit.
    """
    raw = await request.get_data(as_text=False)
    data: Any = jsoninput.loads(raw) if raw else None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
            for err in exc.errors(include_input=False, include_url=False)
        ]
        fields = sorted({e["field"] for e in errors})
        raise ValidationFailed(
            f"Invalid value for: {', '.join(fields)}.",
            details={"fields": fields, "errors": errors},
        ) from None
