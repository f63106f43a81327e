"""The broker's payloads: what one node sends, another decodes to the same event (no database)."""

from __future__ import annotations

import trio

from server.broker import MAX_PAYLOAD_BYTES, PgBroker
from server.events import ThreadEvent

T = "00000000-0000-0000-0000-0000000000aa"


class Sink:
    def __init__(self, known: int | None = 0) -> None:
        self.known = known
        self.events: list[ThreadEvent] = []
        self.notices: list[tuple[str, int]] = []

    def known_seq(self, thread_id: str) -> int | None:
        return self.known

    def deliver(self, event: ThreadEvent) -> None:
        self.events.append(event)

    def notice(self, thread_id: str, seq: int) -> None:
        self.notices.append((thread_id, seq))

    def resync(self) -> None:
        raise AssertionError("not expected")


def _pair(known: int | None = 0) -> tuple[PgBroker, PgBroker, Sink]:
    sender = PgBroker(None, "aaaaaaaa-0000-0000-0000-000000000001")  # type: ignore[arg-type]
    receiver = PgBroker(None, "bbbbbbbb-0000-0000-0000-000000000002")  # type: ignore[arg-type]
    sink = Sink(known)
    receiver.attach(sink)
    return sender, receiver, sink


async def test_a_long_delta_is_split_under_the_limit_and_joined_again() -> None:
    sender, receiver, sink = _pair()
    text = "é☃" * 9000 + "end"  # multi-byte characters, far beyond one payload
    event = ThreadEvent(T, "assistant.delta", None, {"message_id": "m", "index": 4, "text": text})
    payloads = sender._ephemeral_payloads(event)
    assert len(payloads) > 3
    assert all(len(p.encode()) < MAX_PAYLOAD_BYTES for p in payloads)
    for payload in payloads:
        receiver._dispatch(payload)
    (got,) = sink.events
    assert got.data == {"message_id": "m", "index": 4, "text": text}
    assert got.origin == sender.incarnation and got.seq is None
    # The sender ignores its own ephemeral events when they come back.
    for payload in payloads:
        sender.attach(own := Sink())
        sender._dispatch(payload)
        assert own.events == []


async def test_durable_payloads_deliver_notice_or_skip() -> None:
    sender, receiver, sink = _pair(known=4)
    sender._peers_at_beat = True
    small = ThreadEvent(T, "message.created", 5, {"id": "x"}, trio.current_time() - 0.5)
    big = ThreadEvent(T, "message.created", 6, {"content": "y" * 9000})
    for event in (small, big):
        sender.publish(event)
    payloads = _drain(sender)
    assert all(len(p.encode()) < MAX_PAYLOAD_BYTES for p in payloads)
    for payload in payloads:
        receiver._dispatch(payload)
    old = ThreadEvent(T, "message.created", 3, {"id": "y"})  # delivered already here
    receiver._dispatch(sender._durable_payload(old))
    assert [(e.seq, e.data) for e in sink.events] == [(5, {"id": "x"})]
    assert sink.notices == [(T, 6)]  # too big to travel: read from the log
    assert sink.events[0].committed_at < trio.current_time() - 0.4  # placed in the past
    nobody = Sink(known=None)
    receiver.attach(nobody)
    receiver._dispatch(sender._durable_payload(ThreadEvent(T, "message.created", 7, {})))
    assert nobody.events == [] and nobody.notices == []
    own = Sink(known=0)
    sender.attach(own)
    sender._dispatch(payloads[0])  # its own comes back from PostgreSQL: ignored
    assert own.events == []


async def test_a_request_is_answered_by_the_node_it_names() -> None:
    asker, answerer, _ = _pair()
    seen: list[dict[str, object]] = []

    async def handler(body: dict[str, object]) -> dict[str, object]:
        seen.append(body)
        return {"text": "x" * 20000}  # an answer bigger than one payload

    answerer.handle("snapshot", handler)
    async with trio.open_nursery() as nursery:
        answerer._nursery = nursery
        result: list[object] = []

        async def ask() -> None:
            result.append(
                await asker.request(answerer.incarnation, "snapshot", {"m": 1}, timeout_s=5)
            )

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        (question,) = _drain(asker)
        answerer._dispatch(question)
        await trio.testing.wait_all_tasks_blocked()
        for payload in _drain(answerer):
            assert len(payload.encode()) < MAX_PAYLOAD_BYTES
            asker._dispatch(payload)
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [{"m": 1}] and result == [{"text": "x" * 20000}]


def _drain(broker: PgBroker) -> list[str]:
    out = []
    while True:
        try:
            out.append(broker._out_recv.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_ephemeral_events_stay_home_while_no_other_node_listens() -> None:
    node, other, _ = _pair()
    delta = ThreadEvent(T, "assistant.delta", None, {"message_id": "m", "index": 0, "text": "hi"})
    node.set_peers({node.incarnation})  # the heartbeat found this node alone
    node.publish(delta)
    assert _drain(node) == []
    # Another node's hello (sent when its listener connects) counts before its first heartbeat.
    node._dispatch(f"h:{other.incarnation}")
    node._dispatch(f"h:{node.incarnation}")  # its own hello, back from the channel
    node.publish(delta)
    assert len(_drain(node)) == 1
    # A heartbeat that lists another node keeps them flowing; alone again, they stop.
    fresh, _, _ = _pair()
    fresh.set_peers({fresh.incarnation, other.incarnation})
    fresh.publish(delta)
    assert len(_drain(fresh)) == 1
    fresh.set_peers({fresh.incarnation})
    fresh.publish(delta)
    assert _drain(fresh) == []
