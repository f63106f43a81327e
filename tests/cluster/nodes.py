"""Real ``threadline serve`` processes sharing one embedded PostgreSQL (one data directory).

Each node is started as a user would start it (``python -m server.cli serve``), with its own
port, node id and log file; the fake LLM runs as a process too (``threadline fake-llm``), so
every provider call of every node is counted in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.ops import pgcontrol

_START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One ``threadline serve`` process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    signalled: bool = False  # SIGTERM sent: a second one would kill it, not drain it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def logs(self, after: int = 0) -> list[dict[str, Any]]:
        """The node's JSON log lines so far (those written after byte ``after``, if given)."""
        lines = []
        with self.log_path.open("rb") as f:
            f.seek(after)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
        return lines

    def log_size(self) -> int:
        """Where the log ends now: pass it to ``logs`` or ``wait_for_logs`` as ``after``."""
        return self.log_path.stat().st_size

    async def wait_for_logs(
        self, *events: str, after: int = 0, timeout_s: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait until each of ``events`` is in the node's log after byte ``after``; those lines.

        The node writes its log as things happen, in another process: a line about something
        whose effect the test has already seen may come a little later (the events of a lost
        connection can arrive by reconciliation before the broker has logged the loss and the
        reconnection). A file growing in another process has no event to wait on here: polled,
        bounded.
        """
        with trio.fail_after(timeout_s):
            while True:
                lines = self.logs(after)
                if set(events) <= {line.get("event") for line in lines}:
                    return lines
                await trio.sleep(0.05)  # poll interval

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM, once: the node drains and exits."""
        if self.alive() and not self.signalled:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)


def node_env(data_dir: Path, name: str, llm_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_DATA_DIR=str(data_dir),
        THREADLINE_NODE_ID=name,
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_ENV="test",
        THREADLINE_LLM_BASE_URL=llm_url,
        THREADLINE_LLM_API_KEY="sk-cluster-test",
        THREADLINE_LLM_MODEL="fake-gpt",
        THREADLINE_LLM_PRICES='{"fake-gpt": {"prompt_per_1k": 0.001, "completion_per_1k": 0.002}}',
        THREADLINE_ARGON2_TIME_COST="1",
        THREADLINE_ARGON2_MEMORY_KIB="8",
        THREADLINE_ARGON2_PARALLELISM="1",
        THREADLINE_DB_POOL_MIN="1",
        THREADLINE_DB_POOL_MAX="6",
    )
    env.update(extra)
    return env


def start_node(data_dir: Path, name: str, llm_url: str, log_dir: Path, **extra: str) -> Node:
    """Start a node (not waiting for it: see ``wait_ready``)."""
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = node_env(data_dir, name, llm_url, **extra)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    return Node(name, port, proc, log_path, env)


def wait_ready(node: Node, timeout_s: float = _START_TIMEOUT_S) -> dict[str, Any]:
    """Poll ``/readyz`` until 200 (bounded); fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.alive():
            raise AssertionError(
                f"{node.name} exited with {node.proc.returncode}:\n{node.log_path.read_text()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(node.url + "/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()  # type: ignore[no-any-return]
        time.sleep(0.1)  # poll interval
    raise AssertionError(f"{node.name} not ready within {timeout_s}s:\n{node.log_path.read_text()}")


def wait_converged(nodes: list[Node], timeout_s: float = _START_TIMEOUT_S) -> None:
    """Poll each node's ``/readyz`` until it counts all of ``nodes`` live (bounded).

    A node learns of the nodes that joined after it at its next heartbeat; until then its
    rate limiter's fair shares are larger (``burst / nodes it knows of``).
    """
    deadline = time.monotonic() + timeout_s
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(pending[0].url + "/readyz", timeout=2)
            if response.json()["checks"]["cluster"]["live"] >= len(nodes):
                pending.pop(0)
                continue
        time.sleep(0.1)  # poll interval
    if pending:
        raise AssertionError(f"{pending[0].name} did not see all {len(nodes)} nodes in time")


def stop_node(node: Node, timeout_s: float = 30.0) -> int:
    """SIGTERM (once), then wait; SIGKILL if it does not stop in time. Returns the exit status."""
    node.terminate()
    try:
        return node.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()
        raise


def kill_node(node: Node) -> None:
    """SIGKILL: no shutdown hook runs, nothing is saved, the node's row stays behind."""
    node.proc.kill()
    node.proc.wait()


@dataclass
class FakeLLMProcess:
    proc: subprocess.Popen[bytes]
    url: str  # the /v1 base URL

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def control(self, **changes: Any) -> None:
        httpx.post(self.root + "/control", json=changes, timeout=5).raise_for_status()

    def requests(self) -> int:
        stats = httpx.get(self.root + "/control/stats", timeout=5).json()
        return int(stats["requests"])


@contextlib.contextmanager
def fake_llm_process(log_dir: Path) -> Iterator[FakeLLMProcess]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    with (log_dir / "fake-llm.log").open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "fake-llm", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    fake = FakeLLMProcess(proc, f"http://127.0.0.1:{port}/v1")
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(fake.root + "/control/stats", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("fake-llm did not start")
            time.sleep(0.1)  # poll interval
        yield fake
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop the data dir's PostgreSQL if a node killed with SIGKILL left it running."""
    pgdata = data_dir.resolve() / "pgdata"
    if (pgdata / "postmaster.pid").exists() and pgcontrol.is_running(pgdata):
        pgcontrol.stop(pgdata)


def pg_dsn(data_dir: Path) -> str:
    """The DSN of the data dir's running embedded PostgreSQL (its Unix socket)."""
    pgdata = data_dir.resolve() / "pgdata"
    return f"postgresql://postgres:@/postgres?host={pgcontrol.socket_dir(pgdata)}"
