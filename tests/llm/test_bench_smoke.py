"""``loadtests/bench_stream.py`` still runs: a tiny inline run against the test database."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "loadtests" / "bench_stream.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_stream", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


async def test_bench_stream_small_run(pg_dsn: str) -> None:
    bench = _load()
    args = argparse.Namespace(
        replies=3, watchers=2, tokens=20, delay_ms=1.0, fake="inline", server="inline", timeout=30.0
    )
    result = await bench.bench(pg_dsn, args, None)
    assert result["watchers_with_full_text"] == "6/6"
    assert result["tokens_delivered_per_s"] > 0 and result["frames_per_s"] > 0
    assert result["ttfd_overhead_added_by_server_ms"]["p99"] >= 0
