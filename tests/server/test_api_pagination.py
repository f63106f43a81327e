"""Keyset pagination over real HTTP: exact under concurrent inserts, opaque validated cursors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from server.runtime import RunningServer
from tests.server.rest_client import Api, assert_error, new_api


@pytest.fixture
async def api(server: RunningServer, client: httpx.AsyncClient) -> Api:
    return await new_api(server, client)


N = 120


async def _page_while_inserting(
    api: Api, path: str, limit: int, insert: Callable[[int], Awaitable[None]]
) -> list[dict[str, Any]]:
    """Read every page of ``path``; after each page another task inserts one more item."""
    seen: list[dict[str, Any]] = []
    to_inserter, requests = trio.open_memory_channel[int](0)
    done_send, done_recv = trio.open_memory_channel[None](0)

    async def inserter() -> None:
        async for i in requests:
            await insert(i)
            await done_send.send(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inserter)
        cursor: str | None = None
        page_no = 0
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            body = (await api.call("GET", path, params=params, expect=200)).json()
            assert len(body["items"]) <= limit
            seen.extend(body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
            page_no += 1
            await to_inserter.send(page_no)  # a concurrent writer commits between our pages
            await done_recv.receive()
        await to_inserter.aclose()
    return seen


async def test_threads_pages_exact_under_concurrent_inserts(api: Api) -> None:
    project = await api.project()
    pid = project["id"]
    originals: list[str] = []
    for i in range(N):
        originals.append((await api.thread(pid, f"t{i}"))["id"])
    inserted: list[str] = []

    async def insert(i: int) -> None:
        inserted.append((await api.thread(pid, f"new{i}"))["id"])

    seen = await _page_while_inserting(api, f"/projects/{pid}/threads", 7, insert)
    ids = [t["id"] for t in seen]
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert ids[:N] == originals, "an item was skipped or reordered"
    assert set(ids) <= set(originals) | set(inserted)
    assert inserted and set(ids[N:]) == set(inserted)  # appended items arrive on later pages
    keys = [(t["created_at"], t["id"]) for t in seen]
    assert keys == sorted(keys)


async def test_messages_pages_exact_under_concurrent_sends(api: Api) -> None:
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]
    for i in range(N):
        assert (await api.send(tid, f"m{i}")).status_code == 201

    async def insert(i: int) -> None:
        assert (await api.send(tid, f"new{i}")).status_code == 201

    seen = await _page_while_inserting(api, f"/threads/{tid}/messages", 9, insert)
    seqs = [m["seq"] for m in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # every seq once, in order, none skipped
    assert len(seqs) > N
    assert [m["content"] for m in seen[:N]] == [f"m{i}" for i in range(N)]


async def test_messages_after_and_before_seq(api: Api) -> None:
    project = await api.project()
    tid = (await api.thread(project["id"]))["id"]
    for i in range(25):
        await api.send(tid, f"m{i}")
    path = f"/threads/{tid}/messages"
    after = (await api.call("GET", path, params={"after_seq": 20}, expect=200)).json()
    assert [m["seq"] for m in after["items"]] == [21, 22, 23, 24, 25]
    assert after["next_cursor"] is None
    # Backwards from before_seq: each page ascending, the cursor keeps going back.
    seqs: list[int] = []
    params: dict[str, Any] = {"before_seq": 24, "limit": 10}
    while True:
        body = (await api.call("GET", path, params=params, expect=200)).json()
        page = [m["seq"] for m in body["items"]]
        assert page == sorted(page)
        seqs = page + seqs
        if body["next_cursor"] is None:
            break
        params = {"cursor": body["next_cursor"], "limit": 10}
    assert seqs == list(range(1, 24))
    assert_error(
        await api.call("GET", path, params={"after_seq": 1, "before_seq": 5}),
        422,
        "validation_failed",
    )


async def test_cursors_are_validated(
    server: RunningServer, client: httpx.AsyncClient, api: Api
) -> None:
    project = await api.project()
    pid = project["id"]
    t1 = (await api.thread(pid))["id"]
    t2 = (await api.thread(pid))["id"]
    for _ in range(3):
        await api.send(t1, "x")
    body = (
        await api.call("GET", f"/threads/{t1}/messages", params={"limit": 1}, expect=200)
    ).json()
    cursor = body["next_cursor"]
    assert cursor and "seq" not in cursor  # opaque, not a readable query
    # Another list's cursor, a tampered one, garbage: all 400 bad_request.
    for bad in (cursor[:-2] + "AA", "!!!", "e30", cursor + "x"):
        assert_error(
            await api.call("GET", f"/threads/{t1}/messages", params={"cursor": bad}),
            400,
            "bad_request",
        )
    assert_error(
        await api.call("GET", f"/threads/{t2}/messages", params={"cursor": cursor}),
        400,
        "bad_request",
    )
    assert_error(
        await api.call("GET", f"/projects/{pid}/threads", params={"cursor": cursor}),
        400,
        "bad_request",
    )
    # Another user's cursor for their own list is refused too (the scope is the owner).
    await api.project()
    projects_page = (await api.call("GET", "/projects", params={"limit": 1}, expect=200)).json()
    assert projects_page["next_cursor"] is not None
    stranger = await new_api(server, client)
    assert_error(
        await stranger.call("GET", "/projects", params={"cursor": projects_page["next_cursor"]}),
        400,
        "bad_request",
    )
