"""Fixtures for the assistant tests: the fake provider over real HTTP, seeded threads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from server.commands.serialize import message_to_dict
from server.config import Settings
from server.db import Database
from server.events import ThreadEvent
from server.llm.fake_server import FakeLLM, open_fake_llm
from server.runtime import RunningServer, open_server
from server.services import ReplyRequest
from server.storage import messages, threads
from tests.conftest import make_settings

PRICES = {"fake-gpt": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}}


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    async with open_fake_llm() as fake:
        yield fake


def llm_settings(tmp_path: Path, fake: FakeLLM, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "llm_base_url": fake.url,
        "llm_api_key": "sk-test-secret-do-not-log",
        "llm_model": "fake-gpt",
        "llm_prices": PRICES,
        "llm_max_retries": 2,
        "llm_read_timeout_s": 5.0,
        "llm_total_timeout_s": 20.0,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@dataclass
class Seeded:
    user_id: str
    project_id: str
    thread_id: str
    message_ids: list[str] = field(default_factory=list)


async def seed_thread(
    db: Database, texts: list[str], *, budget: Decimal | None = None, roles: list[str] | None = None
) -> Seeded:
    """A user, a project (with ``budget``), a thread and its messages, written as the bus would."""
    async with db.transaction() as tx:
        user_id = str(
            await tx.fetchval(
                "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id",
                f"u{uuid.uuid4().hex[:10]}@example.com",
            )
        )
        project_id = str(
            await tx.fetchval(
                "INSERT INTO projects (owner_id, name, monthly_budget_usd) VALUES ($1, 'p', $2)"
                " RETURNING id",
                user_id,
                budget,
            )
        )
        thread_id = str(
            await tx.fetchval(
                "INSERT INTO threads (project_id, title) VALUES ($1, 't') RETURNING id", project_id
            )
        )
    seeded = Seeded(user_id, project_id, thread_id)
    for i, text in enumerate(texts):
        role = roles[i] if roles else "user"
        seeded.message_ids.append(await add_message(db, seeded, text, role=role))
    return seeded


async def add_message(db: Database, seeded: Seeded, text: str, *, role: str = "user") -> str:
    async with db.transaction() as tx:
        seq = await threads.lock_next_seq(tx, seeded.thread_id)
        row = await messages.insert_message(
            tx,
            thread_id=seeded.thread_id,
            seq=seq,
            role=role,
            author_id=seeded.user_id if role == "user" else None,
            content=text,
        )
        await threads.append_event(
            tx, seeded.thread_id, seq, "message.created", message_to_dict(row)
        )
    return str(row["id"])


def request_for(seeded: Seeded) -> ReplyRequest:
    return ReplyRequest(
        thread_id=seeded.thread_id,
        project_id=seeded.project_id,
        user_message_id=seeded.message_ids[-1],
        requested_by=seeded.user_id,
    )


class EventTap:
    """Records what the assistant publishes (wrapping the real publish hook, which still runs)."""

    def __init__(self, running: RunningServer) -> None:
        self.events: list[ThreadEvent] = []
        self._changed = trio.Event()
        inner = running.services.publish

        def tap(event: ThreadEvent) -> None:
            self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()
            inner(event)

        running.services.publish = tap

    def of(self, thread_id: str, type_: str | None = None) -> list[ThreadEvent]:
        return [
            e
            for e in self.events
            if e.thread_id == thread_id and (type_ is None or e.type == type_)
        ]

    async def wait_for(self, predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()


@pytest.fixture
async def llm_server(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> AsyncIterator[RunningServer]:
    async with open_server(llm_settings(tmp_path, fake_llm), pg_dsn, bind="127.0.0.1:0") as s:
        yield s
