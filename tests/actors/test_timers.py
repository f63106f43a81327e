"""The process-wide timer heap does not keep cancelled timers (or what they reference) alive."""

from __future__ import annotations

import gc
import weakref

import trio

from actors.timers import Timers


class _Connection:
    """Stands for what a connection's expiry callback closes over."""

    def close(self) -> None:
        raise AssertionError("a cancelled timer ran")


async def test_cancelled_timers_release_their_callbacks_and_the_heap_stays_bounded() -> None:
    """Found by the soak: every churned WebSocket left its 24 h token-expiry timer in the heap,
    holding the whole connection (RSS +120 MB in 10 minutes of connection churn)."""
    timers = Timers()
    refs = []
    for _ in range(10_000):
        conn = _Connection()
        refs.append(weakref.ref(conn))
        timer = timers.call_later(86_400, conn.close)  # a token expiry, far away
        timer.cancel()  # the connection closed
        del conn
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0  # nothing kept alive
    assert len(timers) < 2048  # compacted: not one entry per connection ever opened


async def test_live_timers_survive_compaction_and_fire_in_order() -> None:
    timers = Timers()
    fired: list[int] = []
    for i in range(3_000):
        keep = i % 3 == 0
        timer = timers.call_later(0.001 * (i + 1), lambda i=i: fired.append(i))
        if not keep:
            timer.cancel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        with trio.fail_after(10):
            while len(fired) < 1_000:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert fired == [i for i in range(3_000) if i % 3 == 0]
