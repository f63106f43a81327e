"""Hub and thread actors in isolation: an in-memory event log, trio's autojump clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from actors.frames import Frame
from actors.hub import Hub
from actors.thread import FAN_OUT_SLICE, DropReason, Inflight, Reply, Subscribe, ThreadStart
from server.errors import Unavailable
from server.events import ThreadEvent

T = "00000000-0000-0000-0000-000000000001"


class MemoryLog:
    """The durable log: events appended here are 'committed'; publishing is separate."""

    def __init__(self) -> None:
        self.events: dict[str, list[ThreadEvent]] = {}
        self.reads = 0
        self.inflight: dict[str, list[Inflight]] = {}  # what start() reports as streaming

    def append(self, thread_id: str, type_: str = "message.created") -> ThreadEvent:
        log = self.events.setdefault(thread_id, [])
        event = ThreadEvent(thread_id, type_, len(log) + 1, {"n": len(log) + 1})
        log.append(event)
        return event

    async def start(self, thread_id: str) -> ThreadStart:
        return ThreadStart(await self.last_seq(thread_id), self.inflight.get(thread_id, []))

    async def last_seq(self, thread_id: str) -> int:
        await trio.lowlevel.checkpoint()
        return len(self.events.get(thread_id, []))

    async def last_seqs(self, thread_ids: list[str]) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return {t: len(self.events.get(t, [])) for t in thread_ids}

    async def read(self, thread_id: str, after_seq: int, upto_seq: int) -> list[ThreadEvent]:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        return [e for e in self.events.get(thread_id, []) if after_seq < (e.seq or 0) <= upto_seq]


class Sub:
    """A subscriber with a queue of ``size`` frames."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.frames: list[dict[str, Any]] = []
        self.raw: list[Frame] = []
        self.drops: list[DropReason] = []

    def offer(self, frame: Frame) -> bool:
        if len(self.frames) >= self.size:
            return False
        self.raw.append(frame)
        self.frames.append(json.loads(frame.text()))
        return True

    async def put(self, frame: Frame) -> None:
        await trio.lowlevel.checkpoint()
        self.frames.append(json.loads(frame.text()))

    def dropped(self, thread_id: str, reason: DropReason) -> None:
        self.drops.append(reason)

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if f["seq"] is not None]


@pytest.fixture
def memlog() -> MemoryLog:
    return MemoryLog()


@pytest.fixture
async def hub(memlog: MemoryLog) -> AsyncIterator[Hub]:
    hub = Hub(memlog, mailbox_size=8, idle_timeout_s=60.0, backlog_limit=50)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await hub.wait_ready()
        yield hub
        nursery.cancel_scope.cancel()


async def subscribe(hub: Hub, sub: Sub, after_seq: int | None = 0) -> int:
    subscription = await hub.subscribe(T, sub, after_seq)
    assert await hub.finish_subscribe(subscription)
    return subscription.last_seq


async def test_replay_then_live_without_gap_or_duplicate(hub: Hub, memlog: MemoryLog) -> None:
    for _ in range(5):
        memlog.append(T)
    early = Sub()
    await subscribe(hub, early)
    subscription = await hub.subscribe(T, late := Sub(), 2)
    assert (subscription.last_seq, subscription.replayed) == (5, 3)
    # Committed and published while the late subscriber is between reply and replay.
    for _ in range(3):
        hub.publish(memlog.append(T))
    await trio.testing.wait_all_tasks_blocked()
    assert await hub.finish_subscribe(subscription)
    hub.publish(memlog.append(T))
    await trio.testing.wait_all_tasks_blocked()
    assert early.seqs() == list(range(1, 10))
    assert late.seqs() == list(range(3, 10))


async def test_gap_and_mailbox_overflow_are_filled_from_the_log(
    hub: Hub, memlog: MemoryLog
) -> None:
    sub = Sub()
    await subscribe(hub, sub)
    # seq 1 is committed but its publish is lost; seq 2 arrives: the actor reads 1 from the log.
    memlog.append(T)
    hub.publish(memlog.append(T))
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == [1, 2]
    # A burst larger than the mailbox (8): the overflow is dropped and re-read.
    for _ in range(40):
        hub.publish(memlog.append(T))
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == list(range(1, 43))
    # Duplicates (a re-publish) are ignored.
    hub.publish(memlog.events[T][5])
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == list(range(1, 43))


async def test_each_event_is_encoded_once_for_every_subscriber(hub: Hub, memlog: MemoryLog) -> None:
    subs = [Sub() for _ in range(3)]
    for sub in subs:
        await subscribe(hub, sub)
    hub.publish(memlog.append(T))
    hub.publish(ThreadEvent(T, "assistant.delta", None, {"message_id": "m", "text": "é"}))
    await trio.testing.wait_all_tasks_blocked()
    for i in range(2):
        # The very same bytes object: one JSON serialisation, one frame header, per event.
        assert len({id(sub.raw[i].data) for sub in subs}) == 1
        assert isinstance(subs[0].raw[i].data, bytes)
    assert subs[0].raw[1].data[0] == 0x81  # FIN + text: a complete WebSocket frame
    assert json.loads(subs[0].raw[1].text())["data"]["text"] == "é"


async def test_slow_subscriber_is_dropped_and_others_go_on(hub: Hub, memlog: MemoryLog) -> None:
    slow, fast = Sub(size=3), Sub()
    await subscribe(hub, slow)
    await subscribe(hub, fast)
    for _ in range(5):
        hub.publish(memlog.append(T))
        await trio.testing.wait_all_tasks_blocked()
    assert slow.drops == ["slow_consumer"]
    assert fast.seqs() == [1, 2, 3, 4, 5] and fast.drops == []
    assert len(hub.actors[T].subscribers) == 1


async def test_late_subscriber_gets_the_reply_so_far(hub: Hub, memlog: MemoryLog) -> None:
    first = Sub()
    await subscribe(hub, first)
    hub.publish(ThreadEvent(T, "assistant.started", None, {"message_id": "m1"}))
    for i, text in enumerate(["Hel", "lo"]):
        hub.publish(
            ThreadEvent(T, "assistant.delta", None, {"message_id": "m1", "index": i, "text": text})
        )
    await trio.testing.wait_all_tasks_blocked()
    late = Sub()
    await subscribe(hub, late)
    assert late.frames == [
        {
            "op": "event",
            "thread_id": T,
            "type": "assistant.started",
            "seq": None,
            "data": {"message_id": "m1", "text": "Hello"},
        }
    ]
    event = memlog.append(T, "assistant.completed")
    hub.publish(ThreadEvent(T, event.type, event.seq, {"message_id": "m1"}))
    await trio.testing.wait_all_tasks_blocked()
    after = Sub()
    await subscribe(hub, after, after_seq=None)
    assert after.frames == []
    assert [f["type"] for f in first.frames] == [
        "assistant.started",
        "assistant.delta",
        "assistant.delta",
        "assistant.completed",
    ]


async def test_concurrent_subscribes_make_one_actor_and_idle_stop(
    memlog: MemoryLog, autojump_clock: trio.testing.MockClock
) -> None:
    hub = Hub(memlog, mailbox_size=8, idle_timeout_s=5.0, backlog_limit=50)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await hub.wait_ready()
        subs = [Sub() for _ in range(20)]
        async with trio.open_nursery() as inner:
            for sub in subs:
                inner.start_soon(subscribe, hub, sub)
        assert hub.spawned == 1 and len(hub.actors[T].subscribers) == 20
        for sub in subs:
            await hub.unsubscribe(T, sub)
        await trio.sleep(4.0)
        assert T in hub.actors  # not idle for long enough yet
        await trio.sleep(2.0)
        assert hub.actors == {}
        # The next use starts a fresh actor.
        await subscribe(hub, Sub())
        assert hub.spawned == 2
        nursery.cancel_scope.cancel()


async def test_run_in_thread_keeps_the_actor_and_cancel_stops_the_child(
    memlog: MemoryLog, autojump_clock: trio.testing.MockClock
) -> None:
    hub = Hub(memlog, mailbox_size=8, idle_timeout_s=1.0, backlog_limit=50)
    started, finished = trio.Event(), trio.Event()
    outcome: list[str] = []

    async def reply() -> None:
        started.set()
        try:
            await trio.sleep(3600)
        except trio.Cancelled:
            outcome.append("cancelled")
            raise
        finally:
            finished.set()

    async def broken() -> None:
        raise RuntimeError("boom")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await hub.wait_ready()
        hub.run_in_thread(T, "broken", broken)  # a failing child never takes the thread down
        hub.run_in_thread(T, "reply", reply)
        await started.wait()
        await trio.sleep(30)  # far beyond the idle timeout: a child keeps the actor alive
        assert T in hub.actors and hub.spawned == 1
        assert await hub.cancel_in_thread(T, "reply") is True
        await finished.wait()
        assert outcome == ["cancelled"]
        assert await hub.cancel_in_thread(T, "reply") is False
        await trio.sleep(2)
        assert hub.actors == {}
        assert await hub.cancel_in_thread(T, "reply") is False
        nursery.cancel_scope.cancel()


async def test_a_failing_actor_drops_its_subscribers(hub: Hub, memlog: MemoryLog) -> None:
    sub = Sub()
    await subscribe(hub, sub)

    async def fail(*args: Any) -> list[ThreadEvent]:
        raise OSError("database gone")

    memlog.read = fail  # type: ignore[method-assign]
    memlog.append(T)
    hub.publish(memlog.append(T))  # a gap: the re-read fails
    await trio.testing.wait_all_tasks_blocked()
    assert sub.drops == ["error"]
    assert hub.actors == {}


async def test_a_failed_actor_answers_waiters_and_hands_on_unstarted_children(
    hub: Hub, memlog: MemoryLog
) -> None:
    sub = Sub()
    await subscribe(hub, sub)
    ran = trio.Event()

    async def reply() -> None:
        ran.set()

    real_read = memlog.read
    calls = 0

    async def fail_once(*args: Any) -> list[ThreadEvent]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database gone")
        return await real_read(*args)

    memlog.read = fail_once  # type: ignore[method-assign]
    memlog.append(T)
    actor = hub.actors[T]
    # Queued behind the publish whose gap re-read fails: a child and a late subscriber.
    hub.publish(memlog.append(T))
    hub.run_in_thread(T, "reply", reply)
    waiting: Reply[int] = Reply()
    actor.mailbox.send_nowait(Subscribe(Sub(), waiting))
    with trio.fail_after(5):
        with pytest.raises(Unavailable):
            await waiting.wait()  # answered at once, not after a timeout
        await ran.wait()  # run by a fresh actor
    assert sub.drops == ["error"]
    assert hub.actors.get(T) is not actor and hub.spawned == 2


# -- intake from the broker (other nodes) -----------------------------------------------------


class FakeBroker:
    """Records what the hub hands to the other nodes."""

    def __init__(self) -> None:
        self.published: list[ThreadEvent] = []

    def publish(self, event: ThreadEvent) -> None:
        self.published.append(event)


async def test_events_of_other_nodes_arrive_once_in_order(hub: Hub, memlog: MemoryLog) -> None:
    sub = Sub()
    await subscribe(hub, sub)
    assert hub.known_seq(T) == 0 and hub.known_seq("no-such-thread") is None
    one, two, three = memlog.append(T), memlog.append(T), memlog.append(T)
    hub.deliver(one)  # from the broker
    hub.publish(one)  # and the in-process publish of the same commit
    hub.notice(T, 3)  # seq 3 did not fit the broker: read 2 and 3 from the log
    hub.deliver(two)  # late duplicates are ignored
    hub.deliver(three)
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == [1, 2, 3]
    assert hub.known_seq(T) == 3


async def test_resync_rereads_what_the_broker_missed(hub: Hub, memlog: MemoryLog) -> None:
    sub = Sub()
    await subscribe(hub, sub)
    for _ in range(4):
        memlog.append(T)  # committed while the broker was down: never published
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == []
    hub.resync()
    await trio.testing.wait_all_tasks_blocked()
    assert sub.seqs() == [1, 2, 3, 4]


async def test_events_go_to_the_broker_and_remote_replies_outlive_local_children(
    memlog: MemoryLog,
) -> None:
    broker = FakeBroker()
    hub = Hub(memlog, mailbox_size=8, idle_timeout_s=60.0, backlog_limit=50, broker=broker)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await hub.wait_ready()
        sub = Sub()
        await subscribe(hub, sub)
        durable = memlog.append(T)
        hub.publish(durable)
        hub.publish(ThreadEvent(T, "assistant.started", None, {"message_id": "local"}))
        # Both go to the other nodes (a durable one after its commit, as the bus publishes it).
        assert [e.type for e in broker.published] == ["message.created", "assistant.started"]
        # A reply generated on another node: its events come from the broker, tagged.
        remote = {"message_id": "remote"}
        hub.deliver(ThreadEvent(T, "assistant.started", None, remote, origin="node-b"))
        delta = {**remote, "index": 0, "text": "Hi"}
        hub.deliver(ThreadEvent(T, "assistant.delta", None, delta, origin="node-b"))
        done = trio.Event()

        async def child() -> None:
            done.set()

        hub.run_in_thread(T, "other", child)  # a local child ends: local replies are over
        await done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert hub.actors[T].inflight == {"remote": ["Hi"]}
        late = Sub()
        await subscribe(hub, late, after_seq=None)
        assert late.frames[-1]["data"] == {"message_id": "remote", "text": "Hi"}
        nursery.cancel_scope.cancel()


async def test_an_actor_started_mid_reply_begins_from_the_snapshot(
    hub: Hub, memlog: MemoryLog
) -> None:
    """A reply generated elsewhere: its text so far comes with the actor's start, and the deltas
    it already holds are not sent again."""
    memlog.inflight[T] = [Inflight("m9", "Hello wor", next_index=3)]
    sub = Sub()
    await subscribe(hub, sub, after_seq=None)
    assert sub.frames[0]["data"] == {"message_id": "m9", "text": "Hello wor"}
    remote = {"message_id": "m9"}
    hub.deliver(ThreadEvent(T, "assistant.started", None, remote, origin="b"))  # late: ignored
    for index, text in ((1, "lo"), (2, " wor"), (3, "ld"), (4, "!")):
        delta = {**remote, "index": index, "text": text}
        hub.deliver(ThreadEvent(T, "assistant.delta", None, delta, origin="b"))
    await trio.testing.wait_all_tasks_blocked()
    assert [(f["type"], f["data"].get("text")) for f in sub.frames[1:]] == [
        ("assistant.delta", "ld"),
        ("assistant.delta", "!"),
    ]
    assert hub.actors[T].inflight["m9"] == ["Hello wor", "ld", "!"]


async def test_events_committed_but_never_published_are_delivered_by_reconciliation(
    memlog: MemoryLog, autojump_clock: trio.testing.MockClock
) -> None:
    """The writer was cancelled (or died) between its commit and its publish: nobody told the
    actor, and nothing else will be committed in the thread. Reconciliation finds it."""
    hub = Hub(memlog, mailbox_size=8, idle_timeout_s=60.0, backlog_limit=50, reconcile_s=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        await hub.wait_ready()
        sub = Sub()
        await subscribe(hub, sub)
        memlog.append(T)
        memlog.append(T)  # committed, never published
        await trio.sleep(0.5)
        assert sub.seqs() == []
        await trio.sleep(1.0)  # one reconciliation later
        assert sub.seqs() == [1, 2]
        nursery.cancel_scope.cancel()


class FirstSub(Sub):
    """Sets ``reached`` when the first frame is offered to it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = trio.Event()

    def offer(self, frame: Frame) -> bool:
        self.reached.set()
        return super().offer(frame)


async def test_a_large_fan_out_lets_others_run_between_slices(hub: Hub, memlog: MemoryLog) -> None:
    """More than FAN_OUT_SLICE subscribers: the actor yields between slices (other tasks run
    while an event goes out), every subscriber still gets each event once and in order, and
    one that leaves between two slices gets nothing more."""
    first = FirstSub()
    subs = [first, *(Sub() for _ in range(2 * FAN_OUT_SLICE + 500))]
    for sub in subs:
        await subscribe(hub, sub)
    leaver = subs[-1]
    seen_mid_fan_out: list[int] = []

    async def meanwhile() -> None:
        await first.reached.wait()  # woken by the first offer of the first event
        seen_mid_fan_out.append(sum(1 for sub in subs if sub.frames))
        # A closing connection leaves mid-event, the way Hub.forget does when the actor's
        # mailbox is full: straight out of the actor's subscribers.
        hub.actors[T].subscribers.pop(leaver)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meanwhile)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            hub.publish(memlog.append(T))
    await trio.testing.wait_all_tasks_blocked()
    assert 0 < seen_mid_fan_out[0] < len(subs), seen_mid_fan_out  # ran in the middle
    assert leaver.frames == []
    assert all(sub.seqs() == [1, 2, 3] for sub in subs[:-1])
