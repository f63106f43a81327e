"""Wire shapes of the resources as pydantic models: the OpenAPI document is built from these.

``server.commands.serialize`` produces plain dicts (fast, no validation on the hot path); the
tests check those dicts against these models, and the schemathesis test checks real responses
against the OpenAPI document generated from them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Resource(BaseModel):
    """Base of the response models: unknown fields allowed so the API can grow."""

    model_config = ConfigDict(extra="allow")


class Project(Resource):
    """A project. ``monthly_budget_usd`` null = no limit."""

    id: str
    name: str
    monthly_budget_usd: float | None
    spend_this_month_usd: float = Field(
        description="USD this calendar month (UTC), in flight included"
    )
    created_at: datetime
    updated_at: datetime


class Thread(Resource):
    """A thread of messages."""

    id: str
    project_id: str
    title: str
    message_count: int = Field(description="messages not deleted")
    last_message_at: datetime | None
    last_seq: int = Field(description="seq of the thread's latest durable event")
    created_at: datetime
    updated_at: datetime


class Message(Resource):
    """A message. A deleted one is a tombstone: ``deleted`` true, ``content`` ""."""

    id: str
    thread_id: str
    seq: int
    role: Literal["user", "assistant", "system"]
    content: str
    status: Literal["streaming", "completed", "cancelled", "failed", "interrupted"]
    version: int
    created_at: datetime
    edited_at: datetime | None
    deleted: bool
    deleted_at: datetime | None
    client_msg_id: str | None
    reply_to: str | None
    model: str | None


class HistoryEntry(Resource):
    """One edit or delete of a message."""

    version: int = Field(description="the version this change produced")
    kind: Literal["edit", "delete"]
    editor_id: str | None = Field(description="user who made the change")
    created_at: datetime
    old_content: str
    new_content: str | None = Field(description="null for a delete")


class UsageFigures(Resource):
    """Tokens and cost."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class ModelUsage(UsageFigures):
    """Tokens and cost of one model."""

    model: str


class Usage(Resource):
    """Usage of a project: this month (UTC), in total, and in total per model."""

    month: UsageFigures
    total: UsageFigures
    by_model: list[ModelUsage]


class ProjectPage(Resource):
    items: list[Project]
    next_cursor: str | None


class ThreadPage(Resource):
    items: list[Thread]
    next_cursor: str | None


class MessagePage(Resource):
    items: list[Message]
    next_cursor: str | None


class HistoryPage(Resource):
    items: list[HistoryEntry]
    next_cursor: str | None


class User(Resource):
    """An account as its owner sees it."""

    id: str
    email: str


class UserEnvelope(Resource):
    """``{"user": ...}`` (register, me)."""

    user: User


class LoginResult(Resource):
    """A login: the user, the access token (also set as ``tl_session``) and the CSRF token."""

    user: User
    access_token: str
    csrf_token: str


class ErrorBody(Resource):
    """What went wrong: a stable snake_case ``code``, a message for a person, and details."""

    code: str
    message: str
    request_id: str | None
    details: dict[str, Any]


class ErrorEnvelope(Resource):
    """Every non-2xx body."""

    error: ErrorBody
