"""Opaque list cursors: base64url of a small JSON keyset, validated when read back.

A cursor names the list it belongs to (``kind`` and the parent id) and the last key the previous
page ended on. Pages are keyset-paginated (``WHERE key > $cursor ORDER BY key``), so an insert
between two requests never shifts an item into the page already read or out of the next one.
A cursor that does not decode, belongs to another list or holds keys of the wrong shape is a
``BadRequest`` (400 ``bad_request``); a cursor is never trusted to carry anything but keys.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from server.errors import BadRequest

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def encode_cursor(kind: str, scope: str, key: list[Any]) -> str:
    """Make the opaque cursor for the page that follows ``key`` in list ``kind`` of ``scope``."""
    raw = json.dumps({"k": kind, "s": scope, "v": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, kind: str, scope: str, types: tuple[type, ...]) -> list[Any]:
    """Read a cursor back; its key must have one element of each type in ``types``."""
    bad = BadRequest("The cursor is not valid for this list.", details={"field": "cursor"})
    if len(cursor) > 512:
        raise bad
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise bad from None
    if not isinstance(body, dict) or body.get("k") != kind or body.get("s") != scope:
        raise bad
    key = body.get("v")
    if not isinstance(key, list) or len(key) != len(types):
        raise bad
    for value, expected in zip(key, types, strict=True):
        # bool is an int subclass in Python; a keyset never holds one.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise bad
    return key
