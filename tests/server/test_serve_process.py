"""`threadline serve` as a real process on the embedded PostgreSQL: ready, data kept, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> httpx.Response:
    """Wait for the process to announce it is serving, then ask /readyz."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        if line.startswith(b"threadline: serving on"):
            break
    else:
        raise AssertionError(f"server exited during start-up with {proc.wait()}")
    response = httpx.get(url + "/readyz", timeout=5)
    assert response.status_code == 200, response.text
    return response


def start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(THREADLINE_DATA_DIR=str(data_dir), THREADLINE_LOG_FORMAT="json")
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err.decode()


def test_serve_runs_on_the_embedded_database_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(data_dir, port)
    try:
        ready = wait_ready(url, proc).json()
        assert ready["checks"]["migrations"]["ok"] is True
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        # The collector is timed from the start: the full collection before the start-up heap
        # was frozen (THREADLINE_GC_FREEZE, on by default) is counted already.
        metrics = httpx.get(url + "/metrics", timeout=5).text
        full = [
            line
            for line in metrics.splitlines()
            if line.startswith('threadline_gc_pause_seconds_count{generation="2"}')
        ]
        assert full and float(full[0].split()[-1]) >= 1, full
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "server.stopped" in err
    frozen = [json.loads(line) for line in err.splitlines() if "server.gc_frozen" in line]
    assert frozen and frozen[0]["objects"] > 10_000, frozen
    assert not list((data_dir / "pgdata").glob("postmaster.pid")), "embedded postgres left running"

    # A second start finds the same cluster (already migrated) and serves again.
    proc = start(data_dir, port)
    try:
        assert wait_ready(url, proc).json()["checks"]["migrations"]["current"] is not None
    finally:
        code, err = stop(proc)
    assert code == 0, err
