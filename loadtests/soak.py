"""Soak: steady mixed load for minutes, then check that nothing grows.

Runs ``threadline fake-llm`` and ``threadline serve`` as subprocesses (a temporary embedded
database) and drives them from this process: clients that connect a WebSocket, subscribe, send
(some with assistant replies), edit, read a page over REST, then disconnect and start again
(connection churn). Every few seconds it samples the server's resident memory, open file
descriptors and its own metrics (WebSocket connections, thread actors, pool in use), and keeps
per-minute latency percentiles of each operation.

Pass criteria (exit status 1 otherwise), after the warm-up:
* resident memory at the end within 10 % of its post-warm-up value;
* no growth in WebSocket connections, thread actors or file descriptors (end vs. post-warm-up);
* p99 of each operation in the last minute within 2x (+50 ms) of the first post-warm-up minute;
* once the load stops: WebSocket connections back to 0, the pool at rest.

    python loadtests/soak.py --minutes 10            # make soak
    python loadtests/soak.py --minutes 1 --warmup-s 15   # a quick look
    python loadtests/soak.py --heap-profile DIR      # the server under heapwatch.py: what grows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


@dataclass
class Samples:
    """Time series of the server process and its metrics, and latencies per minute."""

    rows: list[dict[str, float]] = field(default_factory=list)
    latency: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ops: int = 0
    client_exits: list[float] = field(default_factory=list)  # seconds into the run


def _metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels and labels not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


async def sampler(base: str, pid: int, samples: Samples, started: float, every: float) -> None:
    proc = psutil.Process(pid)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while True:
            try:
                text = (await http.get("/metrics")).text
            except httpx.HTTPError:
                samples.errors["metrics_scrape"] += 1
                await trio.sleep(every)
                continue
            samples.rows.append(
                {
                    "t": time.monotonic() - started,
                    "rss_mb": proc.memory_info().rss / 2**20,
                    "fds": proc.num_fds(),
                    "ws": _metric(text, "threadline_ws_connections"),
                    "actors": _metric(text, "threadline_thread_actors"),
                    "pool_in_use": _metric(
                        text, "threadline_db_pool_connections", 'state="in_use"'
                    ),
                }
            )
            await trio.sleep(every)


def _pong_only_while_open() -> None:
    """Make trio-websocket answer pings only while the connection is open.

    It answers a ping that arrives after our close frame has gone, and that send fails
    (wsproto's LocalProtocolError in the connection's reader task) in a way that escapes the
    client's ``except Exception`` and ends every client (python-trio/trio-websocket#184; the
    fix proposed in #198 is this one). The server pings; a churned connection closing just as
    a ping arrives ended the soak's load (seen after a multi-second stall of the server).
    """
    from trio_websocket._impl import WebSocketConnection
    from wsproto.connection import ConnectionState
    from wsproto.events import Ping

    answer = WebSocketConnection._handle_ping_event

    async def handle_ping(self: WebSocketConnection, event: Ping) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await answer(self, event)

    WebSocketConnection._handle_ping_event = handle_ping  # type: ignore[method-assign]


async def client(
    base: str, token: str, thread_id: str, samples: Samples, started: float, deadline: float
) -> None:
    """Connect, do a few operations, disconnect; again until the deadline."""
    rng = random.Random()
    ws_url = base.replace("http://", "ws://") + "/ws"
    headers = {"Authorization": f"Bearer {token}"}
    ref = 0

    def timed(op: str, since: float) -> None:
        minute = int((time.monotonic() - started) // 60)
        samples.latency[(minute, op)].append(time.monotonic() - since)
        samples.ops += 1

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        while time.monotonic() < deadline:
            try:
                async with open_websocket_url(ws_url, extra_headers=list(headers.items())) as ws:

                    async def request(op: str, **fields: Any) -> dict[str, Any]:
                        nonlocal ref
                        ref += 1
                        mine = str(ref)
                        await ws.send_message(json.dumps({"op": op, "ref": mine, **fields}))
                        while True:  # events of the thread interleave with our reply
                            frame = json.loads(await ws.get_message())
                            if frame.get("op") == "reply" and frame.get("ref") == mine:
                                return frame  # type: ignore[no-any-return]

                    await request("subscribe", thread_id=thread_id)
                    last: dict[str, Any] | None = None
                    for _ in range(rng.randint(5, 20)):
                        if time.monotonic() >= deadline:
                            break
                        roll = rng.random()
                        since = time.monotonic()
                        if roll < 0.45:
                            reply = await request(
                                "send",
                                thread_id=thread_id,
                                content=f"soak {uuid.uuid4().hex}",
                                client_msg_id=uuid.uuid4().hex,
                                reply=rng.random() < 0.3,
                            )
                            timed("ws_send", since)
                            if reply["ok"]:
                                last = reply["data"]
                            else:
                                samples.errors["send:" + reply["error"]["code"]] += 1
                        elif roll < 0.65 and last is not None:
                            reply = await request(
                                "edit",
                                message_id=last["id"],
                                content="edited " + uuid.uuid4().hex,
                                expected_version=last["version"],
                            )
                            timed("ws_edit", since)
                            if reply["ok"]:
                                last = reply["data"]
                            else:
                                samples.errors["edit:" + reply["error"]["code"]] += 1
                        elif roll < 0.9:
                            r = await http.get(
                                f"/api/v1/threads/{thread_id}/messages", params={"limit": 50}
                            )
                            timed("rest_page", since)
                            if r.status_code != 200:
                                samples.errors[f"page:{r.status_code}"] += 1
                        else:
                            await request("ping")
                            timed("ws_ping", since)
                        await trio.sleep(rng.uniform(0.05, 0.3))  # a person's pace
            except Exception as exc:  # counted; the soak goes on
                samples.errors[type(exc).__name__] += 1
            await trio.sleep(rng.uniform(0, 0.5))  # then reconnect: connection churn
    samples.client_exits.append(round(time.monotonic() - started, 1))


def _setup(base: str, clients: int) -> list[tuple[str, str]]:
    """Users and threads: two clients per thread (so events fan out)."""
    pairs = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for i in range((clients + 1) // 2):
            account = {"email": f"soak-{i}-{uuid.uuid4().hex[:6]}@example.com",
                       "password": "a long soak password"}  # fmt: skip
            http.post("/api/v1/auth/register", json=account).raise_for_status()
            token = http.post("/api/v1/auth/login", json=account).json()["access_token"]
            http.cookies.clear()
            headers = {"Authorization": f"Bearer {token}"}
            project = http.post("/api/v1/projects", json={"name": "soak"}, headers=headers)
            thread = http.post(
                f"/api/v1/projects/{project.json()['id']}/threads",
                json={"title": "soak"},
                headers=headers,
            ).json()
            pairs += [(token, thread["id"])] * 2
    return pairs[:clients]


def _window(rows: list[dict[str, float]], key: str, start: float, end: float) -> float:
    values = [r[key] for r in rows if start <= r["t"] < end]
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    return harness.percentile(sorted(values), 99) * 1000 if values else float("nan")


def evaluate(samples: Samples, args: argparse.Namespace, after: dict[str, float]) -> dict[str, Any]:
    rows, warm = samples.rows, args.warmup_s
    end = args.minutes * 60
    figures: dict[str, Any] = {
        "ops": samples.ops,
        "errors": dict(samples.errors),
        "client_exits_s": sorted(samples.client_exits),
        "sampled_until_s": round(rows[-1]["t"], 1) if rows else 0,
        "checks": {},
    }
    for key in ("rss_mb", "fds", "ws", "actors"):
        first = _window(rows, key, warm, warm + 60)
        last = _window(rows, key, end - 60, end)
        figures[key] = {"post_warmup": round(first, 1), "end": round(last, 1)}
    rss = figures["rss_mb"]
    figures["checks"]["rss_within_10pct"] = rss["end"] <= rss["post_warmup"] * 1.10
    figures["checks"]["fds_no_growth"] = figures["fds"]["end"] <= figures["fds"]["post_warmup"] + 5
    for key in ("ws", "actors"):
        f = figures[key]
        figures["checks"][f"{key}_no_growth"] = f["end"] <= f["post_warmup"] * 1.10 + 2
    first_minute = int(warm // 60) + (1 if warm % 60 else 0)
    last_minute = args.minutes - 1
    figures["p99_ms"] = {}
    for op in ("ws_send", "ws_edit", "rest_page", "ws_ping"):
        a = _p99(samples.latency.get((first_minute, op), []))
        b = _p99(samples.latency.get((last_minute, op), []))
        figures["p99_ms"][op] = {"first": round(a, 1), "last": round(b, 1)}
        figures["checks"][f"{op}_p99_stable"] = not b > a * 2 + 50
    figures["after_load"] = after
    figures["checks"]["ws_back_to_0"] = after["ws"] == 0
    figures["checks"]["pool_at_rest"] = after["pool_in_use"] == 0
    return figures


async def soak(base: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    pairs = await trio.to_thread.run_sync(_setup, base, args.clients)
    samples = Samples()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler, base, pid, samples, started, args.sample_s)
        async with trio.open_nursery() as clients:
            for token, thread_id in pairs:
                clients.start_soon(client, base, token, thread_id, samples, started, deadline)
        # The load has stopped: the server should come back to rest.
        with trio.move_on_after(30):
            while True:
                await trio.sleep(args.sample_s)
                last = samples.rows[-1]
                if last["ws"] == 0 and last["pool_in_use"] == 0:
                    break
        nursery.cancel_scope.cancel()
    after = {k: samples.rows[-1][k] for k in ("ws", "pool_in_use", "actors", "fds", "rss_mb")}
    figures = evaluate(samples, args, after)
    figures["rows"] = samples.rows
    return figures


@contextlib.contextmanager
def process(
    argv: list[str], env: dict[str, str], ready: str, log: Path
) -> Iterator[tuple[int, str]]:
    """A ``python argv`` subprocess whose output goes to ``log`` (read, so it never blocks)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv], env=env, cwd=harness.ROOT, stdout=out, stderr=out, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                line = next((x for x in log.read_text().splitlines() if x.startswith(ready)), None)
                if line is not None:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{argv} did not start; see {log}")
                time.sleep(0.1)
            yield proc.pid, line.rsplit(" ", 1)[1].strip()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("loadtests/out/soak.json"))
    parser.add_argument(
        "--heap-profile",
        type=Path,
        help="run the server under loadtests/heapwatch.py, its samples in this directory",
    )
    args = parser.parse_args()
    _pong_only_while_open()
    harness.raise_nofile_limit()
    env = harness.bench_env(THREADLINE_THREAD_IDLE_TIMEOUT_S="10", THREADLINE_LLM_MODEL="fake-gpt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.with_suffix("")
    with (
        process(
            ["-m", "server.cli", "fake-llm", "--port", str(harness.free_port())],
            env,
            "fake-llm: serving on",
            Path(f"{logs}.fake-llm.log"),
        ) as (_, llm_url),
        harness.database() as dsn,
    ):
        httpx.post(llm_url.removesuffix("/v1") + "/control",
                   json={"tokens": 20, "delay_per_token_ms": 5}).raise_for_status()  # fmt: skip
        server_env = {
            **env,
            "THREADLINE_DATABASE_URL": dsn,
            "THREADLINE_DATA_DIR": tempfile.mkdtemp(prefix="tl-soak-"),
            "THREADLINE_LLM_BASE_URL": llm_url,
        }
        serve = ["-m", "server.cli", "serve", "--port", str(harness.free_port())]
        if args.heap_profile:
            every = str(max(args.sample_s, 30.0))
            serve = ["loadtests/heapwatch.py", "--out", str(args.heap_profile), "--every", every,
                     "--baseline-s", str(args.warmup_s), "--", *serve[2:]]  # fmt: skip
        with process(serve, server_env, "threadline: serving on", Path(f"{logs}.server.log")) as (
            pid,
            base,
        ):
            figures = trio.run(soak, base, pid, args)
            if args.heap_profile:  # one more sample, after malloc_trim: what the allocator kept
                os.kill(pid, signal.SIGUSR2)
                time.sleep(max(args.sample_s, 30.0) + 5)
    figures["minutes"] = args.minutes
    figures["clients"] = args.clients
    args.out.write_text(json.dumps(figures, indent=2))
    args.out.with_suffix(".rows.json").write_text(json.dumps(figures.pop("rows", [])))
    print(json.dumps(figures, indent=2))
    failed = [name for name, ok in figures["checks"].items() if not ok]
    print("soak:", "FAILED " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
