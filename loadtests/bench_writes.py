"""Write benchmark: Threadline's send beside the naive single-INSERT endpoint, same clients.

One embedded PostgreSQL (or ``THREADLINE_TEST_DATABASE_URL``) serves both servers, each run as
its own process: the naive baseline (``loadtests/naive_insert.py``: quart-trio, one asyncpg
INSERT through trio-asyncio) and ``threadline serve``. The load comes from ``--procs`` client
processes holding ``--clients`` keep-alive HTTP/1.1 connections between them, each connection
sending one request at a time (a lean raw-socket client: httpx alone stalls near 270 req/s per
process). Threadline's clients are ``--clients`` users, each posting ``reply: false`` messages
with a fresh ``client_msg_id`` to a thread of its own over ``Authorization: Bearer``.

For each server and each load, after a warm-up, over ``--seconds``:

* sends/s completed and p50/p99 latency (request written -> response read);
* server CPU per send (user+sys of the server process over the window / sends) and the
  PostgreSQL backends' CPU per send (work moved into SQL shows there, not hidden);
* the ratio Threadline / naive of each.

Loads: ``closed`` (every connection sends as soon as its last answer came: the most the server
does) and, with ``--rate R``, a paced run where the connections together aim at R sends/s.

    .venv/bin/python loadtests/bench_writes.py --clients 50 --procs 3 --seconds 8 --rate 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import (
    ClientLink,
    ClientProcesses,
    bench_env,
    cpu_of,
    cpu_seconds,
    database,
    free_port,
    percentile,
    postgres_backends,
    revision_tree,
    server_process,
)

HERE = Path(__file__).resolve().parent


# -- the client processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one client connection sends: a path, headers and a body maker's template."""

    path: str
    headers: str  # extra header lines, each ending in \r\n
    body: str  # JSON with "{id}" replaced by a fresh hex id per request


def _request(host: str, job: Job) -> bytes:
    body = job.body.replace("{id}", uuid.uuid4().hex).encode()
    head = (
        f"POST {job.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{job.headers}\r\n"
    )
    return head.encode() + body


async def _connection(
    host: str,
    port: int,
    job: Job,
    start: float,
    window: tuple[float, float],
    interval: float | None,
    out: dict[str, Any],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    loop_end = window[1]
    next_at = start
    try:
        while True:
            now = time.time()
            if now >= loop_end:
                return
            if interval is not None:
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at += interval
            sent = time.time()
            writer.write(_request(host, job))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done = time.time()
            if window[0] <= sent and done <= window[1]:
                out["latencies"].append(done - sent)
                out["status"][status] = out["status"].get(status, 0) + 1
    finally:
        writer.close()


@dataclass(frozen=True)
class Share:
    """One client process's part of a load."""

    host: str
    port: int
    jobs: list[Job]
    start: float  # Unix time the first sends go out
    window: tuple[float, float]  # only requests sent and answered inside count
    interval: float | None  # per connection, for a paced load


def client_process(share: Share, link: ClientLink) -> None:
    out: dict[str, Any] = {"latencies": [], "status": {}}

    async def run() -> None:
        await asyncio.sleep(max(0.0, share.start - time.time()))
        n = len(share.jobs)
        # Spread the paced connections' first sends over one interval.
        await asyncio.gather(
            *(
                _connection(
                    share.host,
                    share.port,
                    job,
                    share.start + (i / n) * (share.interval or 0),
                    share.window,
                    share.interval,
                    out,
                )
                for i, job in enumerate(share.jobs)
            )
        )

    link.ready()
    asyncio.run(run())
    link.result(out)


# -- one measured load ---------------------------------------------------------------------------


def measure(
    name: str,
    base: str,
    server_pid: int,
    jobs: list[Job],
    args: argparse.Namespace,
    rate: float | None,
) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    start = time.time() + 2.0  # the processes' start-up
    window = (start + args.warmup, start + args.warmup + args.seconds)
    interval = None if rate is None else len(jobs) / rate
    shares = [
        Share(host, int(port), jobs[i :: args.procs], start, window, interval)
        for i in range(args.procs)
        if jobs[i :: args.procs]
    ]
    with ClientProcesses(client_process, shares) as clients:
        clients.wait_ready()
        time.sleep(max(0.0, window[0] - time.time()))
        pg = postgres_backends(args.dsn)
        cpu0, pg0 = cpu_seconds(server_pid), cpu_of(pg)
        time.sleep(max(0.0, window[1] - time.time()))
        cpu1, pg1 = cpu_seconds(server_pid), cpu_of(pg)
        outs = clients.results(timeout_s=args.seconds + args.warmup + 60)
    latencies = [lat for out in outs for lat in out["latencies"]]
    statuses: dict[int, int] = {}
    for out in outs:
        for status, count in out["status"].items():
            statuses[status] = statuses.get(status, 0) + count
    sends = len(latencies)
    pg_cpu = sum(pg1[pid] - pg0[pid] for pid in pg1 if pid in pg0)
    return {
        "server": name,
        "load": "closed" if rate is None else f"{rate:g}/s",
        "sends_per_s": round(sends / args.seconds, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "server_cpu_ms_per_send": round((cpu1 - cpu0) / max(sends, 1) * 1000, 3),
        "server_cpu_share": round((cpu1 - cpu0) / args.seconds, 2),
        "pg_cpu_ms_per_send": round(pg_cpu / max(sends, 1) * 1000, 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


# -- the two servers -----------------------------------------------------------------------------


def naive_jobs(n: int) -> list[Job]:
    return [
        Job("/messages", "", json.dumps({"thread": f"t{i}", "content": "bench {id}"}))
        for i in range(n)
    ]


def threadline_jobs(base: str, n: int) -> list[Job]:
    """n users, each with a project and a thread: one send job per user."""
    jobs = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(n):
            creds = {"email": f"w{i}-{uuid.uuid4().hex[:8]}@example.com", "password": "bench pw 12"}
            http.post("/api/v1/auth/register", json=creds).raise_for_status()
            token = http.post("/api/v1/auth/login", json=creds).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            project = http.post("/api/v1/projects", json={"name": "w"}, headers=auth).json()
            thread = http.post(
                f"/api/v1/projects/{project['id']}/threads", json={"title": "w"}, headers=auth
            ).json()
            body = json.dumps({"content": "bench {id}", "client_msg_id": "{id}", "reply": False})
            jobs.append(
                Job(
                    f"/api/v1/threads/{thread['id']}/messages",
                    f"Authorization: Bearer {token}\r\n",
                    body,
                )
            )
    return jobs


def start_profiler(pid: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """py-spy the server through the first load (warm-up and window)."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(args.seconds + args.warmup + 2)),
            "-o",
            args.profile,
            "-f",
            args.profile_format,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loads: list[float | None] = [None] + [float(r) for r in args.rate]
    with database() as dsn, contextlib.ExitStack() as stack:
        args.dsn = dsn
        env = bench_env()
        before: Path | None = None
        before_env: dict[str, str] = {}
        if args.before:
            before, before_env = stack.enter_context(checkout(args.before, dsn, env))
        naive = [str(HERE / "naive_insert.py"), "--dsn", dsn]
        tl_env = {
            **env,
            "THREADLINE_DATABASE_URL": dsn,
            "THREADLINE_DATA_DIR": tempfile.mkdtemp(prefix="tl-bench-writes-data-"),
        }
        for _ in range(args.rounds):
            if "naive" in args.servers:
                naive_argv = [*naive, "--port", str(free_port())]
                with server_process(naive_argv, env, "naive: serving on") as (pid, base):
                    for rate in loads:
                        row = measure("naive", base, pid, naive_jobs(args.clients), args, rate)
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
            if before is not None:
                rows += threadline_loads("before", before_env, loads, args, cwd=before)
            if "threadline" in args.servers:
                rows += threadline_loads("threadline", tl_env, loads, args)
            if args.without_notify:
                # The cluster's NOTIFY per event (a trigger, migration 0004) takes a global lock
                # at commit: the same server with the trigger disabled shows what it costs.
                with notify_disabled(dsn):
                    rows += threadline_loads("no-notify", tl_env, loads, args)
    return rows


@contextlib.contextmanager
def notify_disabled(dsn: str) -> Iterator[None]:
    sql = "ALTER TABLE thread_events {} TRIGGER thread_events_notify"
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_trigger WHERE tgname = 'thread_events_notify'"
        ).fetchone()
        if found is not None:
            conn.execute(sql.format("DISABLE"))
    if found is None:  # migration 0010 dropped it: sends no longer notify in the commit
        yield
        return
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.format("ENABLE"))


def threadline_loads(
    name: str,
    env: dict[str, str],
    loads: list[float | None],
    args: argparse.Namespace,
    cwd: Path | None = None,
) -> list[dict[str, Any]]:
    rows = []
    tl = ["-m", "server.cli", "serve", "--port", str(free_port())]
    with server_process(tl, env, "threadline: serving on", cwd=cwd) as (pid, base):
        jobs = threadline_jobs(base, args.clients)
        profiler = start_profiler(pid, args) if args.profile and name == "threadline" else None
        for rate in loads:
            row = measure(name, base, pid, jobs, args, rate)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if profiler is not None:
                profiler.wait()
                profiler = None
    return rows


@contextlib.contextmanager
def checkout(rev: str, dsn: str, env: dict[str, str]) -> Iterator[tuple[Path, dict[str, str]]]:
    """Revision ``rev`` of this repository in a temporary directory (``git archive``: the
    repository itself is not touched), with a database of its own migrated by its own code."""
    with revision_tree(rev) as tmp:
        name = "tl_before_" + uuid.uuid4().hex[:8]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        before_dsn = urlunsplit(urlsplit(dsn)._replace(path="/" + name))
        before_env = {
            **env,
            "THREADLINE_DATABASE_URL": before_dsn,
            "THREADLINE_DATA_DIR": tempfile.mkdtemp(prefix="tl-bench-before-data-"),
        }
        subprocess.run(
            [sys.executable, "-m", "server.cli", "migrate", "up"],
            cwd=tmp,
            env=before_env,
            check=True,
            capture_output=True,
        )
        yield Path(tmp), before_env


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "server",
        "load",
        "sends_per_s",
        "p50_ms",
        "p99_ms",
        "server_cpu_ms_per_send",
        "server_cpu_share",
        "pg_cpu_ms_per_send",
    ]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for row in rows:
        lines.append(" | ".join(str(row[c]) for c in cols))
    ratios = []
    naive = {r["load"]: r for r in rows if r["server"] == "naive"}
    for row in rows:
        base = naive.get(row["load"])
        if row["server"] not in ("threadline", "no-notify") or base is None:
            continue
        ratios.append(
            f"{row['load']}: {row['server']}/naive CPU per send "
            f"{row['server_cpu_ms_per_send'] / max(base['server_cpu_ms_per_send'], 1e-9):.2f}x, "
            f"sends/s {row['sends_per_s'] / max(base['sends_per_s'], 1e-9):.2f}x, "
            f"p99 {row['p99_ms'] / max(base['p99_ms'], 1e-9):.2f}x"
        )
    before = {r["load"]: r for r in rows if r["server"] == "before"}
    for row in rows:
        old = before.get(row["load"])
        if row["server"] != "threadline" or old is None:
            continue
        ratios.append(
            f"{row['load']}: threadline/before CPU per send "
            f"{row['server_cpu_ms_per_send'] / max(old['server_cpu_ms_per_send'], 1e-9):.2f}x, "
            f"sends/s {row['sends_per_s'] / max(old['sends_per_s'], 1e-9):.2f}x, "
            f"p99 {row['p99_ms'] / max(old['p99_ms'], 1e-9):.2f}x"
        )
    return "\n".join([*lines, "", *ratios])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections")
    parser.add_argument("--procs", type=int, default=3, help="client processes")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per load")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--rate", action="append", default=[], help="also a paced load at this total rate"
    )
    parser.add_argument("--rounds", type=int, default=1, help="naive then threadline, N times")
    parser.add_argument(
        "--servers", default="naive,threadline", help="comma-separated: naive, threadline"
    )
    parser.add_argument(
        "--before",
        help="also run this git revision's server (e.g. the commit before the work), same clients",
    )
    parser.add_argument(
        "--without-notify",
        action="store_true",
        help="also run the current server with the per-event NOTIFY trigger disabled",
    )
    parser.add_argument("--profile", help="py-spy the threadline server's first load into this")
    parser.add_argument("--profile-format", default="speedscope")
    args = parser.parse_args()
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
