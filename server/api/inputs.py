"""Reading the inputs of the resource routes: JSON object bodies, query integers, If-Match."""

from __future__ import annotations

from typing import Any

from quart import request

from server import jsoninput
from server.commands.queries import field_error
from server.errors import BadRequest, ValidationFailed


async def json_object(*, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (``{}`` for an empty body when ``optional``).

    A body over ``MAX_CONTENT_LENGTH`` is refused by Quart (413 ``payload_too_large``) from its
    Content-Length, before it is read.
    """
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest("A JSON object body is required.")
    data: Any = jsoninput.loads(raw)
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def query_int(name: str) -> int | None:
    """An integer query parameter, or None when absent."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValidationFailed(
            f"{name} must be an integer.", details=field_error(name, "must be an integer")
        ) from None
    if abs(value) > 2**62:
        raise ValidationFailed(f"{name} is out of range.", details=field_error(name, "too large"))
    return value


def query_str(name: str) -> str | None:
    """A string query parameter, or None when absent or empty."""
    return request.args.get(name) or None


def if_match_version(body: dict[str, Any]) -> None:
    """Put the version from ``If-Match`` (quotes and ``W/`` tolerated) into ``expected_version``.

    The header wins over the body. Without either, command validation names
    ``expected_version`` as missing.
    """
    header = request.headers.get("If-Match")
    if header is None:
        return
    text = header.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip().strip('"').strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise ValidationFailed(
            "If-Match must be the message version, e.g. If-Match: 3.",
            details=field_error("If-Match", "must be an integer version"),
        )
    body["expected_version"] = int(text)
