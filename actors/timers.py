"""One task for many deadlines: the process's heartbeats and token expiries.

A task per connection just to sleep (until the next ping, until its token expires) costs a
coroutine, a task and a cancel scope per connection, and a wake-up each. ``Timers`` keeps every
deadline in one heap and runs due callbacks from a single task (``run``, started in the
realtime plugin's nursery). Callbacks run in that task, must not block and should not raise (an
exception is logged and the timer dropped; the loop goes on).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger(__name__)


def _nothing() -> None:
    return None


class Timer:
    """A scheduled callback; ``cancel()`` it if it is no longer wanted (idempotent)."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        # The heap keeps this entry until its deadline comes up (a token expiry: hours away);
        # the callback must not keep what it closes over (a whole connection) alive that long.
        self.fn = _nothing


class Timers:
    """Deadlines (trio's clock) served by one task."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._changed = trio.Event()
        # Cancelled entries leave the heap only from its top; with connection churn (each
        # socket cancels a far-off expiry) the heap is compacted once it doubles, which keeps
        # it within 2x the live timers at an amortised O(1) per call.
        self._compact_at = 1024

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn()`` at ``when`` (``trio.current_time()`` scale). Never blocks."""
        timer = Timer(when, fn)
        if not self._heap or when < self._heap[0][0]:
            self._changed.set()  # the loop sleeps until a later deadline: wake it
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if len(self._heap) >= self._compact_at:
            self._compact()
        return timer

    def _compact(self) -> None:
        self._heap[:] = [entry for entry in self._heap if not entry[2].cancelled]
        heapq.heapify(self._heap)
        self._compact_at = max(1024, 2 * len(self._heap))

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn()`` ``delay`` seconds from now."""
        return self.call_at(trio.current_time() + delay, fn)

    async def run(self) -> None:
        """Serve the deadlines until cancelled."""
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, timer = heapq.heappop(heap)
                if timer.cancelled:
                    continue
                try:
                    timer.fn()
                except Exception as exc:  # one bad callback must not stop every heartbeat
                    log.exception("timers.callback_failed", error=type(exc).__name__)
            # Cancelled timers at the top would only cause early wake-ups: drop them now.
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            self._changed = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else math.inf):
                await self._changed.wait()
