"""Resources as clients see them: the one place rows become JSON-ready dicts.

REST responses, WebSocket replies and event payloads all use these functions, so a message looks
the same everywhere. Times are RFC 3339 in UTC with a ``Z``; money is a JSON number of USD.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from server.db import Record


def rfc3339(value: datetime | None) -> str | None:
    """``2026-11-29T05:13:24.123456Z``, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _money(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _id(value: Any) -> str | None:
    return None if value is None else str(value)


def project_to_dict(row: Record) -> dict[str, Any]:
    """A project: ``monthly_budget_usd`` null means no limit."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "monthly_budget_usd": _money(row["monthly_budget_usd"]),
        "spend_this_month_usd": _money(row["spend_this_month_usd"]),
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }


def thread_to_dict(row: Record) -> dict[str, Any]:
    """A thread with its counters (``message_count`` excludes deleted messages)."""
    return {
        "id": str(row["id"]),
        "project_id": str(row["project_id"]),
        "title": row["title"],
        "message_count": row["message_count"],
        "last_message_at": rfc3339(row["last_message_at"]),
        "last_seq": row["last_seq"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }


def message_to_dict(row: Record) -> dict[str, Any]:
    """A message, exactly as REST returns it and as ``message.*`` event payloads carry it.

    A deleted message is a tombstone: ``deleted`` true and ``content`` "" (the old text is only
    in the owner's ``/history``).
    """
    deleted = row["deleted_at"] is not None
    return {
        "id": str(row["id"]),
        "thread_id": str(row["thread_id"]),
        "seq": row["seq"],
        "role": row["role"],
        "content": "" if deleted else row["content"],
        "status": row["status"],
        "version": row["version"],
        "created_at": rfc3339(row["created_at"]),
        "edited_at": rfc3339(row["edited_at"]),
        "deleted": deleted,
        "deleted_at": rfc3339(row["deleted_at"]),
        "client_msg_id": row["client_msg_id"],
        "reply_to": _id(row["reply_to"]),
        "model": row["model"],
    }


def edit_to_dict(row: Record) -> dict[str, Any]:
    """One entry of a message's history: who changed it, when, from what to what."""
    return {
        "version": row["version"],
        "kind": row["kind"],
        "editor_id": _id(row["editor_id"]),
        "created_at": rfc3339(row["created_at"]),
        "old_content": row["old_content"],
        "new_content": row["new_content"],
    }
