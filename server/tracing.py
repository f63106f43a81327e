"""W3C Trace Context (``traceparent``): join a caller's trace without a tracing SDK.

A valid incoming ``traceparent`` (https://www.w3.org/TR/trace-context/#traceparent-header) puts its
trace id, and the caller's span as ``parent_span_id``, into the log context of the request, and
the response carries a ``traceparent`` of the same trace with a span id of our own, so a proxy or
client can stitch our log lines to its trace. An invalid header is ignored, never an error.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import structlog

HEADER = "traceparent"

# version "00" has exactly these four fields; a future version may append more after a dash.
_TRACEPARENT_RE = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?$"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class Span:
    """Our span of a caller's trace: the trace id, the caller's span and ours."""

    trace_id: str
    parent_id: str
    span_id: str
    flags: str

    def traceparent(self) -> str:
        """The header value that names this span to whoever we answer."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def new_span_id() -> str:
    """A random, non-zero 8-byte span id in lower-case hex."""
    while True:
        span = secrets.token_hex(8)
        if span != _ZERO_SPAN:
            return span


def parse_traceparent(value: str | None) -> Span | None:
    """Our child span of the trace ``value`` names; None when absent or invalid."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip())
    if match is None:
        return None
    version = match["version"]
    if version == "ff" or (version == "00" and match["rest"] is not None):
        return None
    if match["trace_id"] == _ZERO_TRACE or match["parent_id"] == _ZERO_SPAN:
        return None
    return Span(
        trace_id=match["trace_id"],
        parent_id=match["parent_id"],
        span_id=new_span_id(),
        # Only the "sampled" bit is defined; other bits are not ours to pass on (spec 3.2.2.5).
        flags="01" if int(match["flags"], 16) & 0x01 else "00",
    )


def bind_trace(value: str | None) -> Span | None:
    """Parse ``value`` and, when valid, bind its ids into the structlog context."""
    span = parse_traceparent(value)
    if span is not None:
        structlog.contextvars.bind_contextvars(
            trace_id=span.trace_id, parent_span_id=span.parent_id, span_id=span.span_id
        )
    return span
