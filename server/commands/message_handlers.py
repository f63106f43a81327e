"""Handlers of the message commands: send (idempotent), edit and delete (optimistic versions).

Each is one statement (a plpgsql function: migrations 0006 and 0012) run by the bus on
``db.atomic``: BEGIN, the statement and COMMIT in one trip through the database bridge.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from server.commands.models import DeleteMessage, EditMessage, SendMessage
from server.commands.unit import CommandContext, CommandResult, require_id
from server.errors import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    NotFound,
    ValidationFailed,
    VersionConflict,
)
from server.services import ReplyHistory, ReplyRequest, ReplyStart, StartedReply
from server.storage import assistant as assistant_store
from server.storage import messages

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
    after commit; with an assistant, the statement is ``tl_send_and_start`` (migration 0014),
    which usually starts the reply itself (written, reserved, committed with the message), or
    refuses it (its failed message and event), or returns the history to start it from.
    """
    _check_length(ctx, cmd.content)
    thread_id = require_id(cmd.thread_id)
    assistant = ctx.services.assistant
    replying = cmd.reply and assistant is not None
    planner = getattr(assistant, "plan_start", None)
    start: ReplyStart | None = None
    if assistant is not None and planner is not None:
        # The send and its reply's start in one statement (``tl_send_and_start``): the reply
        # is written, reserved and committed with the message; its worker only calls the
        # provider.
        start = planner(thread_id, cmd.content, replying)
        assert start is not None
        row = await messages.send_and_start(
            ctx.tx,
            author_id=ctx.user_id,
            thread_id=thread_id,
            content=cmd.content,
            client_msg_id=cmd.client_msg_id,
            reply=cmd.reply,
            history=assistant_store.HISTORY_LIMIT,
            start=start,
        )
    else:
        row = await messages.send(
            ctx.tx,
            author_id=ctx.user_id,
            thread_id=thread_id,
            content=cmd.content,
            client_msg_id=cmd.client_msg_id,
            reply=cmd.reply,
            # The reply's prompt material, read under the send's thread lock: the reply's
            # start is then one statement (``tl_start_reply``) instead of two trips.
            history=assistant_store.HISTORY_LIMIT if replying else None,
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
    seq = int(row["seq"])
    ctx.written(thread_id, "message.created", seq, data)
    if replying and assistant is not None:
        reply = row["reply"] if start is not None else None
        started: StartedReply | None = None
        if reply == "started":
            message = json.loads(row["reply_message"])
            ctx.written(thread_id, "message.created", seq + 1, message)
            started = StartedReply(
                seq=seq + 1,
                message=message,
                summary=row["summary"],
                turns=[(str(role), str(content)) for role, content in row["turns"]],
                prompt_tokens=int(row["prompt_tokens"]),
                whole=bool(row["whole"]),
            )
        elif reply is not None and reply not in ("busy", "fallback"):
            # Refused by the statement (budget, content filter): written, no provider call.
            assert start is not None
            message = json.loads(row["reply_message"])
            ctx.written(thread_id, "message.created", seq + 1, message)
            failed = {
                "message_id": message["id"],
                "content": "",
                "status": "failed",
                "reason": reply,
                "message": start.budget_text if reply == "budget_exceeded" else start.refuse_text,
            }
            ctx.written(thread_id, "assistant.failed", seq + 2, failed)
            log.info("assistant.refused", thread_id=thread_id, reason=reply)
            return CommandResult(data, created=True)
        turns = row["turns"]
        request = ReplyRequest(
            thread_id=thread_id,
            project_id=str(row["project_id"]),
            user_message_id=data["id"],
            requested_by=ctx.user_id,
            history=None
            if turns is None or started is not None or reply == "busy"
            else ReplyHistory(
                seq=seq + 1,
                asked=cmd.content,
                summary=row["summary"],
                turns=[(str(role), str(content)) for role, content in turns],
            ),
            started=started,
        )
        ctx.after_commit.append(lambda: assistant.start_reply(request))
    return CommandResult(data, created=True)


async def _change(
    ctx: CommandContext, message_id: str, expected: int, content: str | None
) -> CommandResult:
    """Edit (``content``) or delete (None) at version ``expected``, in one statement.

    ``tl_change_message`` locks the thread then the message (the order every writer uses),
    checks the version and writes the change and its event; the thread row is held only while
    the database runs it (and its COMMIT, sent in the same trip).
    """
    row = await messages.change(
        ctx.tx,
        actor_id=ctx.user_id,
        message_id=message_id,
        expected_version=expected,
        content=content,
    )
    outcome = row["outcome"]
    if outcome == "not_found":
        raise NotFound("No such message.")
    if outcome == "version_conflict":
        raise VersionConflict(
            "The message has changed since you read it.",
            details={"current_version": row["current_version"]},
        )
    if outcome == "is_deleted":
        raise Conflict(
            "The message is deleted.", details={"current_version": row["current_version"]}
        )
    if outcome == "streaming":
        raise Conflict("The reply is still being written.")
    data: dict[str, Any] = json.loads(row["message"])
    type_ = "message.deleted" if outcome == "deleted" else "message.updated"
    ctx.written(str(row["thread_id"]), type_, int(row["seq"]), data)
    return CommandResult(data)


async def edit_message(ctx: CommandContext, cmd: EditMessage) -> CommandResult:
    """Replace a message's content at ``expected_version``; emits ``message.updated``."""
    _check_length(ctx, cmd.content)
    return await _change(ctx, require_id(cmd.message_id), cmd.expected_version, cmd.content)


async def delete_message(ctx: CommandContext, cmd: DeleteMessage) -> CommandResult:
    """Make a message a tombstone at ``expected_version``; emits ``message.deleted``."""
    return await _change(ctx, require_id(cmd.message_id), cmd.expected_version, None)
