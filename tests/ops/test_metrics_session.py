"""After a short scripted session over the public interface, /metrics shows every contract metric.

Labelled metrics only export samples once a label set has been used, so the session drives real
traffic: sign-up, REST resources, a WebSocket chat with an assistant reply, and a disconnect.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from server.runtime import RunningServer
from tests.ops.test_dashboards_and_alerts import CONTRACT_METRICS

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Samples by contract name (a counter's family is named without its ``_total``)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = [
            (sample.labels, sample.value)
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if labels.items() <= lbl.items())


async def sign_up(client: httpx.AsyncClient) -> str:
    body = {"email": f"metrics-{uuid.uuid4().hex}@example.com", "password": "a long password 1"}
    assert (await client.post("/api/v1/auth/register", json=body)).status_code == 201
    login = await client.post("/api/v1/auth/login", json=body)
    assert login.status_code == 200, login.text
    client.cookies.clear()
    return str(login.json()["access_token"])


async def chat_once(server: RunningServer, token: str, thread_id: str) -> list[dict[str, Any]]:
    """Subscribe, send with a reply, read until ``assistant.completed``; close the socket."""
    url = server.url.replace("http://", "ws://") + "/ws"
    events: list[dict[str, Any]] = []
    async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {token}")]) as ws:
        await ws.send_message(json.dumps({"op": "subscribe", "ref": "s", "thread_id": thread_id}))
        await ws.send_message(json.dumps({"op": "no_such_op", "ref": "bad"}))
        await ws.send_message(
            json.dumps(
                {
                    "op": "send",
                    "ref": "m",
                    "thread_id": thread_id,
                    "content": "What is a metric?",
                    "client_msg_id": uuid.uuid4().hex,
                }
            )
        )
        with trio.fail_after(20):
            while True:
                frame = json.loads(await ws.get_message())
                events.append(frame)
                if frame.get("op") == "event" and frame["type"] in (
                    "assistant.completed",
                    "assistant.failed",
                ):
                    break
    return events


async def test_a_scripted_session_exports_every_contract_metric(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    before = await scrape(client)
    token = await sign_up(client)
    client.headers["Authorization"] = f"Bearer {token}"
    project = (await client.post("/api/v1/projects", json={"name": "metrics"})).json()
    thread = (
        await client.post(f"/api/v1/projects/{project['id']}/threads", json={"title": "m"})
    ).json()
    sent = await client.post(
        f"/api/v1/threads/{thread['id']}/messages",
        json={"content": "hello", "client_msg_id": uuid.uuid4().hex, "reply": False},
    )
    assert sent.status_code == 201, sent.text

    events = await chat_once(server, token, thread["id"])
    replies = [f for f in events if f.get("op") == "reply"]
    assert {r["ref"]: r["ok"] for r in replies} == {"s": True, "bad": False, "m": True}
    assert events[-1]["type"] == "assistant.completed", events[-1]

    # Some figures are recorded just after the socket closes or the reply settles: poll.
    with trio.fail_after(10):
        while True:
            after = await scrape(client)
            missing = sorted(name for name in CONTRACT_METRICS if not after.get(name))
            disconnected = value(after, "threadline_ws_disconnects_total") > value(
                before, "threadline_ws_disconnects_total"
            )
            # Counted once the reply's final write returns, which may be just after its closing
            # event reached the client (through the broker, from the committing transaction).
            counted = value(after, "threadline_llm_tokens_total", kind="completion") > value(
                before, "threadline_llm_tokens_total", kind="completion"
            )
            if not missing and disconnected and counted:
                break
            await trio.sleep(0.1)

    # The session moved the figures it should have moved.
    def grew(name: str, **labels: str) -> bool:
        return value(after, name, **labels) > value(before, name, **labels)

    assert grew("threadline_http_requests_total", route="/api/v1/auth/login", status="200")
    assert grew("threadline_ws_frames_total", direction="in")
    assert grew("threadline_ws_frames_total", direction="out")
    assert grew("threadline_llm_requests_total", outcome="ok")
    assert grew("threadline_llm_tokens_total", kind="completion")
    for histogram in (
        "threadline_event_delivery_seconds",
        "threadline_llm_time_to_first_token_seconds",
        "threadline_ws_outbound_queue_depth",
        "threadline_http_request_duration_seconds",
    ):
        count = [v for lbl, v in after[histogram] if "le" not in lbl]
        assert sum(count) > 0, histogram
    # No user id or e-mail ever becomes a label value.
    for samples in after.values():
        for labels, _ in samples:
            assert not any("@" in v or v == project["id"] for v in labels.values()), labels
