"""Decoding untrusted JSON (REST bodies, WebSocket frames) within limits.

``json.loads`` alone is not safe on hostile input: about 1,000 nested arrays raise
``RecursionError`` (a 500 over REST, a dropped WebSocket), an integer of 5,000 digits raises
``ValueError`` from CPython's int-string limit (4,300 digits) after quadratic work, a float such as
``1e999`` silently becomes infinity, and ``NaN``/``Infinity`` are accepted though JSON has no such
values. ``loads`` refuses every one of these with ``BadRequest`` (400 ``bad_request``, or a
failed WebSocket reply), so callers need to handle one exception only.

Limits (documented in docs/api.md): nesting at most ``MAX_DEPTH`` arrays/objects deep, numbers at
most ``MAX_NUMBER_CHARS`` characters and finite. No field of the API comes near either.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from typing import Any

from server.errors import BadRequest

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40  # 10**39 > 2**128; every integer field of the API fits in 64 bits

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_WEIGHTS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def loads(raw: str | bytes) -> Any:
    """Decode ``raw`` as JSON, or raise ``BadRequest`` (never another exception).

    Invalid JSON, invalid UTF-8, nesting deeper than ``MAX_DEPTH``, a number longer than
    ``MAX_NUMBER_CHARS`` characters and non-finite numbers are all refused.
    """
    if too_deep(raw):
        raise BadRequest(
            f"JSON nested deeper than {MAX_DEPTH} levels is not accepted.",
            details={"max_depth": MAX_DEPTH},
        )
    try:
        return json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        # JSONDecodeError is a ValueError; RecursionError cannot happen past the depth check,
        # but a bug in that check must still end as a client error, not a crash.
        raise BadRequest("The JSON is not valid.") from None


def too_deep(raw: str | bytes) -> bool:
    """True if ``raw`` nests arrays/objects more than ``MAX_DEPTH`` deep (exact for valid JSON).

    Free when the text holds few brackets; otherwise strips the strings and takes the maximum
    running depth over the brackets left, in C-speed passes (a few ms for a 64 KiB frame).
    Unbalanced text (invalid anyway) counts its unclosed brackets as depth.
    """
    if isinstance(raw, str):
        if raw.count("[") + raw.count("{") <= MAX_DEPTH:
            return False
        data = raw.encode("utf-8", "surrogatepass")
    else:
        data = raw
        if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
            return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    # Opening brackets weigh 2, closing 0: after i brackets, depth = running sum - i.
    weights = brackets.translate(_WEIGHTS)
    depths = map(operator.sub, itertools.accumulate(weights), itertools.count(1))
    return max(depths, default=0) > MAX_DEPTH


def _number_check(text: str) -> None:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadRequest(
            f"Numbers longer than {MAX_NUMBER_CHARS} characters are not accepted.",
            details={"max_number_chars": MAX_NUMBER_CHARS},
        )


def _int(text: str) -> int:
    _number_check(text)
    return int(text)


def _float(text: str) -> float:
    _number_check(text)
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest("Numbers must be finite.")
    return value


def _constant(text: str) -> Any:
    raise BadRequest(f"{text} is not a JSON value.")
