"""``make loadtest``: fake LLM + server on a fresh embedded database, then locust, headless.

Starts ``threadline fake-llm`` and ``threadline serve`` as subprocesses (a temporary data dir,
free loopback ports, the server's LLM pointed at the fake), waits until ``/readyz`` is 200, runs
``locust`` headless against it and writes ``<out>/threadline_stats.csv`` (and the other CSVs) and
``<out>/report.html``, then stops everything with SIGTERM. Traffic only goes to 127.0.0.1.

Exit status: locust's (non-zero when any request failed), or 2 when the stack did not start.

    python loadtests/run_locust.py --users 20 --spawn-rate 5 --run-time 20s
    python loadtests/run_locust.py --user-classes RestUser   # REST only
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}


@contextmanager
def process(
    argv: list[str], env: dict[str, str], ready_prefix: str, log_path: Path
) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` until the block ends; wait for its ``ready_prefix`` line on stdout."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + START_TIMEOUT_S
            for line in proc.stdout:
                if line.startswith(ready_prefix):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[2]} did not start in {START_TIMEOUT_S}s")
            else:
                raise RuntimeError(f"{argv[2]} exited with {proc.wait()}; see {log_path}")
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/readyz never answered 200")
        time.sleep(0.2)


def server_env(data_dir: Path, llm_url: str, args: argparse.Namespace) -> dict[str, str]:
    """The server's configuration for a load test (documented in docs/operations.md)."""
    env = _clean_env()
    env.update(
        THREADLINE_DATA_DIR=str(data_dir),
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LLM_BASE_URL=llm_url,
        THREADLINE_LLM_API_KEY="load-test-key",
        THREADLINE_LLM_MODEL="fake-gpt",
        # Every simulated user comes from 127.0.0.1: per-IP limits would throttle the test
        # itself. Per-user limits stay on.
        THREADLINE_IP_RATE_LIMIT_PER_S="100000",
        THREADLINE_IP_RATE_LIMIT_BURST="100000",
        THREADLINE_DB_POOL_MAX=str(args.db_pool_max),
    )
    if args.cheap_passwords:
        # Argon2 at its production cost makes sign-up dominate a short run; measure it separately.
        env.update(
            THREADLINE_ARGON2_TIME_COST="1",
            THREADLINE_ARGON2_MEMORY_KIB="1024",
            THREADLINE_ARGON2_PARALLELISM="1",
        )
    return env


def summarise(prefix: Path) -> str:
    """A short table of locust's stats CSV."""
    rows = list(csv.DictReader((prefix.parent / (prefix.name + "_stats.csv")).open()))
    lines = [f"{'type':5} {'name':40} {'reqs':>6} {'fails':>6} {'p50':>7} {'p95':>7} {'max':>7}"]
    for row in rows:
        lines.append(
            f"{row['Type'][:5]:5} {row['Name'][:40]:40} {row['Request Count']:>6} "
            f"{row['Failure Count']:>6} {row['50%']:>7} {row['95%']:>7} "
            f"{float(row['Max Response Time']):>7.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", "-u", type=int, default=20)
    parser.add_argument("--spawn-rate", "-r", type=float, default=5)
    parser.add_argument("--run-time", "-t", default="20s")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument(
        "--user-classes", nargs="*", default=[], help="e.g. RestUser ChatUser (default: all)"
    )
    parser.add_argument("--token-delay-ms", type=float, default=10.0, help="fake LLM pacing")
    parser.add_argument("--reply-tokens", type=int, default=20)
    parser.add_argument("--db-pool-max", type=int, default=20)
    parser.add_argument(
        "--production-argon2",
        dest="cheap_passwords",
        action="store_false",
        help="hash passwords at production cost (sign-ups get slow)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "threadline"
    threadline = [sys.executable, "-m", "server.cli"]

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="threadline-load-")))
        llm_port, port = free_port(), free_port()
        try:
            stack.enter_context(
                process(
                    [*threadline, "fake-llm", "--port", str(llm_port)],
                    _clean_env(),
                    "fake-llm: serving on",
                    args.out / "fake-llm.log",
                )
            )
            llm_base = f"http://127.0.0.1:{llm_port}"
            httpx.post(
                llm_base + "/control",
                json={
                    "delay_per_token_ms": args.token_delay_ms,
                    "tokens": args.reply_tokens,
                },
                timeout=5,
            ).raise_for_status()
            stack.enter_context(
                process(
                    [*threadline, "serve", "--port", str(port)],
                    server_env(tmp / "data", llm_base + "/v1", args),
                    "threadline: serving on",
                    args.out / "server.log",
                )
            )
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"run_locust: the stack did not start: {exc}", file=sys.stderr)
            return 2
        print(f"run_locust: server {url}, fake LLM {llm_base}; locust for {args.run_time}")
        locust = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(HERE / "locustfile.py"),
                "--headless",
                "--host",
                url,
                "-u",
                str(args.users),
                "-r",
                str(args.spawn_rate),
                "-t",
                args.run_time,
                "--stop-timeout",
                "10",
                "--csv",
                str(prefix),
                "--html",
                str(args.out / "report.html"),
                "--only-summary",
                "--loglevel",
                "WARNING",
                *args.user_classes,
            ],
            env=_clean_env(),
            cwd=ROOT,
            check=False,
        )
        metrics = httpx.get(url + "/metrics", timeout=5)
        (args.out / "metrics.txt").write_text(metrics.text)
    print(summarise(prefix))
    print(f"run_locust: CSV and HTML in {args.out}; locust exited {locust.returncode}")
    return locust.returncode


if __name__ == "__main__":
    sys.exit(main())
