"""The command bus against the real database: one transaction per command, events after commit."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
import trio

from server.commands import (
    CreateProject,
    CreateThread,
    DeleteMessage,
    EditMessage,
    SendMessage,
    UpdateProject,
    UpdateThread,
    execute,
    parse_command,
)
from server.errors import (
    BudgetExceeded,
    IdempotencyConflict,
    NotFound,
    ValidationFailed,
    VersionConflict,
)
from server.events import ThreadEvent
from server.principal import Principal
from server.runtime import RunningServer
from server.services import ReplyRequest, Services


async def make_principal(services: Services) -> Principal:
    """A fresh user, inserted directly (the bus only needs the id)."""
    email = f"bus-{uuid.uuid4().hex[:10]}@example.test"
    user_id = await services.db.fetchval(
        "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id", email
    )
    return Principal(
        user_id=str(user_id), email=email, jti=uuid.uuid4().hex, expires_at=1e12, via="bearer"
    )


class RecordingAssistant:
    """Stands in for the LLM subsystem at the Assistant seam: records requests only."""

    def __init__(self) -> None:
        self.requests: list[ReplyRequest] = []

    def start_reply(self, request: ReplyRequest) -> None:
        self.requests.append(request)

    async def cancel(self, thread_id: str) -> bool:
        return False


@pytest.fixture
def services(server: RunningServer) -> Services:
    return server.services


async def _thread(services: Services, who: Principal, budget: str | None = None) -> str:
    project = await execute(
        services,
        who,
        CreateProject(name="p", monthly_budget_usd=Decimal(budget) if budget else None),
    )
    assert project.data is not None
    thread = await execute(services, who, CreateThread(project_id=project.data["id"], title="t"))
    assert thread.data is not None
    return str(thread.data["id"])


async def test_send_writes_message_and_event_then_publishes(services: Services) -> None:
    published: list[ThreadEvent] = []
    services.publish = published.append
    assistant = RecordingAssistant()
    services.assistant = assistant
    who = await make_principal(services)
    thread_id = await _thread(services, who)

    result = await execute(services, who, SendMessage(thread_id=thread_id, content="hello"))

    assert result.created and result.data is not None
    msg = result.data
    assert msg["seq"] == 1 and msg["role"] == "user" and msg["version"] == 1
    assert [(e.type, e.seq, e.data) for e in published] == [("message.created", 1, msg)]
    row = await services.db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = 1", thread_id
    )
    assert row is not None and row["type"] == "message.created" and row["payload"] == msg
    assert [r.user_message_id for r in assistant.requests] == [msg["id"]]


async def test_edit_and_delete_take_next_seqs_and_versions(services: Services) -> None:
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    sent = await execute(services, who, SendMessage(thread_id=thread_id, content="a", reply=False))
    assert sent.data is not None
    mid = sent.data["id"]
    edited = await execute(
        services, who, EditMessage(message_id=mid, content="b", expected_version=1)
    )
    assert edited.data is not None
    assert edited.data["version"] == 2 and edited.data["content"] == "b"
    assert edited.data["edited_at"] is not None
    with pytest.raises(VersionConflict) as stale:
        await execute(services, who, DeleteMessage(message_id=mid, expected_version=1))
    assert stale.value.details == {"current_version": 2}
    deleted = await execute(services, who, DeleteMessage(message_id=mid, expected_version=2))
    assert deleted.data is not None
    assert deleted.data["deleted"] is True and deleted.data["content"] == ""
    assert deleted.data["version"] == 3
    rows = await services.db.fetch(
        "SELECT seq, type FROM thread_events WHERE thread_id = $1 ORDER BY seq", thread_id
    )
    assert [(r["seq"], r["type"]) for r in rows] == [
        (1, "message.created"),
        (2, "message.updated"),
        (3, "message.deleted"),
    ]
    edits = await services.db.fetch(
        "SELECT kind, editor_id, old_content, new_content, version FROM message_edits"
        " WHERE message_id = $1 ORDER BY version",
        mid,
    )
    assert [
        (e["kind"], str(e["editor_id"]), e["old_content"], e["new_content"]) for e in edits
    ] == [
        ("edit", who.user_id, "a", "b"),
        ("delete", who.user_id, "b", None),
    ]


async def test_idempotent_send_and_conflict(services: Services) -> None:
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    cmd = SendMessage(thread_id=thread_id, content="once", client_msg_id="c-1", reply=False)
    first = await execute(services, who, cmd)
    again = await execute(services, who, cmd)
    assert first.created and not again.created and first.data == again.data
    with pytest.raises(IdempotencyConflict):
        await execute(
            services,
            who,
            SendMessage(thread_id=thread_id, content="other", client_msg_id="c-1", reply=False),
        )


async def test_concurrent_identical_sends_create_one_message(services: Services) -> None:
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    results = []

    async def send() -> None:
        cmd = SendMessage(thread_id=thread_id, content="x", client_msg_id="same", reply=False)
        results.append(await execute(services, who, cmd))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(send)
    assert sum(r.created for r in results) == 1
    assert len({r.data["id"] for r in results if r.data}) == 1
    count = await services.db.fetchval(
        "SELECT count(*) FROM messages WHERE thread_id = $1", thread_id
    )
    assert count == 1


async def test_budget_exceeded_creates_nothing(services: Services) -> None:
    assistant = RecordingAssistant()
    services.assistant = assistant
    who = await make_principal(services)
    thread_id = await _thread(services, who, budget="0")
    with pytest.raises(BudgetExceeded):
        await execute(services, who, SendMessage(thread_id=thread_id, content="hi"))
    assert await services.db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread_id) == 0
    assert assistant.requests == []
    # Without a reply no money is spent, so the message is accepted.
    ok = await execute(services, who, SendMessage(thread_id=thread_id, content="hi", reply=False))
    assert ok.created


async def test_other_users_resources_are_not_found(services: Services) -> None:
    owner = await make_principal(services)
    stranger = await make_principal(services)
    thread_id = await _thread(services, owner)
    project_id = await services.db.fetchval(
        "SELECT project_id FROM threads WHERE id = $1", thread_id
    )
    sent = await execute(
        services, owner, SendMessage(thread_id=thread_id, content="a", reply=False)
    )
    assert sent.data is not None
    # Each command names one of the owner's resources, which exist: only ownership differs.
    for cmd in (
        SendMessage(thread_id=thread_id, content="b", reply=False),
        EditMessage(message_id=sent.data["id"], content="c", expected_version=1),
        DeleteMessage(message_id=sent.data["id"], expected_version=1),
        UpdateProject(project_id=str(project_id), name="n"),
        UpdateThread(thread_id=thread_id, title="n"),
    ):
        with pytest.raises(NotFound):
            await execute(services, stranger, cmd)
    # ...and nothing of the owner's changed.
    message = await services.db.fetchrow(
        "SELECT content, version, deleted_at FROM messages WHERE id = $1", sent.data["id"]
    )
    assert message is not None
    assert (message["content"], message["version"], message["deleted_at"]) == ("a", 1, None)
    assert await services.db.fetchval("SELECT name FROM projects WHERE id = $1", project_id) == "p"
    assert await services.db.fetchval("SELECT title FROM threads WHERE id = $1", thread_id) == "t"
    assert (
        await services.db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread_id)
        == 1
    )
    # The same commands from the owner succeed (the control).
    assert (await execute(services, owner, UpdateThread(thread_id=thread_id, title="n"))).data


def test_parse_command_names_the_fields() -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_command(EditMessage, {"message_id": "m", "content": ""})
    fields = exc.value.details["fields"]
    assert set(fields) == {"content", "expected_version"}
    with pytest.raises(ValidationFailed) as role:
        parse_command(SendMessage, {"thread_id": "t", "content": "x", "role": "assistant"})
    assert set(role.value.details["fields"]) == {"role"}


async def test_cancelled_command_writes_and_publishes_nothing(services: Services) -> None:
    published: list[ThreadEvent] = []
    services.publish = published.append
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    lock_held = trio.Event()
    release = trio.Event()

    async def hold_thread_lock() -> None:
        async with services.db.transaction() as tx:
            await tx.execute("SELECT 1 FROM threads WHERE id = $1 FOR UPDATE", thread_id)
            lock_held.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_thread_lock)
        await lock_held.wait()
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_when_waiting_on_lock, services, scope, thread_id)
            await execute(services, who, SendMessage(thread_id=thread_id, content="x", reply=False))
        assert scope.cancelled_caught
        release.set()
    assert published == []
    assert (
        await services.db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1", thread_id)
        == 0
    )
    # The bus and the pool are fine afterwards: the next send takes seq 1.
    after = await execute(services, who, SendMessage(thread_id=thread_id, content="y", reply=False))
    assert after.data is not None and after.data["seq"] == 1
    assert [e.seq for e in published] == [1]


async def _cancel_when_waiting_on_lock(
    services: Services, scope: trio.CancelScope, thread_id: str
) -> None:
    """Cancel ``scope`` once some backend is blocked on a row lock (bounded polling).

    The send's lock is taken inside ``tl_send_message`` or ``tl_send_and_start`` (the backend's
    query is the function call); other commands take it with a ``FOR UPDATE`` of their own.
    """
    with trio.fail_after(10):
        while not await services.db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND (query LIKE '%FOR UPDATE%' OR query LIKE '%tl_send_message%'"
            " OR query LIKE '%tl_send_and_start%')"
            " AND query NOT LIKE '%pg_stat_activity%'"
        ):
            await trio.sleep(0.01)
    scope.cancel()
