"""Graceful shutdown: SIGTERM closes every WebSocket with 1001 and the process exits in time;
handshakes during the drain are refused with 503."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from server.runtime import RunningServer
from tests.server.test_serve_process import free_port
from tests.server.ws_support import connect, new_owner, ws_url

GRACE_S = 4.0


def _start(tmp_path: Path, dsn: str, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_DATABASE_URL=dsn,
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
        THREADLINE_JWT_SECRET="shutdown-test-" + uuid.uuid4().hex,
        THREADLINE_GRACEFUL_TIMEOUT_S=str(GRACE_S),
        THREADLINE_LOG_FORMAT="json",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_sigterm_closes_clients_1001_and_exits_in_time(tmp_path: Path, pg_dsn: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, pg_dsn, port)
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith(b"threadline: serving on"), line
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            credentials = {
                "email": f"u-{uuid.uuid4().hex[:10]}@example.com",
                "password": "a long passphrase 1",
            }
            assert (await http.post("/api/v1/auth/register", json=credentials)).status_code == 201
            token = (await http.post("/api/v1/auth/login", json=credentials)).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            project = (
                await http.post("/api/v1/projects", json={"name": "p"}, headers=headers)
            ).json()
            thread = (
                await http.post(
                    f"/api/v1/projects/{project['id']}/threads",
                    json={"title": "t"},
                    headers=headers,
                )
            ).json()
        codes: list[int | None] = []

        async def client(task_status: trio.TaskStatus[None]) -> None:
            async with open_websocket_url(
                f"ws://127.0.0.1:{port}/ws", extra_headers=[("Authorization", f"Bearer {token}")]
            ) as ws:
                await ws.send_message(
                    json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread["id"]})
                )
                assert json.loads(await ws.get_message())["ok"]
                task_status.started()
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    codes.append(exc.reason.code)

        with trio.fail_after(GRACE_S + 10):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    await nursery.start(client)
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
            returncode = await trio.to_thread.run_sync(proc.wait)
            elapsed = time.monotonic() - sent
        assert codes == [1001] * 5
        assert returncode == 0
        assert elapsed < GRACE_S + 3, elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_draining_refuses_new_connections_with_503(server: RunningServer) -> None:
    owner = await new_owner(server.services)
    async with connect(server, owner.token) as client:
        server.services.draining.set()
        with pytest.raises(HandshakeError) as refused:
            async with open_websocket_url(
                ws_url(server), extra_headers=[("Authorization", f"Bearer {owner.token}")]
            ):
                pass
        assert getattr(refused.value, "status_code", None) == 503
        assert (await client.request("ping"))["ok"]  # connections already open carry on
