"""Handlers of the message commands: send (idempotent), edit and delete (optimistic versions)."""

from __future__ import annotations

import json
from typing import Any

import structlog

from server.commands.models import DeleteMessage, EditMessage, SendMessage
from server.commands.serialize import message_to_dict
from server.commands.unit import CommandContext, CommandResult, require_id
from server.errors import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    NotFound,
    ValidationFailed,
    VersionConflict,
)
from server.services import ReplyRequest
from server.storage import messages, threads

log = structlog.get_logger(__name__)


def _content_error(message: str) -> dict[str, Any]:
    return {"fields": ["content"], "errors": [{"field": "content", "message": message}]}


def _check_length(ctx: CommandContext, content: str) -> None:
    limit = ctx.services.settings.max_message_chars
    if len(content) > limit:
        raise ValidationFailed(
            "The message is too long.",
            details=_content_error(f"at most {limit} characters"),
        )
    if not content.strip():
        raise ValidationFailed("The message is empty.", details=_content_error("must not be blank"))


async def send_message(ctx: CommandContext, cmd: SendMessage) -> CommandResult:
    """Append a user message (and its ``message.created`` event) to a thread, in one statement.

    ``tl_send_message`` locks the thread row, so sends to one thread are serialised; a
    ``client_msg_id`` already used in the thread returns that message (``created=False``) if the
    content matches, else ``IdempotencyConflict``. With ``reply`` and a project budget already
    spent this month, ``BudgetExceeded`` and nothing is written. The assistant is asked to reply
    after commit.
    """
    _check_length(ctx, cmd.content)
    thread_id = require_id(cmd.thread_id)
    row = await messages.send(
        ctx.tx,
        author_id=ctx.user_id,
        thread_id=thread_id,
        content=cmd.content,
        client_msg_id=cmd.client_msg_id,
        reply=cmd.reply,
    )
    outcome = row["outcome"]
    if outcome == "not_found":
        raise NotFound("No such thread.")
    if outcome == "budget_exceeded":
        raise BudgetExceeded(
            "This project has used its monthly budget.",
            details={"monthly_budget_usd": float(row["budget"]), "spend_usd": float(row["spent"])},
        )
    data: dict[str, Any] = json.loads(row["message"])
    if outcome == "conflict":
        raise IdempotencyConflict(
            "This client_msg_id was already used with different content.",
            details={"client_msg_id": cmd.client_msg_id, "message_id": data["id"]},
        )
    if outcome == "existing":
        return CommandResult(data, created=False)
    ctx.written(thread_id, "message.created", int(row["seq"]), data)
    assistant = ctx.services.assistant
    if cmd.reply and assistant is not None:
        request = ReplyRequest(
            thread_id=thread_id,
            project_id=str(row["project_id"]),
            user_message_id=data["id"],
            requested_by=ctx.user_id,
        )
        ctx.after_commit.append(lambda: assistant.start_reply(request))
    return CommandResult(data, created=True)


async def _lock_for_change(ctx: CommandContext, message_id: str, expected: int) -> tuple[int, str]:
    """Lock thread then message (the order every writer uses); check the expected version."""
    thread_id = await messages.owned_thread_of_message(ctx.tx, ctx.user_id, message_id)
    if thread_id is None:
        raise NotFound("No such message.")
    try:
        seq = await threads.lock_next_seq(ctx.tx, str(thread_id))
    except LookupError:  # the thread was deleted since the first read
        raise NotFound("No such message.") from None
    row = await messages.get_message(ctx.tx, ctx.user_id, message_id, for_update=True)
    if row is None:  # deleted with its thread between the two reads
        raise NotFound("No such message.")
    if row["version"] != expected:
        raise VersionConflict(
            "The message has changed since you read it.",
            details={"current_version": row["version"]},
        )
    if row["deleted_at"] is not None:
        raise Conflict("The message is deleted.", details={"current_version": row["version"]})
    if row["status"] == "streaming":
        raise Conflict("The reply is still being written.")
    return seq, str(thread_id)


async def edit_message(ctx: CommandContext, cmd: EditMessage) -> CommandResult:
    """Replace a message's content at ``expected_version``; emits ``message.updated``."""
    _check_length(ctx, cmd.content)
    message_id = require_id(cmd.message_id)
    seq, thread_id = await _lock_for_change(ctx, message_id, cmd.expected_version)
    row = await messages.edit_message(ctx.tx, message_id, cmd.content, cmd.expected_version)
    data = message_to_dict(row)
    await ctx.emit(thread_id, "message.updated", seq, data)
    return CommandResult(data)


async def delete_message(ctx: CommandContext, cmd: DeleteMessage) -> CommandResult:
    """Make a message a tombstone at ``expected_version``; emits ``message.deleted``."""
    message_id = require_id(cmd.message_id)
    seq, thread_id = await _lock_for_change(ctx, message_id, cmd.expected_version)
    row = await messages.soft_delete_message(ctx.tx, message_id, cmd.expected_version)
    data = message_to_dict(row)
    await ctx.emit(thread_id, "message.deleted", seq, data)
    return CommandResult(data)
