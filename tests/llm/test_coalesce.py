"""Delta coalescing: bounded frame rate for fast streams, no added latency for slow ones."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from server.llm.coalesce import DeltaCoalescer


async def _feed(pieces: int, gap_s: float, size: int = 1) -> tuple[list[tuple[float, str]], float]:
    frames: list[tuple[float, str]] = []
    coalescer = DeltaCoalescer(lambda text: frames.append((trio.current_time(), text)))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        for i in range(pieces):
            if i:
                await trio.sleep(gap_s)
            coalescer.push("x" * size)
        await trio.sleep(1)  # let the timer flush the tail (virtual time)
        nursery.cancel_scope.cancel()
    coalescer.flush()
    return frames, start


async def test_fast_stream_is_coalesced_to_a_bounded_frame_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 1000 one-char pieces, one per millisecond: one second of stream.
    frames, start = await _feed(1000, 0.001)
    assert "".join(text for _, text in frames) == "x" * 1000
    assert frames[0][0] == start and frames[0][1] == "x"  # the first piece goes out at once
    # Size-bounded: never more than 64 chars waiting; time-bounded: 50 ms.
    assert all(len(text) <= 64 for _, text in frames)
    assert len(frames) <= 1000 / 50 + 2
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    assert max(gaps) <= 0.0505


async def test_big_pieces_flush_at_once(autojump_clock: trio.testing.MockClock) -> None:
    frames, _ = await _feed(10, 0.001, size=80)
    assert [len(text) for _, text in frames] == [80] * 10


async def test_slow_stream_gets_every_piece_without_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    frames, start = await _feed(5, 0.2)
    assert [round(t - start, 6) for t, _ in frames] == [0.0, 0.2, 0.4, 0.6, 0.8]


async def test_a_pause_flushes_after_the_idle_gap(autojump_clock: trio.testing.MockClock) -> None:
    frames: list[tuple[float, str]] = []
    coalescer = DeltaCoalescer(lambda text: frames.append((trio.current_time(), text)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        coalescer.push("a")  # first: immediate
        await trio.sleep(0.001)
        coalescer.push("b")  # buffered: within 50 ms of the last frame
        await trio.sleep(0.5)  # the stream goes quiet
        nursery.cancel_scope.cancel()
    assert [text for _, text in frames] == ["a", "b"]
    assert abs((frames[1][0] - frames[0][0]) - 0.011) < 1e-6  # 1 ms + the 10 ms idle gap
