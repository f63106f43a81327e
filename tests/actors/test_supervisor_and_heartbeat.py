"""Supervisor restarts and escalation; the connection's heartbeat on a mock clock, no network."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from actors.connection import CLOSE_HEARTBEAT_TIMEOUT, Connection, Heartbeat
from actors.frames import Frame, text_frame
from actors.supervisor import Supervisor, SupervisorEscalation
from server import metrics


def _restarts(name: str) -> float:
    return metrics.ACTOR_RESTARTS.labels(actor=name)._value.get()


async def test_supervisor_restarts_with_backoff_then_escalates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        raise RuntimeError("crash")

    before = _restarts("flaky")
    supervisor: Supervisor | None = None
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, max_restarts=3, window_s=60, backoff_min_s=1)
            supervisor.supervise("flaky", flaky)
    assert caught.value.subgroup(SupervisorEscalation) is not None
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0]  # exponential back-off
    assert _restarts("flaky") - before == 3
    assert supervisor is not None
    health = supervisor.health()
    assert health["ok"] is False and health["escalated"] == "flaky"


async def test_supervisor_keeps_a_recovering_actor(autojump_clock: trio.testing.MockClock) -> None:
    runs = 0
    steady = trio.Event()

    async def recovers() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("transient")
        steady.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, max_restarts=5)
        supervisor.supervise("recovers", recovers)
        await steady.wait()
        health = supervisor.health()
        assert health["ok"] is True
        assert health["supervised"]["recovers"] == {"running": True, "restarts": 2}
        nursery.cancel_scope.cancel()


class FakeTransport:
    """A transport whose client never answers pings (or does, when ``pongs`` is set)."""

    def __init__(self, heartbeat: Heartbeat, answer_pings: bool) -> None:
        self.heartbeat = heartbeat
        self.answer_pings = answer_pings
        self.pings: list[float] = []
        self.closed_with: tuple[int, str] | None = None
        self.aborted = False
        self.batches: list[list[str]] = []
        self.gate = trio.Event()
        self.gate.set()
        self._never = trio.Event()

    async def receive(self) -> str | bytes:
        await self._never.wait()
        return ""

    direct = None

    async def send(self, frames: Sequence[Frame]) -> None:
        self.batches.append([frame.text() for frame in frames])
        await self.gate.wait()

    async def ping(self, payload: bytes) -> None:
        self.pings.append(trio.current_time())
        if self.answer_pings:
            await trio.sleep(0.5)  # round trip
            self.heartbeat.pong(payload)

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        self.aborted = True

    def server_close_code(self) -> int | None:
        return None


class NoOps:
    def admit(self, conn: Connection, raw: str | bytes) -> None:
        return None

    async def handle(self, conn: Connection, item: object) -> None:
        pass


async def test_heartbeat_timeout_closes_4003(autojump_clock: trio.testing.MockClock) -> None:
    heartbeat = Heartbeat(interval_s=20, timeout_s=10)
    transport = FakeTransport(heartbeat, answer_pings=False)
    conn = Connection(transport, NoOps(), heartbeat, outbound_size=4, inbound_size=4)
    start = trio.current_time()
    await conn.run()
    assert transport.closed_with == (CLOSE_HEARTBEAT_TIMEOUT, "heartbeat_timeout")
    assert trio.current_time() - start == pytest.approx(30)
    assert transport.pings == [pytest.approx(start + 20)]
    assert conn.close_reason == "heartbeat_timeout"


async def test_answered_heartbeats_keep_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heartbeat = Heartbeat(interval_s=20, timeout_s=10)
    transport = FakeTransport(heartbeat, answer_pings=True)
    conn = Connection(transport, NoOps(), heartbeat, outbound_size=4, inbound_size=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await trio.sleep(200)
        assert len(transport.pings) == 9 and heartbeat.pongs == 9
        assert transport.closed_with is None
        conn.close(1001, "shutdown")
    assert transport.closed_with == (1001, "shutdown")


async def test_a_close_that_cannot_be_sent_aborts_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heartbeat = Heartbeat(interval_s=1000, timeout_s=10)
    transport = FakeTransport(heartbeat, answer_pings=True)
    blocked = trio.Event()

    async def stuck_close(code: int, reason: str) -> None:
        await blocked.wait()  # the client stopped reading: the close frame cannot go out

    transport.close = stuck_close  # type: ignore[method-assign]

    async def unblock_on_abort() -> None:
        blocked.set()
        transport.aborted = True

    transport.abort = unblock_on_abort  # type: ignore[method-assign]
    conn = Connection(
        transport, NoOps(), heartbeat, outbound_size=2, inbound_size=2, close_timeout_s=2
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await trio.sleep(1)  # virtual time: every task is idle by now
        # Two frames fill the queue (the writer has not taken any yet), the next overflows.
        assert [conn.offer(text_frame(f"frame {i}")) for i in range(3)] == [True, True, False]
        start = trio.current_time()
        await conn.closed.wait()
    assert conn.close_code == 4002 and transport.aborted
    assert trio.current_time() - start == pytest.approx(2)


async def test_connection_closes_4001_when_its_token_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heartbeat = Heartbeat(interval_s=20, timeout_s=10)
    transport = FakeTransport(heartbeat, answer_pings=True)
    conn = Connection(
        transport, NoOps(), heartbeat, outbound_size=4, inbound_size=4, expires_in_s=3600
    )
    start = trio.current_time()
    await conn.run()
    assert transport.closed_with == (4001, "token_expired")
    assert trio.current_time() - start == pytest.approx(3600)


async def test_writer_sends_what_queued_up_in_one_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heartbeat = Heartbeat(interval_s=1000, timeout_s=10)
    transport = FakeTransport(heartbeat, answer_pings=True)
    transport.gate = trio.Event()  # the client is slow: the first write takes a while
    conn = Connection(transport, NoOps(), heartbeat, outbound_size=16, inbound_size=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await trio.sleep(1)
        assert conn.offer(text_frame("f0"))
        await trio.sleep(1)  # the writer is now stuck writing f0
        for i in range(1, 6):
            assert conn.offer(text_frame(f"f{i}"))
        await trio.sleep(1)
        transport.gate.set()
        await trio.sleep(1)
        conn.close(1001, "shutdown")
    assert transport.batches == [["f0"], ["f1", "f2", "f3", "f4", "f5"]]
