"""The commands: one pydantic model per user action, shared by REST and WebSocket.

Unknown fields are ignored (a WebSocket frame also carries ``op`` and ``ref``). Ids are plain
strings; an id that is not a well-formed UUID simply names nothing (404 ``not_found``).
``parse_command`` turns a pydantic ``ValidationError`` into ``ValidationFailed`` whose
``details.fields`` lists each offending field (dotted path) and ``details.errors`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from server.errors import ValidationFailed


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000; refuse it here rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


NoNul = AfterValidator(_no_nul)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NoNul]
Title = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500), NoNul]
Budget = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=4)]
Version = Annotated[int, Field(ge=1, le=2_147_483_647)]
# The hard upper bound; the configured ``max_message_chars`` (default 32,000) applies on top.
Content = Annotated[str, StringConstraints(min_length=1, max_length=1_000_000), NoNul]
ClientMsgId = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
Id = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class Command(BaseModel):
    """Base of every command: frozen, extra fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class CreateProject(Command):
    """``POST /api/v1/projects``."""

    name: Name
    monthly_budget_usd: Budget | None = None


class UpdateProject(Command):
    """``PATCH /api/v1/projects/{id}``: only the fields present change; null budget = no limit."""

    project_id: Id
    name: Name | None = None
    monthly_budget_usd: Budget | None = None


class DeleteProject(Command):
    """``DELETE /api/v1/projects/{id}``: the project, its threads and messages go."""

    project_id: Id


class CreateThread(Command):
    """``POST /api/v1/projects/{id}/threads``."""

    project_id: Id
    title: Title = ""


class UpdateThread(Command):
    """``PATCH /api/v1/threads/{id}``."""

    thread_id: Id
    title: Title


class DeleteThread(Command):
    """``DELETE /api/v1/threads/{id}``."""

    thread_id: Id


class SendMessage(Command):
    """``POST /api/v1/threads/{id}/messages`` and WebSocket ``send``.

    ``client_msg_id`` makes the send idempotent within the thread; ``reply`` asks the assistant
    to answer. Clients may only send ``role`` "user".
    """

    thread_id: Id
    content: Content
    client_msg_id: ClientMsgId | None = None
    reply: bool = True
    role: Literal["user"] = "user"


class EditMessage(Command):
    """``PATCH /api/v1/messages/{id}`` and WebSocket ``edit``."""

    message_id: Id
    content: Content
    expected_version: Version


class DeleteMessage(Command):
    """``DELETE /api/v1/messages/{id}`` and WebSocket ``delete``."""

    message_id: Id
    expected_version: Version


C = TypeVar("C", bound=Command)


def validation_details(exc: ValidationError) -> dict[str, Any]:
    """``{"fields": [names], "errors": [{"field", "message"}]}``; the input is never echoed.

    The same shape ``server.api.context.parse_body`` gives, so every validation error reads alike.
    """
    errors = [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_input=False, include_url=False, include_context=False)
    ]
    return {"fields": sorted({e["field"] for e in errors}), "errors": errors}


def parse_command(model: type[C], data: Mapping[str, Any]) -> C:
    """Validate ``data`` into ``model``; raise ``ValidationFailed`` naming the bad fields."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        details = validation_details(exc)
        raise ValidationFailed(
            f"Invalid value for: {', '.join(details['fields'])}.", details=details
        ) from None
