"""The REST resources over real HTTP: projects, threads, messages, history, usage, errors."""

from __future__ import annotations

import httpx
import pytest
import trio

from server.config import Settings
from server.runtime import RunningServer, open_server
from tests.server.rest_client import Api, assert_error, new_api


@pytest.fixture
async def api(server: RunningServer, client: httpx.AsyncClient) -> Api:
    return await new_api(server, client)


async def test_project_lifecycle(api: Api) -> None:
    project = await api.project(name="  Alpha  ", monthly_budget_usd=12.5)
    assert project["name"] == "Alpha"
    assert project["monthly_budget_usd"] == 12.5 and project["spend_this_month_usd"] == 0
    assert project["created_at"].endswith("Z")
    pid = project["id"]
    assert (await api.call("GET", f"/projects/{pid}", expect=200)).json() == project
    patched = (
        await api.call("PATCH", f"/projects/{pid}", json={"monthly_budget_usd": None}, expect=200)
    ).json()
    assert patched["monthly_budget_usd"] is None and patched["name"] == "Alpha"
    renamed = (await api.call("PATCH", f"/projects/{pid}", json={"name": "B"}, expect=200)).json()
    assert renamed["name"] == "B" and renamed["monthly_budget_usd"] is None
    usage = (await api.call("GET", f"/projects/{pid}/usage", expect=200)).json()
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    assert usage == {"month": zero, "total": zero, "by_model": []}
    listed = (await api.call("GET", "/projects", expect=200)).json()
    assert [p["id"] for p in listed["items"]] == [pid] and listed["next_cursor"] is None
    await api.call("DELETE", f"/projects/{pid}", expect=204)
    assert_error(await api.call("GET", f"/projects/{pid}"), 404, "not_found")


async def test_validation_names_fields(api: Api) -> None:
    error = assert_error(
        await api.call("POST", "/projects", json={"name": ""}), 422, "validation_failed"
    )
    assert error["details"]["fields"] == ["name"]
    error = assert_error(
        await api.call("POST", "/projects", json={"name": "x", "monthly_budget_usd": -1}),
        422,
        "validation_failed",
    )
    assert error["details"]["fields"] == ["monthly_budget_usd"]
    assert_error(await api.call("POST", "/projects", content=b"{nope"), 400, "bad_request")
    assert_error(await api.call("POST", "/projects", json=[1]), 400, "bad_request")
    project = await api.project()
    thread = await api.thread(project["id"])
    error = assert_error(
        await api.send(thread["id"], "hi", role="assistant"), 422, "validation_failed"
    )
    assert error["details"]["fields"] == ["role"]
    error = assert_error(await api.send(thread["id"], ""), 422, "validation_failed")
    assert error["details"]["fields"] == ["content"]
    # PostgreSQL text cannot hold NUL: refused as invalid input, never a 500.
    error = assert_error(
        await api.send(thread["id"], "a\u0000b", client_msg_id="c\u0000"), 422, "validation_failed"
    )
    assert error["details"]["fields"] == ["client_msg_id", "content"]
    error = assert_error(
        await api.call("POST", "/projects", json={"name": "a\u0000"}), 422, "validation_failed"
    )
    assert error["details"]["fields"] == ["name"]
    for query in ("limit=0", "limit=201", "limit=x"):
        error = assert_error(
            await api.call("GET", f"/threads/{thread['id']}/messages?{query}"),
            422,
            "validation_failed",
        )
        assert error["details"]["fields"] == ["limit"]


async def test_messages_send_edit_delete_history(api: Api) -> None:
    project = await api.project()
    thread = await api.thread(project["id"], "chat")
    tid = thread["id"]
    first = await api.send(tid, "hello", client_msg_id="c1")
    assert first.status_code == 201
    msg = first.json()
    assert {k: msg[k] for k in ("thread_id", "seq", "role", "content", "version", "deleted")} == {
        "thread_id": tid,
        "seq": 1,
        "role": "user",
        "content": "hello",
        "version": 1,
        "deleted": False,
    }
    assert msg["status"] == "completed" and msg["edited_at"] is None
    again = await api.send(tid, "hello", client_msg_id="c1")
    assert again.status_code == 200 and again.json() == msg
    assert_error(await api.send(tid, "other", client_msg_id="c1"), 409, "idempotency_conflict")

    mid = msg["id"]
    error = assert_error(
        await api.call("PATCH", f"/messages/{mid}", json={"content": "x"}), 422, "validation_failed"
    )
    assert error["details"]["fields"] == ["expected_version"]
    edited = (
        await api.call(
            "PATCH",
            f"/messages/{mid}",
            json={"content": "hello!"},
            headers={"If-Match": '"1"'},
            expect=200,
        )
    ).json()
    assert edited["version"] == 2 and edited["content"] == "hello!" and edited["seq"] == 1
    stale = assert_error(
        await api.call("DELETE", f"/messages/{mid}", headers={"If-Match": "1"}),
        409,
        "version_conflict",
    )
    assert stale["details"]["current_version"] == 2
    tomb = (
        await api.call("DELETE", f"/messages/{mid}", json={"expected_version": 2}, expect=200)
    ).json()
    assert tomb["deleted"] is True and tomb["content"] == "" and tomb["version"] == 3
    assert (await api.call("GET", f"/messages/{mid}", expect=200)).json() == tomb

    history = (await api.call("GET", f"/messages/{mid}/history", expect=200)).json()
    assert history["next_cursor"] is None
    assert [
        (h["version"], h["kind"], h["editor_id"], h["old_content"], h["new_content"])
        for h in history["items"]
    ] == [(2, "edit", api.user_id, "hello", "hello!"), (3, "delete", api.user_id, "hello!", None)]
    assert all(h["created_at"].endswith("Z") for h in history["items"])

    after = (await api.call("GET", f"/threads/{tid}", expect=200)).json()
    assert after["last_seq"] == 3 and after["message_count"] == 0
    assert after["last_message_at"] is not None
    # The same client_msg_id still answers with the (now deleted) message, creating nothing.
    replay = await api.send(tid, "hello", client_msg_id="c1")
    assert replay.status_code == 200 and replay.json()["id"] == mid


async def test_thread_lifecycle(api: Api) -> None:
    project = await api.project()
    thread = await api.thread(project["id"], "first")
    assert thread["message_count"] == 0 and thread["last_seq"] == 0
    assert thread["last_message_at"] is None and thread["project_id"] == project["id"]
    renamed = (
        await api.call("PATCH", f"/threads/{thread['id']}", json={"title": "second"}, expect=200)
    ).json()
    assert renamed["title"] == "second"
    await api.call("DELETE", f"/threads/{thread['id']}", expect=204)
    assert_error(await api.call("GET", f"/threads/{thread['id']}"), 404, "not_found")
    assert_error(await api.call("DELETE", f"/threads/{thread['id']}"), 404, "not_found")


async def test_cross_user_access_is_not_found_everywhere(
    server: RunningServer, client: httpx.AsyncClient, api: Api
) -> None:
    stranger = await new_api(server, client)
    project = await api.project()
    pid = project["id"]
    thread = await api.thread(pid)
    tid = thread["id"]
    mid = (await api.send(tid, "secret")).json()["id"]
    attempts = [
        ("GET", f"/projects/{pid}", None),
        ("PATCH", f"/projects/{pid}", {"name": "x"}),
        ("GET", f"/projects/{pid}/usage", None),
        ("GET", f"/projects/{pid}/threads", None),
        ("POST", f"/projects/{pid}/threads", {"title": "x"}),
        ("GET", f"/threads/{tid}", None),
        ("PATCH", f"/threads/{tid}", {"title": "x"}),
        ("GET", f"/threads/{tid}/messages", None),
        ("POST", f"/threads/{tid}/messages", {"content": "x"}),
        ("GET", f"/messages/{mid}", None),
        ("GET", f"/messages/{mid}/history", None),
        ("PATCH", f"/messages/{mid}", {"content": "x", "expected_version": 1}),
        ("DELETE", f"/messages/{mid}", {"expected_version": 1}),
        ("DELETE", f"/threads/{tid}", None),
        ("DELETE", f"/projects/{pid}", None),
    ]
    for method, path, body in attempts:
        response = await stranger.call(method, path, json=body)
        error = assert_error(response, 404, "not_found")
        assert "secret" not in response.text and error["details"] == {}
    # ... and nothing was changed by the attempts.
    assert (await api.call("GET", f"/messages/{mid}", expect=200)).json()["content"] == "secret"
    assert (await stranger.call("GET", "/projects", expect=200)).json()["items"] == []
    # A malformed id is a 404 too, not a 500 or a 422.
    assert_error(await api.call("GET", "/threads/not-a-uuid"), 404, "not_found")


async def test_unauthenticated_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/projects")
    assert_error(response, 401, "unauthorized")


async def test_concurrent_edits_one_wins(api: Api) -> None:
    project = await api.project()
    thread = await api.thread(project["id"])
    mid = (await api.send(thread["id"], "v1")).json()["id"]
    statuses: list[int] = []

    async def edit(i: int) -> None:
        response = await api.call(
            "PATCH", f"/messages/{mid}", json={"content": f"v2-{i}"}, headers={"If-Match": "1"}
        )
        statuses.append(response.status_code)
        if response.status_code == 409:
            assert response.json()["error"]["details"]["current_version"] == 2

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(edit, i)
    assert sorted(statuses) == [200] + [409] * 29
    history = (await api.call("GET", f"/messages/{mid}/history", expect=200)).json()["items"]
    assert [h["version"] for h in history] == [2]


async def test_concurrent_identical_sends_create_one(api: Api, server: RunningServer) -> None:
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]
    responses: list[httpx.Response] = []

    async def send() -> None:
        responses.append(await api.send(tid, "same", client_msg_id="dup"))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(send)
    assert sorted(r.status_code for r in responses) == [200] * 29 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    count = await server.services.db.fetchval(
        "SELECT count(*) FROM messages WHERE thread_id = $1", tid
    )
    assert count == 1


async def test_budget_exceeded_creates_nothing(api: Api, server: RunningServer) -> None:
    project = await api.project(monthly_budget_usd=0)
    tid = (await api.thread(project["id"]))["id"]
    error = assert_error(await api.send(tid, "hi", reply=True), 402, "budget_exceeded")
    assert error["details"]["monthly_budget_usd"] == 0
    assert (await api.call("GET", f"/threads/{tid}", expect=200)).json()["last_seq"] == 0
    events = await server.services.db.fetchval(
        "SELECT count(*) FROM thread_events WHERE thread_id = $1", tid
    )
    assert events == 0
    # Raising the budget lets the same send through.
    await api.call(
        "PATCH", f"/projects/{project['id']}", json={"monthly_budget_usd": 5}, expect=200
    )
    assert (await api.send(tid, "hi", reply=True)).status_code == 201


async def test_events_are_gap_free_and_match_messages(api: Api, server: RunningServer) -> None:
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]

    async def writer(i: int) -> None:
        sent = (await api.send(tid, f"m{i}")).json()
        await api.call(
            "PATCH",
            f"/messages/{sent['id']}",
            json={"content": f"m{i}!"},
            headers={"If-Match": "1"},
            expect=200,
        )
        if i % 2:
            await api.call(
                "DELETE", f"/messages/{sent['id']}", headers={"If-Match": "2"}, expect=200
            )

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(writer, i)
    rows = await server.services.db.fetch(
        "SELECT seq, type, payload FROM thread_events WHERE thread_id = $1 ORDER BY seq", tid
    )
    assert [r["seq"] for r in rows] == list(range(1, 26))
    created = {r["payload"]["id"]: r["seq"] for r in rows if r["type"] == "message.created"}
    listed = (await api.call("GET", f"/threads/{tid}/messages", expect=200)).json()["items"]
    assert {m["id"]: m["seq"] for m in listed} == created
    for row in rows:
        assert row["payload"]["thread_id"] == tid
    # Each event's payload is the message as REST showed it right after that change.
    last_payload = {r["payload"]["id"]: r["payload"] for r in rows}
    assert {m["id"]: m for m in listed} == last_payload
    thread = (await api.call("GET", f"/threads/{tid}", expect=200)).json()
    assert thread["last_seq"] == 25 and thread["message_count"] == 5


async def test_payload_too_large(api: Api, server: RunningServer) -> None:
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]
    big = "x" * (server.services.settings.max_body_bytes + 10)
    assert_error(await api.send(tid, big), 413, "payload_too_large")


async def test_oversized_content_length_refused_before_body(
    api: Api, server: RunningServer
) -> None:
    """A huge Content-Length is answered 413 without the server waiting for the body."""
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        f"POST /api/v1/threads/{tid}/messages HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {api.headers['Authorization']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    )
    received = b""
    with trio.fail_after(5):
        await stream.send_all(head.encode())
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed without a response"
            received += chunk
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 413"), received[:200]


async def test_usage_and_spend_this_month(api: Api, server: RunningServer) -> None:
    project = await api.project(monthly_budget_usd=1)
    pid = project["id"]
    tid = (await api.thread(pid))["id"]
    ids = [(await api.send(tid, f"m{i}")).json()["id"] for i in range(4)]
    db = server.services.db
    rows = [
        (ids[0], "gpt-4o-mini", 100, 20, "0.25", "now()"),
        (ids[1], "gpt-4o", 10, 5, "0.125", "now()"),
        # Last month: in the totals, not in this month's figures or spend.
        (ids[2], "gpt-4o", 1000, 500, "2", "date_trunc('month', now()) - interval '1 day'"),
    ]
    for message_id, model, prompt, completion, cost, at in rows:
        await db.fetchval(
            "INSERT INTO usage_records (message_id, thread_id, project_id, model, prompt_tokens,"
            f" completion_tokens, cost_usd, estimated, created_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7::numeric, false, {at})",
            message_id,
            tid,
            pid,
            model,
            prompt,
            completion,
            cost,
        )
    await db.fetchval(
        "INSERT INTO budget_reservations (message_id, project_id, amount_usd) VALUES ($1, $2, 0.5)",
        ids[3],
        pid,
    )
    usage = (await api.call("GET", f"/projects/{pid}/usage", expect=200)).json()
    assert usage["month"] == {"prompt_tokens": 110, "completion_tokens": 25, "cost_usd": 0.375}
    assert usage["total"] == {"prompt_tokens": 1110, "completion_tokens": 525, "cost_usd": 2.375}
    assert usage["by_model"] == [
        {"model": "gpt-4o", "prompt_tokens": 1010, "completion_tokens": 505, "cost_usd": 2.125},
        {"model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": 0.25},
    ]
    # Spend this month = this month's usage + reservations in flight; at the budget: refused.
    got = (await api.call("GET", f"/projects/{pid}", expect=200)).json()
    assert got["spend_this_month_usd"] == 0.875
    listed = (await api.call("GET", "/projects", expect=200)).json()["items"]
    assert [p["spend_this_month_usd"] for p in listed] == [0.875]
    await api.call("PATCH", f"/projects/{pid}", json={"monthly_budget_usd": "0.875"}, expect=200)
    assert_error(await api.send(tid, "one more", reply=True), 402, "budget_exceeded")
    await api.call("PATCH", f"/projects/{pid}", json={"monthly_budget_usd": 0.9}, expect=200)
    assert (await api.send(tid, "one more", reply=True)).status_code == 201


async def test_idempotent_send_survives_a_restart(settings: Settings, pg_dsn: str) -> None:
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as first:
        async with httpx.AsyncClient(base_url=first.url, timeout=10) as http:
            api = await new_api(first, http)
            tid = (await api.thread((await api.project())["id"]))["id"]
            sent = await api.send(tid, "before restart", client_msg_id="r-1")
            assert sent.status_code == 201
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=10) as http:
            again = Api(http, api.headers["Authorization"].removeprefix("Bearer "), api.user_id)
            replay = await again.send(tid, "before restart", client_msg_id="r-1")
            assert replay.status_code == 200 and replay.json() == sent.json()
            conflict = await again.send(tid, "changed", client_msg_id="r-1")
            assert_error(conflict, 409, "idempotency_conflict")
