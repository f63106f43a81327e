"""How long Python's cyclic garbage collector stops the process, as a metric.

``install()`` (``threadline serve`` only: a process-wide choice) adds a ``gc.callbacks`` hook that
times every collection and counts it in ``threadline_gc_pause_seconds{generation}`` (a histogram
read at scrape time). A collection stops the trio loop, so every frame, reply and request waits
for it: with the fan-out benchmark's 1,000 subscribers a full (generation 2) collection took
about 55 ms (docs/performance.md, "Fan-out"), which is why the first threshold is raised
(``THREADLINE_GC_THRESHOLD``) and the start-up heap is frozen out of the collector's sight
(``THREADLINE_GC_FREEZE``, ``freeze_startup()``).

The hook does no locking and allocates nothing the collector tracks: it runs inside the
collection, in whichever thread triggered it, so it only adds to plain counters; the Prometheus
histogram is built from them when ``/metrics`` is read.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, HistogramMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NAME = "threadline_gc_pause_seconds"


class GcPauses(Collector):
    """Counts of collections by generation and pause bucket (the last bucket is +Inf)."""

    def __init__(self) -> None:
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]
        self.sums = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.counts[generation][bisect.bisect_left(BUCKETS, pause)] += 1
        self.sums[generation] += pause
        if pause > self.longest[generation]:
            self.longest[generation] = pause

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            NAME,
            "Pauses of Python's cyclic garbage collector in this process (the trio loop stops "
            "for each), by generation (2: a full collection).",
            labels=["generation"],
        )
        for generation in range(3):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for i, count in enumerate(self.counts[generation]):
                cumulative += count
                le = "+Inf" if i == len(BUCKETS) else repr(BUCKETS[i])
                buckets.append((le, cumulative))
            family.add_metric([str(generation)], buckets, self.sums[generation])
        yield family


_installed: GcPauses | None = None


def install() -> GcPauses:
    """Time every collection from now on (idempotent); the collector behind the metric."""
    global _installed
    if _installed is None:
        _installed = GcPauses()
        gc.callbacks.append(_installed.callback)
        REGISTRY.register(_installed)
    return _installed


def freeze_startup() -> int:
    """Collect once, then move every object alive now (modules, classes, the app, the pools:
    start-up's, which live as long as the process) to the permanent generation, so that no
    later collection traverses them again; how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
