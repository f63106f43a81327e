"""The command bus: one handler per command, one transaction per command, events after commit.

``execute`` opens exactly one ``db.transaction(actor_id=principal.user_id)``, runs the handler
in it, and only once the transaction has committed publishes the handler's durable events
(``services.publish``) and runs its after-commit actions (e.g. asking the assistant to reply).
If the handler raises, the transaction rolls back and nothing is published.

A command whose whole unit of work is one statement (``ONE_STATEMENT``: a send is
``tl_send_message``, an edit or a delete ``tl_change_message``, which sets the actor for the
audit trail itself) runs it on ``db.atomic`` instead: BEGIN, the statement and COMMIT in one
trip through the database bridge, with the same meaning of "commit" and "publish after commit"
as above (and the same cancellation safety: cancelled before COMMIT, nothing is written).

Cancellation: cancelled before commit, nothing is written and nothing published; the
connection is discarded by ``Database``. Publishing and after-commit actions are synchronous
(``send_nowait``-style hooks) so they cannot be interrupted half-way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from server.commands import message_handlers, resource_handlers
from server.commands.models import (
    Command,
    CreateProject,
    CreateThread,
    DeleteMessage,
    DeleteProject,
    DeleteThread,
    EditMessage,
    SendMessage,
    UpdateProject,
    UpdateThread,
)
from server.commands.unit import CommandContext, CommandResult
from server.errors import NotFound, Unavailable
from server.events import ThreadEvent
from server.principal import Principal
from server.services import Services

log = structlog.get_logger(__name__)

Handler = Callable[[CommandContext, Any], Awaitable[CommandResult]]

HANDLERS: dict[type[Command], Handler] = {
    CreateProject: resource_handlers.create_project,
    UpdateProject: resource_handlers.update_project,
    DeleteProject: resource_handlers.delete_project,
    CreateThread: resource_handlers.create_thread,
    UpdateThread: resource_handlers.update_thread,
    DeleteThread: resource_handlers.delete_thread,
    SendMessage: message_handlers.send_message,
    EditMessage: message_handlers.edit_message,
    DeleteMessage: message_handlers.delete_message,
}

# Commands whose handler issues exactly one statement, which is its own transaction.
ONE_STATEMENT: frozenset[type[Command]] = frozenset({SendMessage, EditMessage, DeleteMessage})

# Two identical sends racing past the idempotency check: the loser's insert hits this UNIQUE
# constraint; running the command again finds the winner's message and returns it.
_IDEMPOTENCY_CONSTRAINT = "messages_thread_client_msg_id_key"
_MAX_ATTEMPTS = 3


async def execute(services: Services, principal: Principal, command: Command) -> CommandResult:
    """Run ``command`` for ``principal``; raise a ``ThreadlineError`` subclass on refusal."""
    handler = HANDLERS[type(command)]
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            return await _run_once(services, principal, command, handler)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _IDEMPOTENCY_CONSTRAINT or attempt == _MAX_ATTEMPTS:
                raise
            log.info("command.idempotency_race", command=type(command).__name__)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            # Rolled back whole (e.g. deleting a project while its reply is being saved): run
            # the command again; only a database that keeps refusing gets the client a 503.
            if attempt == _MAX_ATTEMPTS:
                raise Unavailable("The database was busy; try again.") from exc
            log.info("command.retried", command=type(command).__name__, error=type(exc).__name__)
        except asyncpg.QueryCanceledError as exc:
            # statement_timeout: a lock or the database stayed busy past the limit. The command
            # was rolled back whole; the client may retry (sends are idempotent).
            raise Unavailable("The database was busy; try again.") from exc
        except asyncpg.ForeignKeyViolationError as exc:
            # The parent (project/thread) was deleted by a concurrent command.
            if exc.constraint_name == "messages_created_event":
                raise
            raise NotFound("Not found.") from None
    raise AssertionError("unreachable")


async def _run_once(
    services: Services, principal: Principal, command: Command, handler: Handler
) -> CommandResult:
    if type(command) in ONE_STATEMENT:
        ctx = CommandContext(services=services, principal=principal, tx=services.db.atomic)
        result = await handler(ctx, command)
    else:
        async with services.db.transaction(actor_id=principal.user_id) as tx:
            ctx = CommandContext(services=services, principal=principal, tx=tx)
            result = await handler(ctx, command)
    # Committed: hand the events on, then the follow-up actions.
    for pending in ctx.events:
        event = ThreadEvent(
            thread_id=pending.thread_id, type=pending.type, seq=pending.seq, data=pending.data
        )
        try:
            services.publish(event)
        except Exception:  # committed already; the event log has it for replay
            log.exception("command.publish_failed", type=pending.type, seq=pending.seq)
    for action in ctx.after_commit:
        try:
            action()
        except Exception:  # the command itself succeeded and must say so
            log.exception("command.after_commit_failed", command=type(command).__name__)
    return result
