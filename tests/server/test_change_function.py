"""``tl_change_message`` (migration 0012): an edit or a delete is one statement, one trip through
the database bridge, and holds its thread's row only inside it; every invariant and error answer
is the multi-statement path's."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from server.commands import DeleteMessage, EditMessage, SendMessage, execute
from server.commands.serialize import message_to_dict
from server.runtime import RunningServer
from server.services import Services
from server.storage import messages
from tests.lockprobe import trip_probe
from tests.server.test_commands import _thread, make_principal


@pytest.fixture
def services(server: RunningServer) -> Services:
    return server.services


async def test_an_edit_and_a_delete_take_one_trip_and_hold_the_thread_only_inside_it(
    services: Services, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the soak, edits waited on thread rows held by other edits idle between their
    statements (``lock_next_seq``, the update, the event: a trip each). Now: one trip, and
    after it the row is free; the thread row is never held while this event loop runs."""
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    sent = await execute(services, who, SendMessage(thread_id=thread_id, content="a", reply=False))
    assert sent.data is not None
    me = trio.lowlevel.current_task()
    with trip_probe(pg_dsn, monkeypatch, lambda: trio.lowlevel.current_task() is me) as probe:
        probe.reset(thread_id)
        edited = await execute(
            services, who, EditMessage(message_id=sent.data["id"], content="b", expected_version=1)
        )
        assert (probe.trips, probe.locked_after) == (1, [False])
        probe.reset(thread_id)
        deleted = await execute(
            services, who, DeleteMessage(message_id=sent.data["id"], expected_version=2)
        )
        assert (probe.trips, probe.locked_after) == (1, [False])
        probe.reset(thread_id)
        with pytest.raises(Exception, match="changed since"):
            await execute(
                services,
                who,
                EditMessage(message_id=sent.data["id"], content="c", expected_version=2),
            )
        assert (probe.trips, probe.locked_after) == (1, [False])
    assert edited.data is not None and deleted.data is not None
    assert (edited.data["version"], deleted.data["version"]) == (2, 3)


async def test_the_function_writes_what_the_statements_wrote(services: Services) -> None:
    """The answer and the event payload are ``message_to_dict`` of the stored row; the audit
    names the actor; refusals write nothing and say why."""
    db = services.db
    who = await make_principal(services)
    stranger = await make_principal(services)
    thread_id = await _thread(services, who)
    sent = await execute(services, who, SendMessage(thread_id=thread_id, content="a", reply=False))
    assert sent.data is not None
    mid = sent.data["id"]

    async def change(actor: str, version: int, content: str | None) -> dict[str, object]:
        row = await messages.change(
            db.atomic, actor_id=actor, message_id=mid, expected_version=version, content=content
        )
        return dict(row)

    assert (await change(stranger.user_id, 1, "x"))["outcome"] == "not_found"
    missing = await messages.change(
        db.atomic,
        actor_id=who.user_id,
        message_id=str(uuid.uuid4()),
        expected_version=1,
        content="x",
    )
    assert missing["outcome"] == "not_found"
    edited = await change(who.user_id, 1, "b")
    assert (edited["outcome"], edited["seq"], edited["current_version"]) == ("edited", 2, 2)
    stored = await db.fetchrow(f"SELECT {messages.COLUMNS} FROM messages m WHERE m.id = $1", mid)
    assert stored is not None
    answer = json.loads(str(edited["message"]))
    assert answer == message_to_dict(stored) and list(answer) == list(message_to_dict(stored))
    event = await db.fetchrow(
        "SELECT type, payload FROM thread_events WHERE thread_id = $1 AND seq = 2", thread_id
    )
    assert event is not None and (event["type"], event["payload"]) == ("message.updated", answer)
    stale = await change(who.user_id, 1, "c")
    assert (stale["outcome"], stale["current_version"], stale["seq"]) == (
        "version_conflict",
        2,
        None,
    )
    deleted = await change(who.user_id, 2, None)
    assert (deleted["outcome"], deleted["seq"]) == ("deleted", 3)
    tombstone = json.loads(str(deleted["message"]))
    assert tombstone["deleted"] is True and tombstone["content"] == ""
    again = await change(who.user_id, 3, "d")
    assert (again["outcome"], again["current_version"]) == ("is_deleted", 3)
    audit = await db.fetch(
        "SELECT kind, editor_id, old_content, new_content, version FROM message_edits"
        " WHERE message_id = $1 ORDER BY version",
        mid,
    )
    assert [(a["kind"], str(a["editor_id"]), a["old_content"], a["version"]) for a in audit] == [
        ("edit", who.user_id, "a", 2),
        ("delete", who.user_id, "b", 3),
    ]
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread_id) == 3
    # A reply still streaming is refused, as before.
    reply = await db.fetchval(
        "WITH m AS (INSERT INTO messages (thread_id, seq, role, content, status)"
        " VALUES ($1, 4, 'assistant', '', 'streaming') RETURNING *),"
        " e AS (INSERT INTO thread_events (thread_id, seq, type, payload)"
        " SELECT thread_id, seq, 'message.created', '{}'::jsonb FROM m)"
        " SELECT id::text FROM m",
        thread_id,
    )
    streaming = await messages.change(
        db.atomic, actor_id=who.user_id, message_id=reply, expected_version=1, content="x"
    )
    assert streaming["outcome"] == "streaming"
    assert await db.fetchval("SELECT last_seq FROM threads WHERE id = $1", thread_id) == 4


async def test_concurrent_edits_of_one_thread_take_gap_free_seqs(services: Services) -> None:
    """20 edits of 10 messages at once: each message's versions +1 in turn, the thread's event
    seqs 1..n with no gap, one audit row per change."""
    who = await make_principal(services)
    thread_id = await _thread(services, who)
    ids = []
    for n in range(10):
        sent = await execute(
            services, who, SendMessage(thread_id=thread_id, content=f"m{n}", reply=False)
        )
        assert sent.data is not None
        ids.append(sent.data["id"])

    async def edit_twice(mid: str) -> None:
        for version in (1, 2):
            await execute(
                services,
                who,
                EditMessage(message_id=mid, content=f"v{version}", expected_version=version),
            )

    async with trio.open_nursery() as nursery:
        for mid in ids:
            nursery.start_soon(edit_twice, mid)
    db = services.db
    seqs = [
        r["seq"]
        for r in await db.fetch(
            "SELECT seq FROM thread_events WHERE thread_id = $1 ORDER BY seq", thread_id
        )
    ]
    assert seqs == list(range(1, 31))
    assert (
        await db.fetchval("SELECT count(*) FROM message_edits WHERE thread_id = $1", thread_id)
        == 20
    )
    assert {
        r["version"]
        for r in await db.fetch("SELECT version FROM messages WHERE thread_id = $1", thread_id)
    } == {3}
