"""Contract section 6: a subscriber on any node gets every durable event of its threads, whichever
node committed it, in seq order with no gap and no repeat; a broker outage delays, never loses."""

from __future__ import annotations

import uuid

import psycopg
import trio

from tests.cluster.conftest import (
    Cluster,
    durable,
    new_thread,
    new_user,
    rest_send,
    subscribe,
    ws_client,
    ws_send,
)
from tests.cluster.nodes import pg_dsn


async def test_a_subscriber_gets_what_two_other_nodes_commit_in_order_across_a_reconnect(
    cluster: Cluster,
) -> None:
    one, two, three = cluster.nodes[:3]
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    sent: list[str] = []

    async def commit_from_both(round_: str, count: int) -> None:
        """REST sends on node 1 and WebSocket sends on node 2, at the same time."""
        async with ws_client(two, user) as writer:

            async def over_rest() -> None:
                for i in range(count):
                    text = f"{round_}-rest-{i}"
                    await rest_send(one, user, thread_id, text)
                    sent.append(text)

            async def over_ws() -> None:
                for i in range(count):
                    text = f"{round_}-ws-{i}"
                    await ws_send(writer, thread_id, text)
                    sent.append(text)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(over_rest)
                nursery.start_soon(over_ws)

    async with ws_client(three, user) as watcher:
        await subscribe(watcher, thread_id, after_seq=0)
        await commit_from_both("live", 8)
        await watcher.wait_for(lambda: len(durable(watcher, thread_id)) >= 16, timeout=20)
        seen = durable(watcher, thread_id)
    assert [e["seq"] for e in seen] == list(range(1, 17))
    assert sorted(e["data"]["content"] for e in seen) == sorted(sent)
    last = seen[-1]["seq"]

    # Offline for a while: the others keep committing. Back on the third node with after_seq.
    await commit_from_both("offline", 4)
    async with ws_client(one, user) as watcher:
        answer = await subscribe(watcher, thread_id, after_seq=last)
        assert answer["replayed"] == 8
        await commit_from_both("back", 3)
        await watcher.wait_for(lambda: len(durable(watcher, thread_id)) >= 14, timeout=20)
        resumed = durable(watcher, thread_id)
    assert [e["seq"] for e in resumed] == list(range(last + 1, last + 15))
    contents = [e["data"]["content"] for e in seen + resumed]
    assert sorted(contents) == sorted(sent) and len(set(contents)) == len(contents)


def _commit_while_the_listener_is_down(dsn: str, node_id: str, thread_id: str, n: int) -> int:
    """In ONE transaction: end the node's listening backend (waiting until it has exited), then
    commit ``n`` events straight in SQL: no node publishes them, and that node is not even
    listening, so only its re-read of the log (on reconnect, or reconciliation) delivers them."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        ended = conn.execute(
            """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
                 FROM pg_stat_activity WHERE application_name = %s""",
            (f"threadline-broker:{node_id}",),
        ).fetchone()
        assert ended is not None and ended[0] == 1, ended
        for i in range(n):
            seq = conn.execute(
                "SELECT last_seq + 1 FROM threads WHERE id = %s FOR UPDATE", (thread_id,)
            ).fetchone()
            assert seq is not None
            message_id = str(uuid.uuid4())
            payload = (
                f'{{"id": "{message_id}", "seq": {seq[0]}, "role": "user",'
                f' "content": "while-down-{i}"}}'
            )
            conn.execute(
                """INSERT INTO messages (id, thread_id, seq, role, content)
                   VALUES (%s, %s, %s, 'user', %s)""",
                (message_id, thread_id, seq[0], f"while-down-{i}"),
            )
            conn.execute(
                """INSERT INTO thread_events (thread_id, seq, type, payload)
                   VALUES (%s, %s, 'message.created', %s::jsonb)""",
                (thread_id, seq[0], payload),
            )
        return int(seq[0])


async def test_a_lost_broker_connection_delays_delivery_but_loses_nothing(
    cluster: Cluster,
) -> None:
    one, _, three = cluster.nodes[:3]
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    async with ws_client(three, user) as watcher:
        await subscribe(watcher, thread_id, after_seq=0)
        await rest_send(one, user, thread_id, "before")
        await watcher.wait_for(lambda: len(durable(watcher, thread_id)) >= 1)
        log_before = three.log_size()
        last = await trio.to_thread.run_sync(
            _commit_while_the_listener_is_down,
            pg_dsn(cluster.data_dir),
            three.name,
            thread_id,
            5,
        )
        # Nothing is committed after these: no later notification can reveal the gap.
        await watcher.wait_for(lambda: len(durable(watcher, thread_id)) >= last, timeout=20)
        seen = durable(watcher, thread_id)
    assert [e["seq"] for e in seen] == list(range(1, last + 1))
    assert [e["data"]["content"] for e in seen[1:]] == [f"while-down-{i}" for i in range(5)]
    # The node logged this loss and reconnection (written as they happen, possibly after the
    # events arrived: waited for, bounded; a missing line fails here).
    await three.wait_for_logs("broker.connection_lost", "broker.reconnected", after=log_before)
