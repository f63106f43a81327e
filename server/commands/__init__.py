"""Commands (writes) and queries (reads) of the REST resources, shared with the WebSocket.

How a transport uses it::

    from server.commands import SendMessage, execute, parse_command

    command = parse_command(SendMessage, frame)       # ValidationFailed names the bad fields
    result = await execute(services, principal, command)
    reply_data = result.data                          # the message dict, exactly as over REST
    status = 201 if result.created else 200

Commands: ``CreateProject``, ``UpdateProject``, ``DeleteProject``, ``CreateThread``,
``UpdateThread``, ``DeleteThread``, ``SendMessage`` (``thread_id``, ``content``,
``client_msg_id``, ``reply``), ``EditMessage`` (``message_id``, ``content``,
``expected_version``), ``DeleteMessage`` (``message_id``, ``expected_version``).
Each runs in one transaction; its durable events are in ``thread_events`` at commit and are
passed to ``services.publish`` after it. Refusals are ``ThreadlineError`` subclasses
(``NotFound``, ``VersionConflict`` with ``details.current_version``, ``IdempotencyConflict``,
``BudgetExceeded``, ``ValidationFailed``, ``Conflict`` for a deleted or still-streaming message).

Serialisation (``message_to_dict`` etc. in ``server.commands.serialize``) is the only way rows
become JSON; event payloads of ``message.*`` are the message dict.
"""

from server.commands.bus import execute
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
    parse_command,
)
from server.commands.serialize import message_to_dict
from server.commands.unit import CommandResult

__all__ = [
    "Command",
    "CommandResult",
    "CreateProject",
    "CreateThread",
    "DeleteMessage",
    "DeleteProject",
    "DeleteThread",
    "EditMessage",
    "SendMessage",
    "UpdateProject",
    "UpdateThread",
    "execute",
    "message_to_dict",
    "parse_command",
]
