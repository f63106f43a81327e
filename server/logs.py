"""structlog set-up: JSON lines for machines, console rendering for a terminal.

Context (request id, user id, connection id, thread id, trace id) is bound with
``structlog.contextvars.bind_contextvars`` and flows to every line; call sites never format.
Every line also names the node that wrote it (``node_id``, ``THREADLINE_NODE_ID``), so the logs
of several nodes can be merged and still be read.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_REDACT_KEYS = frozenset(
    {"password", "token", "access_token", "api_key", "secret", "authorization"}
)


_node_id: str | None = None


def set_node_id(node_id: str | None) -> None:
    """Name this process's node on every log line from now on."""
    global _node_id
    _node_id = node_id


def _add_node_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if _node_id is not None:
        event.setdefault("node_id", _node_id)
    return event


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Never let a secret reach a log line, whatever a call site passes."""
    for key in list(event):
        if key.lower() in _REDACT_KEYS:
            event[key] = "[redacted]"
    return event


def configure_logging(fmt: str = "auto", level: str = "info", node_id: str | None = None) -> None:
    """Configure structlog and the standard library's logging to write one format to stderr."""
    if node_id is not None:
        set_node_id(node_id)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_node_id,
        _redact,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hypercorn.access", "httpx", "httpcore", "openai", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
