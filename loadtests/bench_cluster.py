"""Cluster benchmark: cross-node delivery next to single-node delivery, and the write-path cost of
publishing through PostgreSQL (NOTIFY in the committing transaction), side by side in one run.

    .venv/bin/python loadtests/bench_cluster.py --subscribers 50 --rate 20 --seconds 8

Two ``threadline serve`` nodes share one PostgreSQL (``harness.database()``: embedded in a
temporary directory unless ``THREADLINE_TEST_DATABASE_URL`` is set).

1. **Delivery.** N WebSocket subscribers on one thread (``ws_clients.subscribers`` in client
   processes) while a publisher posts ``--rate`` messages a second over REST to node A. Rounds
   alternate: subscribers on A (single node: the in-process publish) and on B (cross-node: the
   event reaches B through LISTEN/NOTIFY). Latency is publisher ``time.time()`` in the message →
   frame parsed by a subscriber (same machine clock), p50/p99; throughput is frames delivered a
   second; gaps must be 0.
2. **Write cost.** ``--writers`` concurrent clients (threads in client processes), each posting to
   a thread of its own on node A as fast as answered, for ``--write-seconds``; rounds alternate
   between the current publication (after commit, from node A's broker connection: node B is up,
   so A publishes) and the same plus a ``pg_notify`` inside every committing transaction (the
   design of migration 0004, recreated on the benchmark's own database), so the difference is
   what notifying inside the commit costs a send.

Prints one table per part and the ratios (each figure is the median of its rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import harness
from loadtests.ws_clients import Share, subscribers

READY = "threadline: serving on"


@dataclass(frozen=True)
class Node:
    name: str
    pid: int
    base: str


@dataclass(frozen=True)
class WriterShare:
    """One client process of writers: ``threads`` clients, each with its thread id."""

    base: str
    token: str
    thread_ids: list[str]


@contextlib.contextmanager
def nodes(dsn: str, names: list[str]) -> Iterator[list[Node]]:
    with contextlib.ExitStack() as stack:
        found = []
        for name in names:
            env = harness.bench_env(
                THREADLINE_DATABASE_URL=dsn,
                THREADLINE_NODE_ID=name,
                THREADLINE_PORT=str(harness.free_port()),
            )
            pid, base = stack.enter_context(
                harness.server_process(["-m", "server.cli", "serve"], env, READY)
            )
            found.append(Node(name, pid, base))
        yield found


def setup(base: str, threads: int) -> tuple[str, list[str]]:
    """A user, a project and ``threads`` threads: (token, thread ids)."""
    with httpx.Client(base_url=base, timeout=60) as http:
        creds = {"email": f"cl-{uuid.uuid4().hex[:10]}@example.com", "password": "bench pw 12"}
        http.post("/api/v1/auth/register", json=creds).raise_for_status()
        token = http.post("/api/v1/auth/login", json=creds).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        project = http.post("/api/v1/projects", json={"name": "cl"}, headers=auth).json()
        ids = []
        for _ in range(threads):
            thread = http.post(
                f"/api/v1/projects/{project['id']}/threads", json={"title": "cl"}, headers=auth
            ).json()
            ids.append(str(thread["id"]))
        return token, ids


def publish(base: str, token: str, thread_id: str, events: int, rate: float) -> float:
    """Post ``events`` messages at ``rate`` a second; the content is the send time."""
    with httpx.Client(
        base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        start = time.monotonic()
        for i in range(events):
            body = {"content": f"{time.time():.6f}", "client_msg_id": uuid.uuid4().hex}
            body["reply"] = False  # type: ignore[assignment]
            http.post(f"/api/v1/threads/{thread_id}/messages", json=body).raise_for_status()
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return time.monotonic() - start


def delivery(
    publisher: Node, watched: Node, token: str, thread_id: str, args: argparse.Namespace
) -> dict[str, Any]:
    events = max(1, round(args.rate * args.seconds))
    host, port = watched.base.removeprefix("http://").split(":")
    procs = max(1, min(args.procs, args.subscribers))
    shares = [
        Share(
            host=host,
            port=int(port),
            token=token,
            thread_id=thread_id,
            count=args.subscribers // procs + (1 if i < args.subscribers % procs else 0),
            expect=events,
        )
        for i in range(procs)
    ]
    with harness.ClientProcesses(subscribers, shares) as clients:
        clients.wait_ready()
        time.sleep(0.5)
        took = publish(publisher.base, token, thread_id, events, args.rate)
        results = clients.results(timeout_s=args.seconds + 60)
    received = sum(r["received"] for r in results)
    latencies = [lat for r in results for lat in r["latencies"]]
    first = min((r["first_at"] for r in results if r["first_at"]), default=0.0)
    last = max((r["last_at"] for r in results), default=0.0)
    pct = harness.percentiles(latencies)
    return {
        "path": "single node" if publisher is watched else "cross-node",
        "delivered": received,
        "expected": events * args.subscribers,
        "gaps": sum(r["gaps"] for r in results),
        "per_s": received / max(last - first, took, 1e-9),
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
    }


def writers(share: WriterShare, link: Any) -> None:
    """Client process: one thread per thread id, posting as fast as answered until stopped."""
    latencies: list[list[float]] = [[] for _ in share.thread_ids]
    errors = [0]
    go = threading.Event()

    def run(index: int, thread_id: str) -> None:
        with httpx.Client(
            base_url=share.base, timeout=30, headers={"Authorization": f"Bearer {share.token}"}
        ) as http:
            go.wait()
            while not link.stopping():
                body = {"content": "bench", "client_msg_id": uuid.uuid4().hex, "reply": False}
                started = time.monotonic()
                response = http.post(f"/api/v1/threads/{thread_id}/messages", json=body)
                if response.status_code != 201:
                    errors[0] += 1
                latencies[index].append(time.monotonic() - started)

    workers = [
        threading.Thread(target=run, args=(i, t), daemon=True)
        for i, t in enumerate(share.thread_ids)
    ]
    for worker in workers:
        worker.start()
    link.ready()
    go.set()
    for worker in workers:
        worker.join()
    link.result({"latencies": [x for part in latencies for x in part], "errors": errors[0]})


def write_round(node: Node, token: str, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    procs = max(1, min(args.procs, len(ids)))
    shares = [WriterShare(node.base, token, ids[i::procs]) for i in range(procs)]
    with harness.ClientProcesses(writers, shares) as clients:
        clients.wait_ready()
        started = time.monotonic()
        time.sleep(args.write_seconds)
        clients.stop()
        results = clients.results()
        took = time.monotonic() - started
    latencies = [x for r in results for x in r["latencies"]]
    pct = harness.percentiles(latencies)
    return {
        "sends_per_s": len(latencies) / took,
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "errors": sum(r["errors"] for r in results),
    }


# The design before migration 0010, recreated on the benchmark's own database for comparison:
# every transaction that inserts an event notifies (on a channel no node listens to, so only the
# commit's cost is measured: PostgreSQL queues a notification whether or not anyone listens).
_IN_COMMIT_ON = """
CREATE OR REPLACE FUNCTION bench_notify_in_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('threadline_bench', 'e:' || NEW.thread_id::text || ':' || NEW.seq::text
                      || ':' || NEW.type || ':' || NEW.payload::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_in_commit AFTER INSERT ON thread_events
    FOR EACH ROW EXECUTE FUNCTION bench_notify_in_commit();
"""
_IN_COMMIT_OFF = """
DROP TRIGGER IF EXISTS bench_notify_in_commit ON thread_events;
DROP FUNCTION IF EXISTS bench_notify_in_commit();
"""


def set_notify(dsn: str, enabled: bool) -> None:
    """Notify inside every committing transaction (the old design) or not (the current one)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_IN_COMMIT_OFF)
        if enabled:
            conn.execute(_IN_COMMIT_ON)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"delivery": [], "writes": []}
    with harness.database() as dsn, nodes(dsn, ["node-a", "node-b"]) as (a, b):
        token, ids = setup(a.base, 1 + args.writers)
        for _ in range(args.rounds):
            for watched in (a, b):
                out["delivery"].append(delivery(a, watched, token, ids[0], args))
        if args.writers:
            for _ in range(args.rounds):
                for enabled in (True, False):
                    set_notify(dsn, enabled)
                    row = write_round(a, token, ids[1:], args)
                    out["writes"].append({"notify": enabled, **row})
            set_notify(dsn, False)
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(out: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Delivery: {args.subscribers} subscribers on one thread, {args.rate:g} messages/s for "
        f"{args.seconds:g} s, posted over REST to node A; median of {args.rounds} rounds each",
        "| path | frames/s | p50 ms | p99 ms | delivered / expected | gaps |",
        "|---|---|---|---|---|---|",
    ]
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in out["delivery"]:
        by_path.setdefault(row["path"], []).append(row)
    for path, rows in by_path.items():
        lines.append(
            f"| {path} (subscribers on {'A' if path == 'single node' else 'B'}) "
            f"| {_median(rows, 'per_s'):.0f} | {_median(rows, 'p50_ms'):.1f} "
            f"| {_median(rows, 'p99_ms'):.1f} "
            f"| {sum(r['delivered'] for r in rows)} / {sum(r['expected'] for r in rows)} "
            f"| {sum(r['gaps'] for r in rows)} |"
        )
    if len(by_path) == 2:
        single, cross = by_path["single node"], by_path["cross-node"]

        def ratio(key: str) -> float:
            return _median(cross, key) / _median(single, key)

        lines.append(
            f"cross-node / single-node: p50 x{ratio('p50_ms'):.2f}, p99 x{ratio('p99_ms'):.2f}, "
            f"throughput x{ratio('per_s'):.2f}"
        )
    if out["writes"]:
        lines += [
            "",
            f"Write path: {args.writers} concurrent writers (one thread each) on node A for "
            f"{args.write_seconds:g} s; median of {args.rounds} rounds each",
            "| publication | sends/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|",
        ]
        on = [r for r in out["writes"] if r["notify"]]
        off = [r for r in out["writes"] if not r["notify"]]
        for label, rows in (("NOTIFY inside the commit (0004)", on), ("after the commit", off)):
            lines.append(
                f"| {label} | {_median(rows, 'sends_per_s'):.0f} | {_median(rows, 'p50_ms'):.1f} "
                f"| {_median(rows, 'p99_ms'):.1f} | {sum(r['errors'] for r in rows)} |"
            )
        sends = _median(on, "sends_per_s") / _median(off, "sends_per_s")
        p99 = _median(on, "p99_ms") / _median(off, "p99_ms")
        lines.append(f"inside / after the commit: sends/s x{sends:.2f}, p99 x{p99:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--writers", type=int, default=50, help="0 skips the write-cost part")
    parser.add_argument("--write-seconds", type=float, default=8.0)
    parser.add_argument("--json", action="store_true", help="print the raw figures too")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=1))
    print(table(out, args))


if __name__ == "__main__":
    main()
