"""The benchmark harness and the lean WebSocket client: a small real run against the naive
broadcast baseline (its own process), so ``make bench`` cannot rot unnoticed."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtests import harness
from loadtests.bench_fanout import Target, fanout, idle_memory
from loadtests.ws_clients import frames, masked

NAIVE = Path(__file__).resolve().parents[2] / "loadtests" / "naive_broadcast.py"


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert harness.percentiles(values) == {"p50": 51.0, "p99": 99.0}
    assert harness.percentile([], 50) != harness.percentile([], 50)  # NaN


def test_client_frames_round_trip() -> None:
    payload = b"x" * 300
    frame = masked(0x1, payload)
    # Unmask as a server would, then parse as a server frame (no mask bit).
    mask, body = frame[4:8], frame[8:]
    unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
    buf = bytearray(bytes([0x81, 126]) + len(unmasked).to_bytes(2, "big") + unmasked + b"\x81")
    assert frames(buf) == [(0x1, payload)]
    assert buf == bytearray(b"\x81")  # an incomplete frame stays for the next read


def test_fanout_against_the_naive_baseline() -> None:
    args = argparse.Namespace(deliveries_per_s=400.0, seconds=0.5, procs=2, pad=0, profile=None)
    argv = [str(NAIVE), "--port", str(harness.free_port())]
    with harness.server_process(argv, harness.bench_env(), "naive-broadcast:") as (pid, base):
        assert base.startswith("http://127.0.0.1:")
        row = fanout(Target("naive", pid, base, "t", "thread"), 20, args, per_publish_s=0.0)
    assert row["delivered"] == row["expected"] == 20 * row["events"]
    assert row["gaps"] == 0 and row["closes"] == {}
    assert row["p99_ms"] >= row["p50_ms"] > 0
    assert row["cpu_us_per_delivery"] > 0
    # Each frame's latency split: its event's earliest delivery, and the rest after it.
    assert 0 < row["event_first_p99_ms"] <= row["p99_ms"]
    assert 0 <= row["after_first_p99_ms"] <= row["p99_ms"]
    assert row["cpu_share_clients"] >= 0 and row["cpu_share_publisher"] >= 0


def test_idle_memory_opens_cumulative_steps_against_the_naive_baseline() -> None:
    args = argparse.Namespace(procs=2, profile=None)
    argv = [str(NAIVE), "--port", str(harness.free_port())]
    with harness.server_process(argv, harness.bench_env(), "naive-broadcast:") as (pid, base):
        rows = idle_memory(Target("naive", pid, base, "t", "thread"), [30, 10], args)
    # Steps in increasing order, each opening only what the previous one had not.
    assert [(r["idle_connections"], r["opened"]) for r in rows] == [(10, 10), (30, 20)]
    for row in rows:
        assert row["rss_after_mb"] >= row["rss_before_mb"] > 0
        assert row["open_s"] >= 0 and row["opened_per_s"] > 0
        assert row["open_cpu_ms_per_connection"] >= 0  # psutil counts CPU in 10 ms ticks
