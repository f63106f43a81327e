"""End to end through the REST send: a user message with reply=true gets a streamed answer."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from server.llm.fake_server import FakeLLM
from server.runtime import open_server
from tests.llm.conftest import llm_settings
from tests.server.rest_client import assert_error, new_api


async def test_rest_send_with_reply_stores_completed_answer_and_usage(
    tmp_path: Path, fake_llm: FakeLLM, pg_dsn: str
) -> None:
    fake_llm.configure(tokens=25)
    settings = llm_settings(tmp_path, fake_llm)
    async with (
        open_server(settings, pg_dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        api = await new_api(running, client)
        project = await api.project(name="assistant e2e")
        thread = await api.thread(project["id"])
        sent = await api.send(thread["id"], "What is a fox?", reply=True, client_msg_id="m-1")
        assert sent.status_code == 201, sent.text
        user_message = sent.json()

        answer: dict[str, object] = {}
        with trio.fail_after(10):
            while True:  # bounded poll of the public API until the reply has settled
                r = await api.call("GET", f"/threads/{thread['id']}/messages", expect=200)
                items = r.json()["items"]
                replies = [m for m in items if m["role"] == "assistant"]
                if replies and replies[0]["status"] != "streaming":
                    answer = replies[0]
                    break
                await trio.sleep(0.02)
        assert answer["status"] == "completed"
        assert answer["reply_to"] == user_message["id"]
        assert answer["seq"] == user_message["seq"] + 1
        assert len(str(answer["content"]).split()) == 25
        usage = await running.services.db.fetchrow(
            "SELECT * FROM usage_records WHERE message_id = $1", answer["id"]
        )
        assert usage is not None and usage["completion_tokens"] == 25
        assert usage["model"] == "fake-gpt" and not usage["estimated"]
        report = (await api.call("GET", f"/projects/{project['id']}/usage", expect=200)).json()
        assert report["month"]["completion_tokens"] == 25
        assert report["month"]["cost_usd"] == float(usage["cost_usd"])

        # With the budget spent, the bus refuses the next send and nothing reaches the provider.
        requests = fake_llm.stats.requests
        await api.call(
            "PATCH",
            f"/projects/{project['id']}",
            json={"monthly_budget_usd": float(usage["cost_usd"])},
            expect=200,
        )
        refused = await api.send(thread["id"], "again?", reply=True)
        assert_error(refused, 402, "budget_exceeded")
        assert fake_llm.stats.requests == requests
