"""Streaming benchmark: M concurrent assistant replies, each watched by K WebSocket clients.

Everything real except the model: the server on loopback (``threadline serve`` as its own
process unless ``--server inline``), PostgreSQL (embedded in a temporary directory, or
``THREADLINE_TEST_DATABASE_URL``), trio-websocket clients, and the fake provider
(``threadline fake-llm``, its own process unless ``--fake inline``) streaming ``--tokens`` tokens
``--delay-ms`` apart. All M user messages are sent at once (one per thread, each on its own
watcher's connection). One run prints:

* tokens/s delivered: tokens of assistant text received, summed over all watchers, per second;
* frames/s: ``assistant.delta`` frames received, summed over all watchers, per second;
* time to first delta: from the user's send to a watcher's first delta; the part before the
  provider sent its first token (command, reply start transaction, HTTP request); and the part
  the server adds after it: a watcher's first delta minus the provider's first token (p50/p99
  over all watchers);
* CPU seconds used by the server process during the run (process mode).

Times are wall-clock (``time.time()``) so they compare across processes.

    .venv/bin/python loadtests/bench_stream.py --replies 50 --watchers 4 --tokens 200 --delay-ms 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
import trio_asyncio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import harness
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
    reply_created_at: float | None = None  # the assistant message's message.created, seen here
    first_delta_at: float | None = None
    frames: int = 0
    text: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class Target:
    """A server ready for the run: where its WebSocket is, a token, the threads to reply in."""

    ws_url: str
    token: str
    thread_ids: list[str]
    server_pid: int | None = None


# -- infrastructure ----------------------------------------------------------------------------


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


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_RATE_LIMIT_PER_S="1000000",
        THREADLINE_RATE_LIMIT_BURST="1000000",
        THREADLINE_IP_RATE_LIMIT_PER_S="1000000",
        THREADLINE_IP_RATE_LIMIT_BURST="1000000",
        THREADLINE_DB_POOL_MAX="20",
        THREADLINE_WS_OUTBOUND_QUEUE="4096",
    )
    return env


@contextlib.contextmanager
def process(
    argv: list[str], env: dict[str, str], ready_prefix: str, cwd: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start a ``threadline`` subcommand; yield it and its URL (from its first line)."""
    proc = subprocess.Popen(
        # BENCH_PYTHON_ARGS="-m cProfile -o /tmp/{cmd}.prof" profiles the processes.
        [
            sys.executable,
            *os.environ.get("BENCH_PYTHON_ARGS", "").replace("{cmd}", argv[0]).split(),
            "-m",
            "server.cli",
            *argv,
        ],
        env=env,
        cwd=cwd,  # another revision's tree runs that revision's code
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(ready_prefix):
            raise SystemExit(f"{argv[0]} did not start: {line!r}")
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the run -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def watch(
    target: Target, watcher: Watcher, ready: trio.Event, subscribed: trio.MemorySendChannel[Any]
) -> None:
    headers = [("Authorization", f"Bearer {target.token}")]
    async with open_websocket_url(target.ws_url, extra_headers=headers) as ws:
        await ws.send_message(
            json.dumps({"op": "subscribe", "ref": "s", "thread_id": watcher.thread_id})
        )
        while True:
            frame = json.loads(await ws.get_message())
            if frame["op"] == "reply":
                assert frame["ok"], frame
                break
        async with subscribed:
            pass
        await ready.wait()
        if watcher.sends:
            watcher.sent_at = time.time()
            send = {
                "op": "send",
                "ref": "m",
                "thread_id": watcher.thread_id,
                "content": f"bench {watcher.thread_id}",
                "client_msg_id": uuid.uuid4().hex,
            }
            await ws.send_message(json.dumps(send))
        while True:
            frame = json.loads(await ws.get_message())
            if frame["op"] != "event":
                continue
            if frame["type"] == "message.created" and frame["data"].get("role") == "assistant":
                watcher.reply_created_at = time.time()
            elif frame["type"] == "assistant.delta":
                if watcher.first_delta_at is None:
                    watcher.first_delta_at = time.time()
                watcher.frames += 1
                watcher.text.append(frame["data"]["text"])
            elif frame["type"] in ("assistant.completed", "assistant.failed"):
                watcher.done.set()
                return


async def run_watchers(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Subscribe every watcher, send all M messages at once, wait for every reply to end."""
    watchers = [Watcher(t, sends=k == 0) for t in target.thread_ids for k in range(args.watchers)]
    server = psutil.Process(target.server_pid) if target.server_pid else None
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        subscribed_send, subscribed = trio.open_memory_channel[Any](0)
        async with subscribed_send:
            for w in watchers:
                nursery.start_soon(watch, target, w, ready, subscribed_send.clone())
        async for _ in subscribed:
            pass  # every watcher closed its clone: all are subscribed
        server_cpu = sum(server.cpu_times()[:2]) if server else 0.0
        start, cpu_start = time.time(), time.process_time()
        ready.set()  # every thread's first watcher sends now
        with trio.fail_after(args.timeout):
            for w in watchers:
                await w.done.wait()
        end, cpu = time.time(), time.process_time() - cpu_start
        if server:
            server_cpu = sum(server.cpu_times()[:2]) - server_cpu
    return {
        "watchers": watchers,
        "start": start,
        "end": end,
        "bench_cpu": cpu,
        "server_cpu": server_cpu if server else None,
    }


async def inline_target(
    stack: contextlib.AsyncExitStack, dsn: str, provider_url: str, args: argparse.Namespace
) -> Target:
    """The server inside this process (``--server inline``), users and threads made directly."""
    await stack.enter_async_context(trio_asyncio.open_loop())
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
    running = await stack.enter_async_context(open_server(settings, dsn, bind="127.0.0.1:0"))
    services = running.services
    user, token = await create_user_with_token(services)
    principal = Principal(
        user_id=user.id, email=user.email, jti=uuid.uuid4().hex, expires_at=2e9, via="bearer"
    )
    project = await execute(services, principal, CreateProject(name="bench"))
    assert project.data is not None
    thread_ids = []
    for i in range(args.replies):
        thread = await execute(
            services, principal, CreateThread(project_id=str(project.data["id"]), title=f"b{i}")
        )
        assert thread.data is not None
        thread_ids.append(str(thread.data["id"]))
    return Target(running.url.replace("http://", "ws://") + "/ws", token, thread_ids)


async def rest_target(
    base: str, args: argparse.Namespace, pid: int, budget_usd: float | None = None
) -> Target:
    """A server process (``--server process``): a user, a project (with a monthly budget when
    ``budget_usd``) and M threads over REST."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        creds = {"email": f"bench-{uuid.uuid4().hex[:10]}@example.com", "password": "bench pw 1!"}
        (await http.post("/api/v1/auth/register", json=creds)).raise_for_status()
        token = (await http.post("/api/v1/auth/login", json=creds)).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        project = (await http.post("/api/v1/projects", json={"name": "bench"}, headers=auth)).json()
        if budget_usd is not None:
            r = await http.patch(
                f"/api/v1/projects/{project['id']}",
                json={"monthly_budget_usd": budget_usd},
                headers=auth,
            )
            r.raise_for_status()
        thread_ids = []
        for i in range(args.replies):
            r = await http.post(
                f"/api/v1/projects/{project['id']}/threads", json={"title": f"b{i}"}, headers=auth
            )
            r.raise_for_status()
            thread_ids.append(r.json()["id"])
    return Target(base.replace("http://", "ws://") + "/ws", token, thread_ids, server_pid=pid)


@contextlib.asynccontextmanager
async def inline_fake(args: argparse.Namespace) -> AsyncIterator[tuple[str, dict[str, float]]]:
    async with open_fake_llm() as fake:
        fake.configure(tokens=args.tokens, delay_per_token_ms=args.delay_ms)
        yield fake.url, fake.first_token_unix


async def bench(dsn: str, args: argparse.Namespace, provider_url: str | None) -> dict[str, Any]:
    """One run with the server in this process; the fake too when ``provider_url`` is None."""
    async with contextlib.AsyncExitStack() as stack:
        first_tokens: dict[str, float] | None = None
        if provider_url is None:
            provider_url, first_tokens = await stack.enter_async_context(inline_fake(args))
        target = await inline_target(stack, dsn, provider_url, args)
        run = await run_watchers(target, args)
    if first_tokens is None:
        first_tokens = await fetch_first_tokens(provider_url)
    return report(run, first_tokens, args)


async def bench_process(
    base: str, pid: int, provider_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One run against a server process (the fake provider is a process too)."""
    target = await rest_target(base, args, pid)
    run = await run_watchers(target, args)
    return report(run, await fetch_first_tokens(provider_url), args)


@dataclass
class ServerUnderTest:
    """A ``threadline serve`` process in a ``--ttft`` comparison."""

    name: str
    base: str
    pid: int


TTFT_KEYS = (
    "ttfd_from_send_ms",
    "send_to_provider_request_ms",
    "send_to_provider_first_token_ms",
    "provider_own_ms",
    "ttfd_overhead_added_by_server_ms",
    "waiting_for_start_commit_ms",
    "server_cpu_ms_per_reply",
    "bench_process_cpu_s",
    "watchers_with_full_text",
)


async def ttft_compare(
    servers: list[ServerUnderTest], provider_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """``--ttft``: time to first delta, every server and case interleaved in one run.

    Cases: a lone reply (``--lone-runs`` of them, one at a time), and ``--at-once`` replies
    requested at once (``--rounds`` times); with ``--budget-compare``, the same again in a
    project with a monthly budget (large enough never to refuse), on every server. Rounds
    alternate the order of the servers (A B, B A, ...), so that the machine's drifts fall on
    all of them alike. Each server first answers ``--warmup`` replies, not measured (a process's
    first reply pays lazy imports and the provider connection).
    """
    lone = argparse.Namespace(**{**vars(args), "replies": 1})
    many = argparse.Namespace(**{**vars(args), "replies": args.at_once})
    cases: list[tuple[str, argparse.Namespace, int, float | None]] = [
        ("lone reply", lone, args.lone_runs, None),
        (f"{args.at_once} at once", many, args.rounds, None),
    ]
    if args.budget_compare:
        cases.append((f"{args.at_once} at once, budgeted project", many, args.rounds, 1e6))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    warm = argparse.Namespace(**{**vars(lone), "replies": args.warmup})
    for s in servers:  # not measured: a process's first reply pays lazy imports, a connect
        if args.warmup:
            await run_watchers(await rest_target(s.base, warm, s.pid), warm)
    for case, sub, count, budget in cases:
        # Every run's threads are made first (REST, password hashing), outside the measurement.
        targets = {
            s.name: await rest_target(
                s.base,
                argparse.Namespace(**{**vars(sub), "replies": sub.replies * count}),
                s.pid,
                budget,
            )
            for s in servers
        }
        for i in range(count):
            order = servers if i % 2 == 0 else servers[::-1]
            for s in order:
                whole = targets[s.name]
                ids = whole.thread_ids[i * sub.replies : (i + 1) * sub.replies]
                target = Target(whole.ws_url, whole.token, ids, s.pid)
                runs.setdefault((s.name, case), []).append(await run_watchers(target, sub))
    first_tokens, requests = await fetch_provider_times(provider_url)
    out: dict[str, Any] = {}
    for (name, case), done in runs.items():
        sub = lone if case == "lone reply" else many
        merged: dict[str, Any] = {
            "watchers": [w for run in done for w in run["watchers"]],
            "start": done[0]["start"],
            "end": done[-1]["end"],
            "bench_cpu": sum(run["bench_cpu"] for run in done),
            "server_cpu": sum(run["server_cpu"] or 0.0 for run in done),
        }
        figures = report(merged, first_tokens, sub, requests)
        figures["server_cpu_ms_per_reply"] = round(
            merged["server_cpu"] * 1000 / (len(done) * sub.replies), 2
        )
        out.setdefault(name, {})[case] = {key: figures[key] for key in TTFT_KEYS}
    now = servers[0].name
    for before in (s.name for s in servers[1:]):
        out[f"ratios (now / {before})"] = {
            case: {
                "ttfd p50": _ratio(out[now][case], out[before][case], "ttfd_from_send_ms", "p50"),
                "ttfd p99": _ratio(out[now][case], out[before][case], "ttfd_from_send_ms", "p99"),
                "server cpu per reply": round(
                    out[now][case]["server_cpu_ms_per_reply"]
                    / max(out[before][case]["server_cpu_ms_per_reply"], 1e-9),
                    2,
                ),
            }
            for case in out[now]
        }
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str, q: str) -> float:
    return round(float(a[key][q]) / max(float(b[key][q]), 1e-9), 2)


async def fetch_first_tokens(provider_url: str) -> dict[str, float]:
    return (await fetch_provider_times(provider_url))[0]


async def fetch_provider_times(provider_url: str) -> tuple[dict[str, float], dict[str, float]]:
    """The fake provider's clock: when each stream's first token left, when its request came."""
    async with httpx.AsyncClient() as http:
        stats = (await http.get(provider_url.removesuffix("/v1") + "/control/stats")).json()
    return dict(stats["first_token_at_unix"]), dict(stats.get("request_at_unix", {}))


def report(
    run: dict[str, Any],
    first_tokens: dict[str, float],
    args: argparse.Namespace,
    requests: dict[str, float] | None = None,
) -> dict[str, Any]:
    watchers: list[Watcher] = run["watchers"]
    wall = run["end"] - run["start"]
    delivered = sum(tokens.count_text("".join(w.text)) for w in watchers)
    frames = sum(w.frames for w in watchers)
    sent_at = {w.thread_id: w.sent_at for w in watchers if w.sent_at is not None}
    ttfd = [w.first_delta_at - sent_at[w.thread_id] for w in watchers if w.first_delta_at]
    to_provider = [
        first_tokens[f"bench {t}"] - sent
        for t, sent in sent_at.items()
        if f"bench {t}" in first_tokens
    ]
    overhead = [
        w.first_delta_at - first_tokens[f"bench {w.thread_id}"]
        for w in watchers
        if w.first_delta_at and f"bench {w.thread_id}" in first_tokens
    ]
    # The server's part before the provider: the send written -> the provider's request read.
    to_request = [
        requests[f"bench {t}"] - sent
        for t, sent in sent_at.items()
        if requests and f"bench {t}" in requests
    ]
    # The provider's own time: its request in -> its first token out (fake-llm's clock).
    provider_own = [
        first_tokens[key] - requests[key]
        for key in (f"bench {t}" for t in sent_at)
        if requests and key in requests and key in first_tokens
    ]
    # Of the time added after the provider's first token, the part before the reply's
    # message.created reached the watcher: the start transaction still committing when the
    # provider's request went out before the COMMIT (a reply started without its send's history;
    # servers before e496760); since a reply asked for by a send is requested after its start
    # has committed, what remains here is message.created's own delivery lag.
    commit_wait = [
        max(0.0, w.reply_created_at - first_tokens[f"bench {w.thread_id}"])
        for w in watchers
        if w.reply_created_at and f"bench {w.thread_id}" in first_tokens
    ]
    complete = sum(1 for w in watchers if len("".join(w.text).split()) == args.tokens)

    def pcts(values: list[float]) -> dict[str, float]:
        if not values:
            return {"p50": float("nan"), "p99": float("nan")}
        return {
            "p50": round(statistics.median(values) * 1000, 2),
            "p99": round(percentile(values, 99) * 1000, 2),
        }

    return {
        "server": args.server,
        "replies": args.replies,
        "watchers_per_reply": args.watchers,
        "tokens_per_reply": args.tokens,
        "provider_delay_ms_per_token": args.delay_ms,
        "wall_s": round(wall, 3),
        "server_cpu_s": None if run["server_cpu"] is None else round(run["server_cpu"], 3),
        "bench_process_cpu_s": round(run["bench_cpu"], 3),
        "watchers_with_full_text": f"{complete}/{len(watchers)}",
        "tokens_delivered_per_s": round(delivered / wall, 1),
        "frames_per_s": round(frames / wall, 1),
        "frames_per_reply_per_watcher": round(frames / len(watchers), 1),
        "ttfd_from_send_ms": pcts(ttfd),
        "send_to_provider_request_ms": pcts(to_request),
        "send_to_provider_first_token_ms": pcts(to_provider),
        "ttfd_overhead_added_by_server_ms": pcts(overhead),
        "provider_own_ms": pcts(provider_own),
        "waiting_for_start_commit_ms": pcts(commit_wait),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=50, help="M concurrent replies")
    parser.add_argument("--watchers", type=int, default=4, help="K watchers per reply")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="provider delay per token")
    parser.add_argument("--server", choices=["process", "inline"], default="process")
    parser.add_argument("--fake", choices=["process", "inline"], default="process")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--ttft",
        action="store_true",
        help="time to first delta: a lone reply (several runs) and 50 at once; 20 tokens, 1 ms",
    )
    parser.add_argument("--lone-runs", type=int, default=20, help="--ttft: lone replies")
    parser.add_argument("--at-once", type=int, default=50, help="--ttft: replies at once")
    parser.add_argument("--rounds", type=int, default=2, help="--ttft: runs of --at-once")
    parser.add_argument(
        "--warmup", type=int, default=1, help="--ttft: replies per server before measuring"
    )
    parser.add_argument(
        "--budget-compare",
        action="store_true",
        help="--ttft: also run --at-once in a project with a monthly budget",
    )
    parser.add_argument(
        "--before",
        action="append",
        default=[],
        help="also run this git revision's server, same clients (repeatable: --ttft compares all)",
    )
    args = parser.parse_args()
    if args.ttft:
        args.server, args.tokens, args.delay_ms = "process", 20, 1.0
    if args.server == "process":
        args.fake = "process"
    configure_logging("json", "warning")
    env = _bench_env()
    with contextlib.ExitStack() as stack:
        provider_url: str | None = None
        if args.fake == "process":
            _, provider_url = stack.enter_context(
                process(["fake-llm", "--port", "0"], env, "fake-llm: serving on")
            )
            httpx.post(
                provider_url.removesuffix("/v1") + "/control",
                json={"tokens": args.tokens, "delay_per_token_ms": args.delay_ms},
            ).raise_for_status()
        if args.server == "inline":
            dsn = stack.enter_context(database())
            result = trio.run(bench, dsn, args, provider_url)
        else:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tl-bench-"))
            os.chmod(data_dir, 0o777)
            assert provider_url is not None
            server_env = {
                **env,
                "THREADLINE_DATA_DIR": data_dir,
                "THREADLINE_LLM_BASE_URL": provider_url,
                "THREADLINE_LLM_MODEL": "fake-gpt",
                "THREADLINE_LLM_MAX_REPLY_TOKENS": str(max(args.tokens, 16)),
            }
            if os.environ.get("THREADLINE_TEST_DATABASE_URL"):
                server_env["THREADLINE_DATABASE_URL"] = os.environ["THREADLINE_TEST_DATABASE_URL"]
            proc, base = stack.enter_context(
                process(["serve", "--port", str(free_port())], server_env, "threadline: serving on")
            )
            servers = [ServerUnderTest("now", base, proc.pid)]
            for rev in args.before:
                tree = stack.enter_context(harness.revision_tree(rev))
                before_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tl-b-"))
                os.chmod(before_dir, 0o777)
                proc, base = stack.enter_context(
                    process(
                        ["serve", "--port", str(free_port())],
                        {**server_env, "THREADLINE_DATA_DIR": before_dir},
                        "threadline: serving on",
                        cwd=tree,
                    )
                )
                servers.append(ServerUnderTest(f"before ({rev})", base, proc.pid))
            if args.ttft:  # both servers alive at once, their runs interleaved
                result = trio.run(ttft_compare, servers, provider_url, args)
            else:
                result = {
                    s.name: trio.run(bench_process, s.base, s.pid, provider_url, args)
                    for s in servers
                }
                if len(servers) == 1:
                    result = result["now"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
