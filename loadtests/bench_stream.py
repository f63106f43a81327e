"""Streaming benchmark: M concurrent assistant replies, each watched by K WebSocket clients.

Everything real except the model: the server on loopback, PostgreSQL (embedded in a temporary
directory, or ``THREADLINE_TEST_DATABASE_URL``), trio-websocket clients, and the fake provider
(``threadline fake-llm``, its own process unless ``--fake inline``) streaming ``--tokens`` tokens
``--delay-ms`` apart. One run prints:

* tokens/s delivered: tokens of assistant text received, summed over all watchers, per second;
* frames/s: ``assistant.delta`` frames received, summed over all watchers, per second;
* time to first delta: from the user's send to a watcher's first delta, and the part of it the
  server adds: a watcher's first delta minus the moment the provider sent its first token
  (p50/p99 over all watchers).

The WebSocket clients run in the same process (and on the same core) as the server, so figures
are a lower bound of what the server alone can do. Times are wall-clock (``time.time()``), so
they compare across the server and the provider process.

    .venv/bin/python loadtests/bench_stream.py --replies 50 --watchers 4 --tokens 200 --delay-ms 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_asyncio
from trio_websocket import open_websocket_url

from server import migrate
from server.auth import create_user_with_token
from server.commands.bus import execute
from server.commands.models import CreateProject, CreateThread
from server.config import Settings
from server.llm import tokens
from server.llm.fake_server import open_fake_llm
from server.logs import configure_logging
from server.principal import Principal
from server.runtime import open_server


@dataclass
class Watcher:
    """One WebSocket client watching one thread."""

    thread_id: str
    sends: bool = False  # this watcher also sends its thread's user message
    sent_at: float | None = None
    first_delta_at: float | None = None
    frames: int = 0
    text: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


@contextlib.contextmanager
def database() -> Iterator[str]:
    external = os.environ.get("THREADLINE_TEST_DATABASE_URL")
    if external:
        migrate.upgrade(external)
        yield external
        return
    from server.embedded_pg import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        os.chmod(tmp, 0o777)
        with embedded_postgres(Path(tmp)) as dsn:
            migrate.upgrade(dsn)
            yield dsn


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def watch(
    url: str, token: str, watcher: Watcher, ready: trio.Event, sends: trio.MemorySendChannel[Any]
) -> None:
    headers = [("Authorization", f"Bearer {token}")]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(
            json.dumps({"op": "subscribe", "ref": "s", "thread_id": watcher.thread_id})
        )
        while True:
            frame = json.loads(await ws.get_message())
            if frame["op"] == "reply":
                assert frame["ok"], frame
                break
        async with sends:
            pass
        await ready.wait()
        if watcher.sends:
            watcher.sent_at = time.time()
            await ws.send_message(
                json.dumps(
                    {
                        "op": "send",
                        "ref": "m",
                        "thread_id": watcher.thread_id,
                        "content": f"bench {watcher.thread_id}",
                        "client_msg_id": uuid.uuid4().hex,
                    }
                )
            )
        while True:
            frame = json.loads(await ws.get_message())
            if frame["op"] != "event":
                continue
            if frame["type"] == "assistant.delta":
                if watcher.first_delta_at is None:
                    watcher.first_delta_at = time.time()
                watcher.frames += 1
                watcher.text.append(frame["data"]["text"])
            elif frame["type"] in ("assistant.completed", "assistant.failed"):
                watcher.done.set()
                return


async def bench(dsn: str, args: argparse.Namespace, provider_url: str | None) -> dict[str, Any]:
    """Run one benchmark; with ``provider_url`` None the fake provider runs in this process."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(trio_asyncio.open_loop())
        if provider_url is None:
            fake = await stack.enter_async_context(open_fake_llm())
            fake.configure(tokens=args.tokens, delay_per_token_ms=args.delay_ms)
            provider_url = fake.url
            first_token_times = fake.first_token_unix
        settings = Settings(
            env="test",
            data_dir=Path(tempfile.gettempdir()) / "tl-bench-data",
            jwt_secret="bench-" + uuid.uuid4().hex,
            llm_base_url=provider_url,
            llm_model="fake-gpt",
            llm_max_reply_tokens=max(args.tokens, 16),
            db_pool_min=2,
            db_pool_max=20,
            rate_limit_per_s=1e6,
            rate_limit_burst=1_000_000,
            ip_rate_limit_per_s=1e6,
            ip_rate_limit_burst=1_000_000,
            ws_outbound_queue=4096,
            log_format="json",
            log_level="warning",
        )
        async with open_server(settings, dsn, bind="127.0.0.1:0") as running:
            services = running.services
            user, token = await create_user_with_token(services)
            principal = Principal(
                user_id=user.id,
                email=user.email,
                jti=uuid.uuid4().hex,
                expires_at=2e9,
                via="bearer",
            )
            project = await execute(services, principal, CreateProject(name="bench"))
            assert project.data is not None
            thread_ids = []
            for i in range(args.replies):
                thread = await execute(
                    services,
                    principal,
                    CreateThread(project_id=str(project.data["id"]), title=f"bench {i}"),
                )
                assert thread.data is not None
                thread_ids.append(str(thread.data["id"]))
            url = running.url.replace("http://", "ws://") + "/ws"
            watchers = [Watcher(t, sends=k == 0) for t in thread_ids for k in range(args.watchers)]
            ready = trio.Event()
            async with trio.open_nursery() as nursery:
                subscribed_send, subscribed = trio.open_memory_channel[Any](0)
                async with subscribed_send:
                    for w in watchers:
                        nursery.start_soon(watch, url, token, w, ready, subscribed_send.clone())
                async for _ in subscribed:
                    pass  # every watcher closed its clone: all are subscribed
                ready.set()  # every thread's first watcher sends now, all at once
                start = time.time()
                cpu_start = time.process_time()
                with trio.fail_after(args.timeout):
                    for w in watchers:
                        await w.done.wait()
                end = time.time()
                cpu = time.process_time() - cpu_start
        if args.fake == "process":
            async with httpx.AsyncClient() as http:
                stats = (await http.get(provider_url.removesuffix("/v1") + "/control/stats")).json()
            first_token_times = stats["first_token_at_unix"]
    wall = end - start
    delivered = sum(tokens.count_text("".join(w.text)) for w in watchers)
    frames = sum(w.frames for w in watchers)
    sent_at = {w.thread_id: w.sent_at for w in watchers if w.sent_at is not None}
    ttfd = [w.first_delta_at - sent_at[w.thread_id] for w in watchers if w.first_delta_at]
    to_provider = [
        first_token_times[f"bench {t}"] - sent
        for t, sent in sent_at.items()
        if f"bench {t}" in first_token_times
    ]
    overhead = [
        w.first_delta_at - first_token_times[f"bench {w.thread_id}"]
        for w in watchers
        if w.first_delta_at and f"bench {w.thread_id}" in first_token_times
    ]
    complete = sum(1 for w in watchers if len("".join(w.text).split()) == args.tokens)
    return {
        "replies": args.replies,
        "watchers_per_reply": args.watchers,
        "tokens_per_reply": args.tokens,
        "provider_delay_ms_per_token": args.delay_ms,
        "wall_s": round(wall, 3),
        "process_cpu_s": round(cpu, 3),
        "watchers_with_full_text": f"{complete}/{len(watchers)}",
        "tokens_delivered_per_s": round(delivered / wall, 1),
        "frames_per_s": round(frames / wall, 1),
        "frames_per_reply_per_watcher": round(frames / len(watchers), 1),
        "ttfd_from_send_ms": {
            "p50": round(statistics.median(ttfd) * 1000, 2),
            "p99": round(percentile(ttfd, 99) * 1000, 2),
        },
        "send_to_provider_first_token_ms": {
            "p50": round(statistics.median(to_provider) * 1000, 2),
            "p99": round(percentile(to_provider, 99) * 1000, 2),
        },
        "ttfd_overhead_added_by_server_ms": {
            "p50": round(statistics.median(overhead) * 1000, 2),
            "p99": round(percentile(overhead, 99) * 1000, 2),
        },
    }


@contextlib.contextmanager
def provider_process(args: argparse.Namespace) -> Iterator[str | None]:
    """``threadline fake-llm`` as its own process (``--fake process``), configured for the run."""
    if args.fake != "process":
        yield None
        return
    exe = Path(sys.executable).parent / "threadline"
    proc = subprocess.Popen(
        [str(exe), "fake-llm", "--port", "0"],
        stdout=subprocess.PIPE,
        env={**os.environ, "THREADLINE_LOG_LEVEL": "warning"},
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        httpx.post(
            url.removesuffix("/v1") + "/control",
            json={"tokens": args.tokens, "delay_per_token_ms": args.delay_ms},
        ).raise_for_status()
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=50, help="M concurrent replies")
    parser.add_argument("--watchers", type=int, default=4, help="K watchers per reply")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="provider delay per token")
    parser.add_argument(
        "--fake",
        choices=["process", "inline"],
        default="process",
        help="run the fake provider as its own process (default) or inside this one",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    configure_logging("json", "warning")
    with database() as dsn, provider_process(args) as url:
        result = trio.run(bench, dsn, args, url)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
