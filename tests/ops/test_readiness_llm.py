"""An open LLM circuit shows in /readyz and /metrics but does not take the instance away."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import trio

from server.llm.fake_server import open_fake_llm
from server.runtime import open_server
from tests.conftest import make_settings


async def test_an_open_llm_circuit_is_reported_without_failing_readiness(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with open_fake_llm() as fake:
        fake.configure(fail_next=100, status=503)
        settings = make_settings(
            tmp_path,
            llm_base_url=fake.url,
            llm_api_key="sk-ops-test",
            llm_model="fake-gpt",
            llm_max_retries=0,
            llm_circuit_failures=1,
            llm_circuit_reset_s=60.0,
        )
        async with (
            open_server(settings, pg_dsn, bind="127.0.0.1:0") as running,
            httpx.AsyncClient(base_url=running.url, timeout=10.0) as client,
        ):
            account = {"email": f"llm-{uuid.uuid4().hex}@example.com", "password": "a long pw 12"}
            assert (await client.post("/api/v1/auth/register", json=account)).status_code == 201
            login = await client.post("/api/v1/auth/login", json=account)
            client.cookies.clear()
            client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
            project = (await client.post("/api/v1/projects", json={"name": "p"})).json()
            thread = (
                await client.post(f"/api/v1/projects/{project['id']}/threads", json={"title": "t"})
            ).json()
            sent = await client.post(
                f"/api/v1/threads/{thread['id']}/messages",
                json={"content": "hello?", "client_msg_id": uuid.uuid4().hex},
            )
            assert sent.status_code == 201, sent.text

            with trio.fail_after(10):
                while True:
                    ready = await client.get("/readyz")
                    llm = ready.json()["checks"]["llm"]
                    if llm["circuit"] == "open":
                        break
                    await trio.sleep(0.05)
            assert llm["ok"] is False and llm["retry_in_s"] > 0
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "ready"
            metrics = (await client.get("/metrics")).text
            assert "threadline_llm_circuit_state 2.0" in metrics
            # Everything but replies keeps working.
            listed = await client.get(f"/api/v1/threads/{thread['id']}/messages")
            assert listed.status_code == 200
