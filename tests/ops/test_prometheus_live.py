"""A real Prometheus scrapes a live server under a short locust run, with faults caused on purpose.

Debian's ``prometheus`` (installed by ``make tools``) runs on a free port, scraping every second
and evaluating a test copy of ops/prometheus/alerts.yml every second. The copy differs from the
shipped rules only in ``for:`` (1 s instead of minutes: the test cannot wait 5 minutes); the
expressions and thresholds are the shipped ones. Then:

* every PromQL expression of the Grafana dashboard and of the alert rules evaluates without error,
  and every dashboard panel returns data;
* the slow-consumer, readiness and LLM-circuit alerts fire, caused for real: 12 WebSocket clients
  that stop reading, a frozen PostgreSQL while /readyz is probed, a provider that fails until the
  circuit opens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from trio_websocket import open_websocket_url

from server import migrate
from server.auth import create_user_with_token
from server.embedded_pg import open_embedded
from server.events import ThreadEvent
from server.llm.fake_server import FakeLLM, open_fake_llm
from server.runtime import open_server
from tests.figures import record
from tests.llm.conftest import llm_settings
from tests.ops import pgcontrol

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "threadline.json"
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
MUST_FIRE = ("ThreadlineSlowConsumers", "ThreadlineNotReady", "ThreadlineLLMCircuitOpen")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_rules_copy(tmp_path: Path) -> Path:
    """The shipped rules with every ``for:`` shortened to 1 s (nothing else changed)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = tmp_path / "alerts.test.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


test_rules_copy.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    async def wait_ready(self, prom: httpx.AsyncClient, timeout: float = 60.0) -> None:
        """Wait until its ``/-/ready`` says 200 (fail at once if it exits).

        Until then it listens but answers every API call with 503 and a plain-text "Service
        Unavailable" (its TSDB is still opening: seconds on a loaded machine). Another process's
        readiness has no event to wait on: polled, bounded.
        """
        with trio.fail_after(timeout):
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await prom.get("/-/ready")).status_code == 200:
                        return
                await trio.sleep(0.1)  # poll interval


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """Prometheus scraping ``target`` every second (started, not yet ready: ``wait_ready``)."""
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "prometheus is not installed: `make tools` installs Debian's package"
        if os.environ.get("THREADLINE_REQUIRE_TOOLS") == "1":  # set by `make test`: must run
            pytest.fail(reason)
        pytest.skip(reason)
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(test_rules_copy(tmp_path))],
        "scrape_configs": [{"job_name": "threadline", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            found.append((panel["title"], expr.replace('"$instance"', '".*"')))
    return found


def _rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


async def _query(prom: httpx.AsyncClient, expr: str) -> dict[str, Any]:
    response = await prom.get("/api/v1/query", params={"query": expr})
    # Its API answers JSON, errors included; anything else (a proxy's or a not-ready page) is
    # shown as it came rather than as a JSONDecodeError.
    is_json = response.headers.get("content-type", "").startswith("application/json")
    assert is_json, (expr, response.status_code, response.text[:500])
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", (expr, body)
    return body


async def _wait_until(prom: httpx.AsyncClient, expr: str, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not (await _query(prom, expr))["data"]["result"]:
            await trio.sleep(0.5)  # Prometheus evaluates every second


@contextlib.asynccontextmanager
async def _locust(url: str, seconds: int, out: Path) -> AsyncIterator[None]:
    """A short headless locust run against ``url`` in the background."""
    argv = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "--users", "4", "--spawn-rate", "4", "--run-time", f"{seconds}s",
        "--host", url, "--only-summary", "--csv", str(out / "locust"),
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run() -> None:
            await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
            done.set()

        nursery.start_soon(run)
        yield
        with trio.fail_after(seconds + 60):
            await done.wait()


async def test_dashboard_and_alerts_against_a_live_server(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with open_embedded(tmp_path_factory.mktemp("prom-pg")) as pg:
        await trio.to_thread.run_sync(migrate.upgrade, pg.dsn)
        async with open_fake_llm() as fake:
            fake.configure(tokens=20, delay_per_token_ms=2)
            settings = llm_settings(
                tmp_path, fake,
                llm_max_retries=0, llm_circuit_failures=3, llm_circuit_reset_s=600.0,
                summary_threshold_tokens=100,
                ws_outbound_queue_bytes=256 * 1024,
                rate_limit_per_s=30.0, rate_limit_burst=40, ws_abuse_strikes=5,
            )  # fmt: skip
            async with open_server(settings, pg.dsn, bind="127.0.0.1:0", embedded=pg) as running:
                target = running.url.removeprefix("http://")
                with prometheus(tmp_path, target) as prom_process:
                    async with (
                        httpx.AsyncClient(base_url=prom_process.url, timeout=10) as prom,
                        httpx.AsyncClient(base_url=running.url, timeout=10) as http,
                    ):
                        await prom_process.wait_ready(prom)
                        await _wait_until(prom, 'up{job="threadline"} == 1', timeout=30)
                        async with _locust(running.url, 8, tmp_path):
                            await _faults(running, fake, http, prom, pg.pgdata)
                        await _check_everything(prom)


async def _faults(
    running: Any, fake: FakeLLM, http: httpx.AsyncClient, prom: httpx.AsyncClient, pgdata: Path
) -> None:
    services = running.services
    _, token = await create_user_with_token(services)
    headers = {"Authorization": f"Bearer {token}"}
    project = (await http.post("/api/v1/projects", json={"name": "p"}, headers=headers)).json()
    thread = (
        await http.post(
            f"/api/v1/projects/{project['id']}/threads", json={"title": "t"}, headers=headers
        )
    ).json()
    ws_url = running.url.replace("http://", "ws://") + "/ws"
    ws_headers = [("Authorization", f"Bearer {token}")]

    # 1. Slow consumers: 12 clients subscribe and stop reading; large events fill their queues.
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(12):
            ws = await stack.enter_async_context(
                open_websocket_url(ws_url, extra_headers=ws_headers)
            )
            await ws.send_message(
                json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread["id"]})
            )
            json.loads(await ws.get_message())
        big = "x" * 60_000
        query = 'sum(threadline_ws_disconnects_total{reason="slow_consumer"}) >= 12'
        with trio.fail_after(60):
            i = 0
            while not (await _query(prom, query))["data"]["result"]:
                services.publish(
                    ThreadEvent(thread["id"], "assistant.delta", None,
                                {"message_id": "m", "index": i, "text": big})
                )  # fmt: skip
                i += 1
                await trio.sleep(0.005)  # a publisher's pace

    # 2. Rate limits: a burst over REST, and a WebSocket that keeps going past its refusals.
    async with trio.open_nursery() as nursery:
        for _ in range(80):
            nursery.start_soon(functools.partial(http.get, "/api/v1/projects", headers=headers))
    with contextlib.suppress(Exception):
        async with open_websocket_url(ws_url, extra_headers=ws_headers) as ws:
            for n in range(200):
                await ws.send_message(json.dumps({"op": "ping", "ref": str(n)}))

    # 3. The provider fails until the circuit opens (3 failures; no retries in this test).
    fake.configure(fail_next=10_000, status=503)
    with trio.fail_after(60):
        n = 0
        while not (await _query(prom, "max(threadline_llm_circuit_state) == 2"))["data"]["result"]:
            body = {"content": f"hello {n}", "client_msg_id": f"llm-{n}", "reply": True}
            await http.post(f"/api/v1/threads/{thread['id']}/messages", json=body, headers=headers)
            n += 1
            await trio.sleep(0.3)  # one reply at a time: they queue per thread

    # 4. The database freezes while an orchestrator probes /readyz ten times a second.
    pgcontrol.freeze(pgdata)
    try:
        async with trio.open_nursery() as nursery:

            async def probe() -> None:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        await http.get("/readyz")
                    await trio.sleep(0.1)  # an orchestrator's probe period

            nursery.start_soon(probe)
            await _wait_until(prom, 'ALERTS{alertname="ThreadlineNotReady",alertstate="firing"}')
            nursery.cancel_scope.cancel()
    finally:
        pgcontrol.thaw(pgdata)


async def _check_everything(prom: httpx.AsyncClient) -> None:
    for name in MUST_FIRE:
        await _wait_until(prom, f'ALERTS{{alertname="{name}",alertstate="firing"}}')
    empty = []
    for title, expr in _panel_exprs():
        if not (await _query(prom, expr))["data"]["result"]:
            empty.append(title)
    for _, expr in _rule_exprs():
        await _query(prom, expr)  # evaluates without error
    firing = sorted(
        {
            r["metric"]["alertname"]
            for r in (await _query(prom, 'ALERTS{alertstate="firing"}'))["data"]["result"]
        }
    )
    record(
        "real Prometheus",
        panel_queries=len(_panel_exprs()),
        rule_queries=len(_rule_exprs()),
        empty_panels=empty,
        firing=firing,
    )
    assert not empty, empty
