"""Where an idle subscribed WebSocket's memory goes: the server in this process, under a microscope.

Runs ``threadline serve``'s server (``server.runtime.open_server``, embedded PostgreSQL unless
``THREADLINE_TEST_DATABASE_URL`` is set) in this process with ``tracemalloc`` on, opens ``--n``
subscribed connections from client processes of their own (``loadtests/ws_clients.py``), and
prints, per connection: RSS growth, Python heap growth (tracemalloc) by package and by line,
trio tasks by coroutine, and live objects by type (``gc``); then, having closed them with the
cyclic garbage collector off, what they left in reference cycles (``gc.DEBUG_SAVEALL``: should
be nothing, so that a closed connection is freed as it ends). A warm-up round of connections is
opened and closed first, so one-off caches and imports are not counted.

tracemalloc makes allocation slower and adds its own memory to RSS: the RSS figure here is for
comparing runs of this tool; ``bench_fanout.py --idle`` measures RSS without it.

    .venv/bin/python loadtests/ws_memory.py --n 1000
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import harness
from loadtests.ws_clients import Share, subscribers

PACKAGES = (
    "trio",
    "hypercorn",
    "quart",
    "quart_trio",
    "werkzeug",
    "wsproto",
    "h11",
    "structlog",
    "actors",
    "server",
    "asyncio",
)


def package_of(filename: str) -> str:
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    for name in PACKAGES:
        if name in parts:
            return name
    return Path(filename).name


def all_tasks() -> list[trio.lowlevel.Task]:
    tasks = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        tasks.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


def task_names() -> collections.Counter[str]:
    return collections.Counter(getattr(t.coro, "__qualname__", None) or t.name for t in all_tasks())


def object_types() -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Live gc-tracked objects by type: (counts, bytes by ``sys.getsizeof``)."""
    gc.collect()
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for o in gc.get_objects():
        name = f"{type(o).__module__}.{type(o).__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(o)
    return counts, sizes


def await_chains(names: set[str]) -> list[list[str]]:
    """For one task of each of ``names``: its chain of awaited coroutines with their sizes."""
    chains = []
    for task in all_tasks():
        name = getattr(task.coro, "__qualname__", None) or task.name
        if name not in names:
            continue
        names.discard(name)
        chain = []
        coro: Any = task.coro
        while coro is not None:
            qual = getattr(coro, "__qualname__", type(coro).__name__)
            chain.append(f"{qual} ({sys.getsizeof(coro)} B)")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        chains.append(chain)
    return chains


def per_conn(
    before: collections.Counter[str], after: collections.Counter[str], n: int
) -> list[tuple[str, float]]:
    diff = {k: (after[k] - before.get(k, 0)) / n for k in after}
    return sorted(((k, v) for k, v in diff.items() if v >= 0.5), key=lambda kv: -kv[1])


def open_clients(base: str, token: str, thread_id: str, n: int, procs: int) -> Any:
    host, port = base.removeprefix("http://").split(":")
    shares = [
        Share(
            host=host,
            port=int(port),
            token=token,
            thread_id=thread_id,
            count=n // procs + (1 if i < n % procs else 0),
        )
        for i in range(procs)
    ]
    clients = harness.ClientProcesses(subscribers, shares)
    clients.__enter__()
    clients.wait_ready(timeout_s=120 + n * 0.05)
    return clients


def close_clients(clients: Any) -> None:
    clients.stop()
    clients.results()
    clients.__exit__(None, None, None)


async def measure(args: argparse.Namespace, dsn: str) -> None:
    from server.auth import create_user_with_token
    from server.commands.bus import execute
    from server.commands.models import CreateProject, CreateThread
    from server.config import load_settings
    from server.logs import configure_logging
    from server.principal import Principal
    from server.runtime import open_server

    settings = load_settings(
        data_dir=Path(tempfile.mkdtemp(prefix="tl-ws-memory-")),
        log_level="warning",
        log_format="json",
        rate_limit_per_s=1e6,
        rate_limit_burst=1_000_000,
        ip_rate_limit_per_s=1e6,
        ip_rate_limit_burst=1_000_000,
        argon2_time_cost=1,
        argon2_memory_kib=8,
        argon2_parallelism=1,
    )
    configure_logging(settings.log_format, settings.log_level)
    async with open_server(settings, dsn, bind="127.0.0.1:0") as running:
        services = running.services
        user, token = await create_user_with_token(services)
        principal = Principal(
            user_id=user.id, email=user.email, jti="-", expires_at=2e9, via="bearer"
        )
        project = await execute(services, principal, CreateProject(name="m"))
        assert project.data is not None
        thread = await execute(
            services, principal, CreateThread(project_id=str(project.data["id"]), title="m")
        )
        assert thread.data is not None
        thread_id = str(thread.data["id"])

        def round_trip(n: int) -> Any:
            return open_clients(running.url, token, thread_id, n, args.procs)

        warm = await trio.to_thread.run_sync(round_trip, min(args.n, 200))
        await trio.to_thread.run_sync(close_clients, warm)
        with trio.fail_after(60):
            while services.extras["realtime"].connections or task_names()["_handle"]:
                await trio.sleep(0.1)

        gc.collect()
        tracemalloc.start(args.frames)
        tasks0, types0 = task_names(), object_types()
        snap0 = tracemalloc.take_snapshot()
        rss0 = harness.rss_bytes(_pid())
        clients = await trio.to_thread.run_sync(round_trip, args.n)
        await trio.sleep(2.0)
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
        rss1 = harness.rss_bytes(_pid())
        tasks1, types1 = task_names(), object_types()
        chains = await_chains({k for k, v in per_conn(tasks0, tasks1, args.n)})
        open_now = len(services.extras["realtime"].connections)
        report(args, snap0, snap1, rss1 - rss0, tasks0, tasks1, types0, types1, open_now)
        for chain in chains:
            print("\n  " + "\n    -> ".join(chain))
        tracemalloc.stop()
        # What closing leaves to the cyclic collector: with it off, only reference counting
        # frees the closed connections; what a collection then finds was in reference cycles.
        gc.collect()
        gc.disable()
        try:
            await trio.to_thread.run_sync(close_clients, clients)
            with trio.fail_after(60):
                while services.extras["realtime"].connections or task_names()["_handle"]:
                    await trio.sleep(0.1)
            garbage_report(args.n, args.top)
        finally:
            gc.enable()
        running.shutdown()


def garbage_report(n: int, top: int) -> None:
    """Print the objects the cyclic collector finds (``gc.DEBUG_SAVEALL``), per connection."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
        kinds = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    print(f"\nafter closing: {found / n:.1f} objects per connection left in reference cycles")
    for name, count in kinds.most_common(top):
        print(f"  {count / n:6.2f}  {name}")


def _pid() -> int:
    import os

    return os.getpid()


def report(
    args: argparse.Namespace,
    snap0: tracemalloc.Snapshot,
    snap1: tracemalloc.Snapshot,
    rss: int,
    tasks0: collections.Counter[str],
    tasks1: collections.Counter[str],
    types0: tuple[collections.Counter[str], collections.Counter[str]],
    types1: tuple[collections.Counter[str], collections.Counter[str]],
    open_now: int,
) -> None:
    n = args.n
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snap0, snap1 = snap0.filter_traces(skip), snap1.filter_traces(skip)
    stats = snap1.compare_to(snap0, "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"{n} idle subscribed connections ({open_now} open in the server)")
    print(f"RSS growth per connection (tracemalloc on): {rss / n / 1024:.1f} KiB")
    print(f"Python heap growth per connection: {total / n / 1024:.1f} KiB")

    # Attribute each allocation to the innermost frame of one of our packages of interest,
    # which says who asked for the memory, and also to the innermost frame of all.
    by_owner: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    for stat in stats:
        if stat.size_diff <= 0:
            continue
        frames = list(stat.traceback)  # most recent call last (tracemalloc's default order)
        inner = frames[-1]
        by_line[f"{inner.filename.split('site-packages/')[-1]}:{inner.lineno}"] += stat.size_diff
        owner = package_of(inner.filename)
        by_owner[owner] += stat.size_diff
    print("\nby package of the allocating line (KiB per connection):")
    for name, size in by_owner.most_common(20):
        print(f"  {size / n / 1024:7.2f}  {name}")
    print(f"\ntop {args.top} allocating lines (KiB per connection):")
    for name, size in by_line.most_common(args.top):
        print(f"  {size / n / 1024:7.2f}  {name}")
    print("\ntasks per connection:")
    for name, count in per_conn(tasks0, tasks1, n):
        print(f"  {count:5.2f}  {name}")
    print("\nlive objects per connection (gc-tracked, by type: count, bytes by sys.getsizeof):")
    counts = dict(per_conn(types0[0], types1[0], n))
    for name, size in per_conn(types0[1], types1[1], n)[: args.top]:
        print(f"  {counts.get(name, 0):6.2f}  {size:8.0f} B  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="idle subscribed connections")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc traceback depth")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    harness.raise_nofile_limit()
    with harness.database() as dsn:
        trio.run(measure, args, dsn)


if __name__ == "__main__":
    main()
