"""Coalescing of streamed text into ``assistant.delta`` frames at a bounded rate.

A provider may send a token every millisecond; subscribers do not need a frame for each. Text is
buffered and handed on when any of these holds:

* it is the first text of the reply (time to first delta gets no added latency);
* ``max_interval_s`` (50 ms) has passed since the last frame (at most ~20 timed frames/s);
* ``max_chars`` (64) or more characters are waiting;
* the stream has gone quiet for ``idle_s`` (10 ms): a slow stream's tokens go out as they come.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

MAX_INTERVAL_S = 0.05
MAX_CHARS = 64
IDLE_S = 0.01


class DeltaCoalescer:
    """Buffers text pushed by the stream and calls ``emit`` with coalesced pieces.

    ``run()`` must be running (in the reply's nursery) for the timed flushes; cancel it when the
    stream ends, then call ``flush()`` once more for whatever is left.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        max_interval_s: float = MAX_INTERVAL_S,
        max_chars: int = MAX_CHARS,
        idle_s: float = IDLE_S,
    ) -> None:
        self._emit = emit
        self.max_interval_s = max_interval_s
        self.max_chars = max_chars
        self.idle_s = idle_s
        self._buffer: list[str] = []
        self._chars = 0
        self._last_flush = -float("inf")
        self._last_push = 0.0
        self._wake = trio.Event()
        self.frames = 0

    def push(self, text: str) -> None:
        """Add streamed text; flushes at once when a rule above says so. Never blocks."""
        if not text:
            return
        now = trio.current_time()
        self._buffer.append(text)
        self._chars += len(text)
        self._last_push = now
        if self._chars >= self.max_chars or now - self._last_flush >= self.max_interval_s:
            self.flush()
        else:
            self._wake.set()

    def flush(self) -> None:
        """Emit whatever is buffered, as one piece."""
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._chars = 0
        self._last_flush = trio.current_time()
        self.frames += 1
        self._emit(text)

    async def run(self) -> None:
        """Flush buffered text when it has waited ``max_interval_s`` or the stream went idle."""
        while True:
            if not self._buffer:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            deadline = min(self._last_flush + self.max_interval_s, self._last_push + self.idle_s)
            if trio.current_time() >= deadline:
                self.flush()
                continue
            await trio.sleep_until(deadline)
