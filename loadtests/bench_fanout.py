"""Fan-out benchmark: N WebSocket subscribers on one thread, a publisher at a set rate.

Runs ``threadline serve`` as a subprocess (embedded PostgreSQL in a temporary data dir unless
``--database-url`` is given), then in one run:

1. N subscribers, a publisher posting messages over REST at ``--rate`` per second for
   ``--seconds``: delivered events/s and p50/p99 delivery latency (publish request sent ->
   event received by the client; the server's own commit -> frame-written histogram is printed
   too);
2. the same with one extra subscriber that never reads (a stalled client): the figures for the
   N others, and how the stalled one was closed;
3. the server's RSS per idle subscribed connection with ``--idle`` (default 1,000) open.

    .venv/bin/python loadtests/bench_fanout.py --subscribers 100 --rate 50 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WSRequest


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    received: int = 0
    gaps: int = 0
    closed: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, data_dir: str, database_url: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_DATA_DIR=data_dir,
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_RATE_LIMIT_PER_S="1000000",
        THREADLINE_RATE_LIMIT_BURST="1000000",
        THREADLINE_IP_RATE_LIMIT_PER_S="1000000",
        THREADLINE_IP_RATE_LIMIT_BURST="1000000",
        THREADLINE_DB_POOL_MAX="20",
        # A smaller outbound queue than the default 256, so the stalled client (30 KB frames)
        # reaches its verdict within a short run; the figures for the others are unaffected.
        THREADLINE_WS_OUTBOUND_QUEUE=os.environ.get("BENCH_WS_OUTBOUND_QUEUE", "64"),
    )
    if database_url:
        env["THREADLINE_DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        # BENCH_PYTHON_ARGS="-m cProfile -o /tmp/server.prof" profiles the server.
        [
            sys.executable,
            *os.environ.get("BENCH_PYTHON_ARGS", "").split(),
            "-m",
            "server.cli",
            "serve",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"threadline: serving on"):
        raise SystemExit(f"server did not start: {line!r}")
    return proc


async def setup(base: str) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        creds = {
            "email": f"bench-{uuid.uuid4().hex[:10]}@example.com",
            "password": "bench passphrase 1",
        }
        (await http.post("/api/v1/auth/register", json=creds)).raise_for_status()
        token = (await http.post("/api/v1/auth/login", json=creds)).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        project = (await http.post("/api/v1/projects", json={"name": "bench"}, headers=auth)).json()
        thread = (
            await http.post(
                f"/api/v1/projects/{project['id']}/threads", json={"title": "b"}, headers=auth
            )
        ).json()
        return token, thread["id"]


async def subscriber(
    url: str,
    token: str,
    thread_id: str,
    stats: Stats,
    expected: trio.Event,
    total: list[int],
    task_status: trio.TaskStatus[None],
) -> None:
    async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {token}")]) as ws:
        await ws.send_message(json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id}))
        reply = json.loads(await ws.get_message())
        assert reply["ok"], reply
        last = reply["data"]["last_seq"]
        task_status.started()
        try:
            while True:
                frame = json.loads(await ws.get_message())
                now = time.time()
                if frame.get("type") != "message.created":
                    continue
                if frame["seq"] != last + 1:
                    stats.gaps += 1
                last = frame["seq"]
                stats.received += 1
                stats.latencies.append(now - float(frame["data"]["content"]))
                total[0] -= 1
                if total[0] == 0:
                    expected.set()
        except ConnectionClosed as exc:
            stats.closed.append(exc.reason.code)


async def stalled(
    port: int, token: str, thread_id: str, task_status: trio.TaskStatus[None]
) -> None:
    """A client with a tiny receive buffer that subscribes and then never reads again."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning to 32 MiB
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    request = WSRequest(
        host=f"127.0.0.1:{port}",
        target="/ws",
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
    )
    await stream.send_all(ws.send(request))
    accepted = False
    while not accepted:
        ws.receive_data(await stream.receive_some(65536))
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    frame = json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id})
    await stream.send_all(ws.send(TextMessage(data=frame)))
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        await stream.aclose()


async def publisher(
    base: str, token: str, thread_id: str, rate: float, seconds: float, pad: int
) -> int:
    sent = 0
    async with httpx.AsyncClient(
        base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            body = {
                "content": f"{time.time():.6f}",
                "client_msg_id": uuid.uuid4().hex,
                "reply": False,
            }
            if pad:
                body["content"] = body["content"].ljust(pad)
            (await http.post(f"/api/v1/threads/{thread_id}/messages", json=body)).raise_for_status()
            sent += 1
            next_at = start + sent / rate
            await trio.sleep_until(max(next_at, trio.current_time()))
    return sent


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def phase(
    port: int,
    base: str,
    url: str,
    token: str,
    thread_id: str,
    n: int,
    rate: float,
    seconds: float,
    pad: int,
    with_stalled: bool,
) -> dict[str, Any]:
    stats = Stats()
    expected = trio.Event()
    async with trio.open_nursery() as nursery:
        total = [0]
        for _ in range(n):
            await nursery.start(subscriber, url, token, thread_id, stats, expected, total)
        if with_stalled:
            await nursery.start(stalled, port, token, thread_id)
        start = time.monotonic()
        scraped = await delivery_buckets(base)
        sent = await publisher(base, token, thread_id, rate, seconds, pad)
        total[0] += sent * n
        if total[0] > 0:
            with trio.move_on_after(30):
                await expected.wait()
        elapsed = time.monotonic() - start
        server_side = bucket_quantiles(scraped, await delivery_buckets(base))
        nursery.cancel_scope.cancel()
    return {
        "subscribers": n,
        "stalled_client": with_stalled,
        "published": sent,
        "delivered": stats.received,
        "expected": sent * n,
        "gaps": stats.gaps,
        "delivered_per_s": round(stats.received / elapsed, 1),
        "p50_ms": round(pct(stats.latencies, 0.50) * 1000, 2),
        "p99_ms": round(pct(stats.latencies, 0.99) * 1000, 2),
        "max_ms": round(max(stats.latencies, default=float("nan")) * 1000, 2),
        "server_commit_to_written": server_side,
    }


async def delivery_buckets(base: str) -> list[tuple[float, float]]:
    """The server's commit -> frame-written histogram: cumulative (le, count) pairs."""
    async with httpx.AsyncClient(base_url=base) as http:
        text = (await http.get("/metrics")).text
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("threadline_event_delivery_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            value = float(line.rsplit(" ", 1)[1])
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    return buckets


def bucket_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> dict[str, float]:
    """Upper bounds (ms) of the buckets holding p50 and p99 of the frames between two scrapes."""
    diff = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = diff[-1][1] if diff else 0.0
    result: dict[str, float] = {"frames": total}
    for q in (0.5, 0.99):
        for le, count in diff:
            if total and count >= q * total:
                result[f"p{int(q * 100)}_le_ms"] = le * 1000
                break
    return result


async def rss_per_connection(
    base: str, url: str, token: str, thread_id: str, pid: int, idle: int
) -> dict[str, Any]:
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        count = [0]

        async def hold(task_status: trio.TaskStatus[None]) -> None:
            async with open_websocket_url(
                url, extra_headers=[("Authorization", f"Bearer {token}")]
            ) as ws:
                await ws.send_message(
                    json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id})
                )
                await ws.get_message()
                task_status.started()
                count[0] += 1
                if count[0] == idle:
                    ready.set()
                await trio.sleep_forever()

        for _ in range(idle):
            await nursery.start(hold)
        await ready.wait()
        await trio.sleep(1.0)  # let the server settle before sampling its memory
        after = proc.memory_info().rss
        nursery.cancel_scope.cancel()
    return {
        "idle_connections": idle,
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "rss_per_connection_kb": round((after - before) / idle / 1024, 1),
    }


async def main_async(args: argparse.Namespace) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/ws"
    with tempfile.TemporaryDirectory() as data_dir:
        proc = start_server(port, data_dir, args.database_url)
        try:
            token, thread_id = await setup(base)
            results = [
                await phase(
                    port,
                    base,
                    url,
                    token,
                    thread_id,
                    args.subscribers,
                    args.rate,
                    args.seconds,
                    args.pad,
                    False,
                ),
                await phase(
                    port,
                    base,
                    url,
                    token,
                    thread_id,
                    args.subscribers,
                    args.rate,
                    args.seconds,
                    args.pad,
                    True,
                ),
            ]
            for result in results:
                print(json.dumps(result))
            if args.idle:
                print(
                    json.dumps(
                        await rss_per_connection(base, url, token, thread_id, proc.pid, args.idle)
                    )
                )
            async with httpx.AsyncClient(base_url=base) as http:
                metrics = (await http.get("/metrics")).text
            disconnects = {
                line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("threadline_ws_disconnects_total{")
            }
            print(json.dumps({"ws_disconnects_by_reason": disconnects}))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="published events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pad", type=int, default=30_000, help="message size in characters")
    parser.add_argument(
        "--idle", type=int, default=1000, help="idle connections for the RSS figure (0: skip)"
    )
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
