"""Reads of the REST resources, each in one short read transaction, scoped to the principal.

Lists return ``{"items": [...], "next_cursor": str | None}``. They are keyset-paginated:
projects and threads by ``(created_at, id)`` ascending, messages by ``seq`` ascending (or,
with ``before_seq``, the page just before it, still in ascending order, with a cursor that keeps
going back), a message's history by ``version``. ``next_cursor`` is null on the last page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.commands.serialize import (
    edit_to_dict,
    message_to_dict,
    project_to_dict,
    rfc3339,
    thread_to_dict,
)
from server.commands.unit import require_id
from server.db import Record
from server.errors import BadRequest, NotFound, ValidationFailed
from server.principal import Principal
from server.services import Services
from server.storage import messages, projects, threads
from server.storage.pagination import DEFAULT_LIMIT, MAX_LIMIT, decode_cursor, encode_cursor
from server.storage.usage import project_usage

Page = dict[str, Any]


def field_error(name: str, message: str) -> dict[str, Any]:
    """``ValidationFailed`` details for one field, in the shape pydantic errors get."""
    return {"fields": [name], "errors": [{"field": name, "message": message}]}


def check_limit(limit: int | None) -> int:
    """The page size: 1-200, default 50."""
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(
            f"limit must be between 1 and {MAX_LIMIT}.", details=field_error("limit", "1-200")
        )
    return limit


def _time_keyset(cursor: str | None, kind: str, scope: str) -> tuple[datetime, str] | None:
    if cursor is None:
        return None
    created_at, row_id = decode_cursor(cursor, kind, scope, (str, str))
    try:
        return datetime.fromisoformat(created_at.replace("Z", "+00:00")), require_id(row_id)
    except (ValueError, NotFound):  # a malformed id inside a cursor is tampering, not a 404
        raise BadRequest(
            "The cursor is not valid for this list.", details={"field": "cursor"}
        ) from None


def _time_page(rows: list[Record], limit: int, kind: str, scope: str, items: list[Any]) -> Page:
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(kind, scope, [rfc3339(last["created_at"]), str(last["id"])])
    return {"items": items[:limit], "next_cursor": next_cursor}


async def get_project(services: Services, who: Principal, project_id: str) -> dict[str, Any]:
    """One of the principal's projects."""
    project_id = require_id(project_id)
    async with services.db.transaction() as tx:
        row = await projects.get_project(tx, who.user_id, project_id)
    if row is None:
        raise NotFound("No such project.")
    return project_to_dict(row)


async def list_projects(
    services: Services, who: Principal, *, limit: int | None, cursor: str | None
) -> Page:
    """The principal's projects, oldest first."""
    size = check_limit(limit)
    after = _time_keyset(cursor, "projects", who.user_id)
    async with services.db.transaction() as tx:
        rows = await projects.list_projects(tx, who.user_id, after, size + 1)
    items = [project_to_dict(r) for r in rows]
    return _time_page(rows, size, "projects", who.user_id, items)


async def project_usage_report(
    services: Services, who: Principal, project_id: str
) -> dict[str, Any]:
    """Tokens and cost of a project: this month, in total, and by model."""
    project_id = require_id(project_id)
    async with services.db.transaction() as tx:
        if await projects.get_project(tx, who.user_id, project_id) is None:
            raise NotFound("No such project.")
        return await project_usage(tx, project_id)


async def get_thread(services: Services, who: Principal, thread_id: str) -> dict[str, Any]:
    """One of the principal's threads."""
    thread_id = require_id(thread_id)
    async with services.db.transaction() as tx:
        row = await threads.get_thread(tx, who.user_id, thread_id)
    if row is None:
        raise NotFound("No such thread.")
    return thread_to_dict(row)


async def list_threads(
    services: Services, who: Principal, project_id: str, *, limit: int | None, cursor: str | None
) -> Page:
    """Threads of one of the principal's projects, oldest first."""
    project_id = require_id(project_id)
    size = check_limit(limit)
    after = _time_keyset(cursor, "threads", project_id)
    async with services.db.transaction() as tx:
        if await projects.get_project(tx, who.user_id, project_id) is None:
            raise NotFound("No such project.")
        rows = await threads.list_threads(tx, project_id, after, size + 1)
    items = [thread_to_dict(r) for r in rows]
    return _time_page(rows, size, "threads", project_id, items)


async def list_messages(
    services: Services,
    who: Principal,
    thread_id: str,
    *,
    limit: int | None,
    cursor: str | None,
    after_seq: int | None = None,
    before_seq: int | None = None,
) -> Page:
    """Messages of a thread by seq (tombstones included); see the module docstring."""
    thread_id = require_id(thread_id)
    size = check_limit(limit)
    if after_seq is not None and before_seq is not None:
        raise ValidationFailed(
            "Give after_seq or before_seq, not both.",
            details=field_error("before_seq", "not together with after_seq"),
        )
    for name, value in (("after_seq", after_seq), ("before_seq", before_seq)):
        if value is not None and value < 0:
            raise ValidationFailed(
                f"{name} must not be negative.", details=field_error(name, "must be >= 0")
            )
    backwards = before_seq is not None
    if cursor is not None:
        direction, seq = decode_cursor(cursor, "messages", thread_id, (str, int))
        if direction not in ("after", "before") or seq < 0:
            raise BadRequest("The cursor is not valid for this list.", details={"field": "cursor"})
        backwards = direction == "before"
        after_seq, before_seq = (None, seq) if backwards else (seq, None)
    async with services.db.transaction() as tx:
        if await threads.get_thread(tx, who.user_id, thread_id) is None:
            raise NotFound("No such thread.")
        rows = await messages.list_messages(
            tx, thread_id, after_seq=after_seq, before_seq=before_seq, limit=size + 1
        )
    next_cursor = None
    if len(rows) > size:
        if backwards:
            rows = rows[1:]  # the extra row is the oldest one
            next_cursor = encode_cursor("messages", thread_id, ["before", rows[0]["seq"]])
        else:
            rows = rows[:size]
            next_cursor = encode_cursor("messages", thread_id, ["after", rows[-1]["seq"]])
    return {"items": [message_to_dict(r) for r in rows], "next_cursor": next_cursor}


async def get_message(services: Services, who: Principal, message_id: str) -> dict[str, Any]:
    """One message of one of the principal's threads."""
    message_id = require_id(message_id)
    async with services.db.transaction() as tx:
        row = await messages.get_message(tx, who.user_id, message_id)
    if row is None:
        raise NotFound("No such message.")
    return message_to_dict(row)


async def message_history(
    services: Services, who: Principal, message_id: str, *, limit: int | None, cursor: str | None
) -> Page:
    """Every edit and delete of a message, oldest first: who, when, old and new, version."""
    message_id = require_id(message_id)
    size = check_limit(limit)
    after_version = 0
    if cursor is not None:
        (after_version,) = decode_cursor(cursor, "history", message_id, (int,))
    async with services.db.transaction() as tx:
        if await messages.get_message(tx, who.user_id, message_id) is None:
            raise NotFound("No such message.")
        rows = await messages.list_history(tx, message_id, after_version, size + 1)
    next_cursor = None
    if len(rows) > size:
        rows = rows[:size]
        next_cursor = encode_cursor("history", message_id, [rows[-1]["version"]])
    return {"items": [edit_to_dict(r) for r in rows], "next_cursor": next_cursor}
