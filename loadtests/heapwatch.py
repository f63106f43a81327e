"""Run a ``threadline`` command with its memory watched from inside: what grows, and where.

    python loadtests/heapwatch.py --out DIR [--every 60] [--frames 8] -- serve --port 8000

A daemon thread in the server's own process starts ``tracemalloc`` (after ``--start-s``) and,
every ``--every`` seconds, appends one JSON line to ``DIR/heap.jsonl``:

* ``rss_mb``; the C allocator's view (glibc ``mallinfo2``): ``arena_mb`` (heap obtained with
  brk), ``mmap_mb``, ``in_use_mb`` and ``free_mb`` (freed but kept by the allocator);
* ``traced_mb``: what Python objects hold (tracemalloc), and the top ``--top`` allocation sites
  by growth since the baseline (the first sample after ``--baseline-s``);
* ``objects``: live objects by type (``gc.get_objects``), the types that grew most since the
  baseline.

``kill -USR2 <pid>`` makes the next sample call ``malloc_trim(0)`` first and record the RSS it
gave back (``trimmed_mb``): freed memory kept by the allocator, not held by anything. soak.py's
``--heap-profile DIR`` runs the server under this wrapper. tracemalloc costs CPU and memory
(about 2x the CPU, +30-50 % RSS): compare the samples with each other, not with an unwatched run.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _malloc(libc: Any) -> dict[str, float]:
    info = libc.mallinfo2()
    mb = 2**20
    return {
        "arena_mb": round(info.arena / mb, 2),
        "mmap_mb": round(info.hblkhd / mb, 2),
        "in_use_mb": round(info.uordblks / mb, 2),
        "free_mb": round(info.fordblks / mb, 2),
    }


def _where(frame: tracemalloc.Frame) -> str:
    return f"{frame.filename.removeprefix(str(ROOT) + '/')}:{frame.lineno}"


def _object_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return counts


class Watcher:
    """The sampling thread (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = args.out / "heap.jsonl"
        self.libc = _libc()
        self.trim = threading.Event()
        self.process = psutil.Process()
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_objects: collections.Counter[str] | None = None
        self.started = time.monotonic()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.started, 1)}
        if self.trim.is_set():
            self.trim.clear()
            before = self.process.memory_info().rss
            self.libc.malloc_trim(0)
            row["trimmed_mb"] = round((before - self.process.memory_info().rss) / 2**20, 2)
        row["rss_mb"] = round(self.process.memory_info().rss / 2**20, 2)
        row.update(_malloc(self.libc))
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
        )
        row["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
        objects = _object_counts()
        row["objects_total"] = sum(objects.values())
        if self.baseline is None:
            if row["t"] >= self.args.baseline_s:
                self.baseline, self.baseline_objects = snapshot, objects
                row["baseline"] = True
            return row
        assert self.baseline_objects is not None
        stats = snapshot.compare_to(self.baseline, "traceback")
        row["growth"] = [
            {
                "kib": round(s.size_diff / 1024, 1),
                "count": s.count_diff,
                "where": [
                    f"{f.filename.removeprefix(str(ROOT) + '/')}:{f.lineno}" for f in s.traceback
                ][-self.args.frames :],
            }
            for s in stats[: self.args.top]
        ]
        diff = objects.copy()
        diff.subtract(self.baseline_objects)
        row["objects_growth"] = dict(diff.most_common(self.args.top))
        return row

    def run(self) -> None:
        # Tracing starts once the server is up: imports under tracemalloc take minutes on a
        # loaded machine, and growth is measured from the baseline anyway.
        time.sleep(self.args.start_s)
        tracemalloc.start(self.args.frames)
        self.args.out.mkdir(parents=True, exist_ok=True)
        while True:
            time.sleep(self.args.every)
            row = self.sample()
            with self.out.open("a") as out:
                out.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=float, default=60.0)
    parser.add_argument("--baseline-s", type=float, default=120.0)
    parser.add_argument("--start-s", type=float, default=20.0, help="tracing starts after this")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    watcher = Watcher(args)
    signal.signal(signal.SIGUSR2, lambda *_: watcher.trim.set())
    threading.Thread(target=watcher.run, name="heapwatch", daemon=True).start()
    sys.path.insert(0, str(ROOT))
    from server.cli import main as threadline

    sys.exit(threadline(command))


if __name__ == "__main__":
    main()
