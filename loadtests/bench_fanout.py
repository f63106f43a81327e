"""Fan-out benchmark: Threadline beside the naive quart-trio broadcast, with the same clients.

For each server (``loadtests/naive_broadcast.py`` and ``threadline serve``, each its own
process; Threadline on an embedded PostgreSQL in a temporary directory unless
``THREADLINE_TEST_DATABASE_URL`` is set) and each subscriber count N in ``--subscribers``:

1. *publish cost*: events posted over REST with nobody subscribed: server CPU per publish;
2. *fan-out*: N subscribers on one thread, held by ``--procs`` client processes of their own
   (``loadtests/ws_clients.py``: raw sockets and epoll, cheap per frame); the driver posts
   ``--deliveries-per-s / N`` events per second for ``--seconds`` (every event goes to all N).
   Printed: deliveries/s, client-measured latency p50/p99 (publish time written in the message
   -> frame parsed by the client), gaps, the server's CPU share (CPU seconds / wall seconds)
   and its CPU per delivered frame, gross and net of the publish cost measured in step 1;
3. ``--stalled``: the same again with that many extra subscribers that never read (a 4 KiB
   receive buffer), and ``--pad`` characters per event;
4. ``--idle N [N ...]``: that many subscribed idle connections, opened in cumulative steps
   (``--idle 1000 10000``: 1,000, then 9,000 more) and held: per step, the server's RSS growth
   per connection, how long opening the step took and the server CPU per connection opened.
   Runs first, on the freshly started server (memory freed later is not given back to the OS).
   With ``--subscribers`` left empty, only this is measured.

The ratios Threadline / naive are printed last. Both servers see the same client processes,
the same events and the same machine, one after the other in one run.

    .venv/bin/python loadtests/bench_fanout.py --subscribers 100 1000 --procs 3 --idle 1000 10000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import harness
from loadtests.ws_clients import Share, subscribers


@dataclass
class Target:
    """A server under test: where it is, how to post to it, which thread."""

    name: str
    pid: int
    base: str
    token: str
    thread_id: str
    dsn: str | None = None  # Threadline's embedded PostgreSQL, whose CPU is counted too


def threadline_setup(base: str) -> tuple[str, str]:
    """A user, a project and a thread; (token, thread id)."""
    with httpx.Client(base_url=base, timeout=60) as http:
        creds = {"email": f"fan-{uuid.uuid4().hex[:10]}@example.com", "password": "bench pw 12"}
        http.post("/api/v1/auth/register", json=creds).raise_for_status()
        token = http.post("/api/v1/auth/login", json=creds).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        project = http.post("/api/v1/projects", json={"name": "fan"}, headers=auth).json()
        thread = http.post(
            f"/api/v1/projects/{project['id']}/threads", json={"title": "fan"}, headers=auth
        ).json()
        return token, str(thread["id"])


def publish(target: Target, events: int, rate: float, pad: int, concurrency: int = 8) -> float:
    """Post ``events`` messages, event i at start + i / ``rate``, from ``concurrency`` threads
    (a send takes longer than 1 / rate: one at a time could not keep the pace); elapsed s.

    Each thread's HTTP client is created and its connection opened (one ``GET /healthz``)
    before the clock starts: created inside the measured window, the eight clients' set-up
    (an SSL context each, under the GIL) held the first events back and sent them in a bunch,
    and those few events were the whole p99 (docs/performance.md, "Fan-out")."""
    workers = max(1, min(concurrency, events))
    clients = [
        httpx.Client(
            base_url=target.base, timeout=60, headers={"Authorization": f"Bearer {target.token}"}
        )
        for _ in range(workers)
    ]
    for http in clients:
        http.get("/healthz")  # opens the keep-alive connection (a 404 on the naive server)
    lock = threading.Lock()
    next_index = [0]
    start = time.monotonic()

    def worker(http: httpx.Client) -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= events:
                return
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = {
                "content": f"{time.time():.6f}".ljust(pad),
                "client_msg_id": uuid.uuid4().hex,
                "reply": False,
            }
            url = f"/api/v1/threads/{target.thread_id}/messages"
            http.post(url, json=body).raise_for_status()

    threads = [threading.Thread(target=worker, args=(http,)) for http in clients]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for http in clients:
            http.close()
    return time.monotonic() - start


def delivery_buckets(target: Target) -> list[tuple[float, float]]:
    """Threadline's commit -> frame-handed-to-sockets histogram: cumulative (le, count)."""
    if target.name != "threadline":
        return []
    text = httpx.get(f"{target.base}/metrics", timeout=30).text
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("threadline_event_delivery_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return buckets


def gc_pauses(target: Target) -> dict[str, tuple[float, float]]:
    """Threadline's collector pauses so far: generation -> (collections, seconds)."""
    if target.name != "threadline":
        return {}
    text = httpx.get(f"{target.base}/metrics", timeout=30).text
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix, i in (("_count", 0), ("_sum", 1)):
            if line.startswith(f"threadline_gc_pause_seconds{suffix}{{"):
                generation = line.split('generation="')[1].split('"')[0]
                found.setdefault(generation, [0.0, 0.0])[i] = float(line.split()[-1])
    return {g: (n, s) for g, (n, s) in found.items()}


def event_split(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each frame's latency in two parts, p99 of each over all frames: the earliest delivery of
    its event (anywhere: the send path, the server's commit to its first socket, one client) and
    the rest (the frame's place in the fan-out loop, and its client process's own lag)."""
    first: dict[float, float] = {}
    for r in results:
        for sent, lat in zip(r["sent"], r["latencies"], strict=True):
            if lat < first.get(sent, float("inf")):
                first[sent] = lat
    pairs = [(s, lat) for r in results for s, lat in zip(r["sent"], r["latencies"], strict=True)]
    own = [first[s] for s, _ in pairs]
    rest = [lat - first[s] for s, lat in pairs]
    return {
        "event_first_p99_ms": round(harness.percentile(own, 99) * 1000, 1),
        "after_first_p99_ms": round(harness.percentile(rest, 99) * 1000, 1),
        "events_over_200ms": sum(1 for lat in first.values() if lat > 0.2),
    }


def bucket_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> dict[str, float]:
    """Upper bounds (ms) of the buckets holding p50 and p99 of the events between two scrapes."""
    diff = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = diff[-1][1] if diff else 0.0
    result: dict[str, float] = {}
    for q in (0.5, 0.99):
        for le, count in diff:
            if total and count >= q * total:
                result[f"p{int(q * 100)}_le_ms"] = le * 1000
                break
    return result


def publish_cost(target: Target, args: argparse.Namespace) -> float:
    """Server CPU seconds per publish with nobody subscribed (after a short warm-up)."""
    publish(target, 20, 1e9, args.pad)
    cpu0 = harness.cpu_seconds(target.pid)
    publish(target, args.publish_events, args.publish_rate, args.pad)
    return float((harness.cpu_seconds(target.pid) - cpu0) / args.publish_events)


def shares(target: Target, n: int, stalled: int, procs: int, expect: int) -> list[Share]:
    host, port = target.base.removeprefix("http://").split(":")
    procs = max(1, min(procs, n))
    return [
        Share(
            host=host,
            port=int(port),
            token=target.token,
            thread_id=target.thread_id,
            count=n // procs + (1 if i < n % procs else 0),
            stalled=stalled if i == 0 else 0,
            expect=expect,
        )
        for i in range(procs)
    ]


def fanout(
    target: Target, n: int, args: argparse.Namespace, per_publish_s: float, stalled: int = 0
) -> dict[str, Any]:
    rate = max(0.2, args.deliveries_per_s / n)
    events = max(1, round(rate * args.seconds))
    with harness.ClientProcesses(
        subscribers, shares(target, n, stalled, args.procs, events)
    ) as clients:
        clients.wait_ready(timeout_s=120 + n * 0.01)
        time.sleep(0.5)
        profiler = profile(target, n, args)
        scraped, gc0 = delivery_buckets(target), gc_pauses(target)
        others = [psutil.Process(pid) for pid in clients.pids]
        others += harness.postgres_backends(target.dsn) if target.dsn else []
        others_cpu0, driver0 = harness.cpu_of(others), harness.cpu_seconds(os.getpid())
        wall0, (user0, sys0) = time.monotonic(), harness.cpu_split(target.pid)
        load0 = os.getloadavg()[0]
        published_for = publish(target, events, rate, args.pad)
        results = clients.results(timeout_s=args.seconds + 60)
        user1, sys1 = harness.cpu_split(target.pid)
        server_side = bucket_quantiles(scraped, delivery_buckets(target)) if scraped else {}
        wall, cpu = time.monotonic() - wall0, (user1 - user0) + (sys1 - sys0)
        others_cpu1, driver1 = harness.cpu_of(others), harness.cpu_seconds(os.getpid())
        gc1 = gc_pauses(target)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            profiler.wait(timeout=60)
    clients_cpu = sum(others_cpu1.get(p, 0.0) - others_cpu0.get(p, 0.0) for p in clients.pids)
    pg_cpu = sum(others_cpu1.values()) - sum(others_cpu0.values()) - clients_cpu
    gc_window = {
        f"gen{g}": [int(n - gc0.get(g, (0, 0))[0]), round((t - gc0.get(g, (0, 0))[1]) * 1000, 1)]
        for g, (n, t) in sorted(gc1.items())
    }
    received = sum(r["received"] for r in results)
    latencies = [lat for r in results for lat in r["latencies"]]
    first = min((r["first_at"] for r in results if r["first_at"]), default=0.0)
    last = max((r["last_at"] for r in results), default=0.0)
    closes: dict[str, int] = {}
    for r in results:
        for code, count in r["closes"].items():
            closes[code] = closes.get(code, 0) + count
    pct = harness.percentiles(latencies)
    delivered_s = max(last - first, published_for, 1e-9)
    return {
        "server": target.name,
        "subscribers": n,
        "stalled": stalled,
        "pad": args.pad,
        "events": events,
        "delivered": received,
        "expected": events * n,
        "gaps": sum(r["gaps"] for r in results),
        "deliveries_per_s": round(received / delivered_s),
        "p50_ms": round(pct["p50"] * 1000, 1),
        "p99_ms": round(pct["p99"] * 1000, 1),
        "server_cpu_share": round(cpu / wall, 2),
        "cpu_us_per_delivery": round(cpu / max(received, 1) * 1e6, 1),
        "net_cpu_us_per_delivery": round(
            (cpu - per_publish_s * events) / max(received, 1) * 1e6, 1
        ),
        "user_us_per_delivery": round((user1 - user0) / max(received, 1) * 1e6, 1),
        "sys_us_per_delivery": round((sys1 - sys0) / max(received, 1) * 1e6, 1),
        "publish_cpu_ms": round(per_publish_s * 1000, 2),
        "server_commit_to_sockets": server_side,
        **event_split(results),
        "server_gc_collections_ms": gc_window,
        "cpu_share_clients": round(clients_cpu / wall, 2),
        "cpu_share_postgres": round(pg_cpu / wall, 2),
        "cpu_share_publisher": round((driver1 - driver0) / wall, 2),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "closes": closes,
    }


def profile(
    target: Target, n: int | str, args: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
    """``--profile DIR``: py-spy the server through this phase into DIR (collapsed stacks)."""
    if not args.profile:
        return None
    out = Path(args.profile) / f"{target.name}-{n}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            *(str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking"),
            *("-r", "200", "-p", str(target.pid), "-f", "raw", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def idle_memory(
    target: Target, counts: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Open idle subscribed connections in steps up to each of ``counts`` (cumulative, all held
    until the last step is measured): per step, the RSS growth per connection since before the
    first one, how long opening that step's connections took and the server CPU they cost."""
    rows: list[dict[str, Any]] = []
    before = harness.rss_bytes(target.pid)
    with contextlib.ExitStack() as held:
        opened = 0
        for n in sorted(counts):
            batch = n - opened
            if batch <= 0:
                continue
            profiler = profile(target, f"idle-{n}", args)
            cpu0, wall0 = harness.cpu_seconds(target.pid), time.monotonic()
            clients = held.enter_context(
                harness.ClientProcesses(subscribers, shares(target, batch, 0, args.procs, 0))
            )
            clients.wait_ready(timeout_s=120 + batch * 0.05)
            opened_s, cpu = time.monotonic() - wall0, harness.cpu_seconds(target.pid) - cpu0
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            opened = n
            time.sleep(2.0)  # let the server settle before sampling its memory
            after = harness.rss_bytes(target.pid)
            rows.append(
                {
                    "server": target.name,
                    "idle_connections": n,
                    "rss_before_mb": round(before / 2**20, 1),
                    "rss_after_mb": round(after / 2**20, 1),
                    "rss_kib_per_connection": round((after - before) / n / 1024, 1),
                    "opened": batch,
                    "open_s": round(opened_s, 1),
                    "opened_per_s": round(batch / opened_s),
                    "open_cpu_ms_per_connection": round(cpu / batch * 1000, 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_target(target: Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if args.idle:  # first, on a fresh process: memory freed later is not given back to the OS
        rows += idle_memory(target, args.idle, args)
    if not args.subscribers and not args.stalled:
        return rows
    per_publish = publish_cost(target, args)
    for n in args.subscribers:
        rows.append(fanout(target, n, args, per_publish))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.stalled:
        rows.append(fanout(target, args.subscribers[0], args, per_publish, stalled=args.stalled))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    harness.raise_nofile_limit()
    rows: list[dict[str, Any]] = []
    here = Path(__file__).resolve().parent
    if "naive" in args.servers:
        naive = [str(here / "naive_broadcast.py"), "--port", str(harness.free_port())]
        with harness.server_process(naive, harness.bench_env(), "naive-broadcast:") as (pid, base):
            rows += run_target(Target("naive", pid, base, "naive", "t1"), args)
    if "threadline" in args.servers:
        with harness.database() as dsn:
            env = harness.bench_env(
                THREADLINE_DATABASE_URL=dsn,
                THREADLINE_DATA_DIR=tempfile.mkdtemp(prefix="tl-bench-fanout-"),
                **dict(kv.split("=", 1) for kv in args.env),
            )
            tl = ["-m", "server.cli", "serve", "--port", str(harness.free_port())]
            with harness.server_process(tl, env, "threadline: serving on") as (pid, base):
                token, thread_id = threadline_setup(base)
                rows += run_target(Target("threadline", pid, base, token, thread_id, dsn), args)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "server",
        "subscribers",
        "stalled",
        "deliveries_per_s",
        "p50_ms",
        "p99_ms",
        "server_cpu_share",
        "cpu_us_per_delivery",
        "net_cpu_us_per_delivery",
        "user_us_per_delivery",
        "sys_us_per_delivery",
        "event_first_p99_ms",
        "after_first_p99_ms",
        "cpu_share_clients",
        "cpu_share_postgres",
        "cpu_share_publisher",
        "gaps",
        "delivered",
        "expected",
    ]
    fan = [r for r in rows if "deliveries_per_s" in r]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in fan]
    naive = {(r["subscribers"], r["stalled"]): r for r in fan if r["server"] == "naive"}
    for r in fan:
        base = naive.get((r["subscribers"], r["stalled"]))
        if r["server"] == "threadline" and base is not None:
            ratio = {
                k: r[k] / max(base[k], 1e-9)
                for k in (
                    "cpu_us_per_delivery",
                    "net_cpu_us_per_delivery",
                    "deliveries_per_s",
                    "p99_ms",
                )
            }
            lines.append(
                f"N={r['subscribers']} stalled={r['stalled']}: threadline/naive CPU per delivery "
                f"{ratio['cpu_us_per_delivery']:.2f}x "
                f"(net of publish {ratio['net_cpu_us_per_delivery']:.2f}x), "
                f"deliveries/s {ratio['deliveries_per_s']:.2f}x, p99 {ratio['p99_ms']:.2f}x"
            )
    mem = [r for r in rows if "rss_kib_per_connection" in r]
    naive_mem = {r["idle_connections"]: r for r in mem if r["server"] == "naive"}
    for r in mem:
        lines.append(
            f"{r['server']}: {r['idle_connections']} idle subscribed connections, "
            f"{r['rss_kib_per_connection']} KiB RSS each; the last {r['opened']} opened in "
            f"{r['open_s']} s ({r['opened_per_s']}/s), {r['open_cpu_ms_per_connection']} ms of "
            "server CPU each"
        )
        base = naive_mem.get(r["idle_connections"])
        if r["server"] == "threadline" and base is not None:
            ratio = {
                k: r[k] / max(base[k], 1e-9)
                for k in ("rss_kib_per_connection", "open_s", "open_cpu_ms_per_connection")
            }
            lines.append(
                f"N={r['idle_connections']} idle: threadline/naive RSS per connection "
                f"{ratio['rss_kib_per_connection']:.2f}x, time to open {ratio['open_s']:.2f}x, "
                f"server CPU per connection opened {ratio['open_cpu_ms_per_connection']:.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--deliveries-per-s", type=float, default=10_000.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--procs", type=int, default=3, help="client processes")
    parser.add_argument("--pad", type=int, default=0, help="pad each message to this many chars")
    parser.add_argument("--stalled", type=int, default=0, help="extra never-reading subscribers")
    parser.add_argument(
        "--idle",
        type=int,
        nargs="*",
        default=[],
        help="idle connections for the RSS figure (several: opened in cumulative steps)",
    )
    parser.add_argument("--publish-events", type=int, default=100)
    parser.add_argument("--publish-rate", type=float, default=50.0)
    parser.add_argument("--profile", help="py-spy each fan-out phase into this directory")
    parser.add_argument("--servers", nargs="+", default=["naive", "threadline"])
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for threadline (repeatable)"
    )
    args = parser.parse_args()
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
