"""Three ``threadline serve`` nodes on one embedded PostgreSQL, started once for the package.

The nodes are started together on a fresh data directory, as an operator would start them: they
race to create the database, the signing key and the schema, and must all come up.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.cluster.nodes import (
    FakeLLMProcess,
    Node,
    fake_llm_process,
    start_node,
    stop_embedded_postgres,
    stop_node,
    wait_converged,
    wait_ready,
)
from tests.server.ws_support import Client

NODE_TIMEOUT_S = 4.0
# Per-user bucket for every node: the rate-limit test checks the cluster keeps to it.
USER_RATE_PER_S = 10.0
USER_BURST = 60


@dataclass
class Cluster:
    """The running nodes, the fake provider and where they keep their data.

    ``nodes`` are the three long-lived ones; ``spare`` holds nodes started with them for the
    tests that kill or stop one (``doomed``: SIGKILL; ``leaving``: SIGTERM), so no test waits
    for a start of its own.
    """

    nodes: list[Node]
    fake: FakeLLMProcess
    data_dir: Path
    log_dir: Path
    spare: dict[str, Node] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        values = {
            "THREADLINE_NODE_TIMEOUT_S": str(NODE_TIMEOUT_S),
            "THREADLINE_RATE_LIMIT_PER_S": str(USER_RATE_PER_S),
            "THREADLINE_RATE_LIMIT_BURST": str(USER_BURST),
            "THREADLINE_IP_RATE_LIMIT_PER_S": "10000",
            "THREADLINE_IP_RATE_LIMIT_BURST": "100000",
            "THREADLINE_GRACEFUL_TIMEOUT_S": "6",
            "THREADLINE_THREAD_IDLE_TIMEOUT_S": "30",
        }
        values.update(extra)
        return values

    def launch(self, name: str, **extra: str) -> Node:
        """Another node on the same data directory (not waited for)."""
        return start_node(self.data_dir, name, self.fake.url, self.log_dir, **self.env(**extra))


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cluster-data")
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    with fake_llm_process(log_dir) as fake:
        running = Cluster([], fake, data_dir, log_dir)
        try:
            running.nodes = [running.launch(f"node-{i}") for i in (1, 2, 3)]
            running.spare = {
                "doomed": running.launch("node-doomed"),
                "leaving": running.launch("node-leaving"),
            }
            everyone = [*running.nodes, *running.spare.values()]
            for node in everyone:
                wait_ready(node)
            wait_converged(everyone)  # every node counts the others (fair shares, ownership)
            yield running
        finally:
            everyone = [*running.nodes, *running.spare.values()]
            for node in everyone:  # all at once: each drains on its own
                node.terminate()
            for node in everyone:
                with contextlib.suppress(Exception):
                    stop_node(node)
            stop_embedded_postgres(data_dir)


@dataclass
class User:
    token: str
    project_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def new_user(node: Node) -> User:
    account = {"email": f"c{uuid.uuid4().hex[:12]}@example.com", "password": "a long password 1"}
    async with httpx.AsyncClient(base_url=node.url, timeout=20) as http:
        assert (await http.post("/api/v1/auth/register", json=account)).status_code == 201
        login = await http.post("/api/v1/auth/login", json=account)
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        http.cookies.clear()
        project = await http.post("/api/v1/projects", json={"name": "p"}, headers=headers)
        assert project.status_code == 201, project.text
    return User(token, project.json()["id"])


async def new_thread(node: Node, user: User) -> str:
    async with httpx.AsyncClient(base_url=node.url, timeout=20) as http:
        thread = await http.post(
            f"/api/v1/projects/{user.project_id}/threads", json={"title": "t"}, headers=user.headers
        )
    assert thread.status_code == 201, thread.text
    return str(thread.json()["id"])


# A node that has spent its share of a new key's bucket may refuse (429, retry after ~0.1 s) when
# the shared bucket's answer is slow on a loaded machine, before the user has spent the burst: the
# send helpers back off as the contract tells clients to, with the same idempotency key. The
# rate-limit test counts refusals itself (test_limits.py).
RATE_LIMITED_ATTEMPTS = 20


async def rest_send(
    node: Node, user: User, thread_id: str, content: str, *, reply: bool = False
) -> dict[str, Any]:
    body = {"content": content, "client_msg_id": uuid.uuid4().hex, "reply": reply}
    async with httpx.AsyncClient(base_url=node.url, timeout=20) as http:
        for _ in range(RATE_LIMITED_ATTEMPTS):
            response = await http.post(
                f"/api/v1/threads/{thread_id}/messages", json=body, headers=user.headers
            )
            if response.status_code != 429:
                break
            await trio.sleep(float(response.json()["error"]["details"]["retry_after_s"]))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def ws_client(node: Node, user: User) -> AsyncIterator[Client]:
    """An authenticated WebSocket to ``node``, pumped for the duration of the block."""
    async with contextlib.AsyncExitStack() as stack:
        for attempt in range(RATE_LIMITED_ATTEMPTS):
            try:
                ws = await stack.enter_async_context(
                    open_websocket_url(
                        node.ws_url, extra_headers=[("Authorization", f"Bearer {user.token}")]
                    )
                )
                break
            except ConnectionRejected as refused:  # 429: back off as Retry-After says
                if refused.status_code != 429 or attempt == RATE_LIMITED_ATTEMPTS - 1:
                    raise
                await trio.sleep(float(dict(refused.headers)[b"retry-after"].decode()))
        nursery = await stack.enter_async_context(trio.open_nursery())
        client = Client(ws)
        nursery.start_soon(client.pump)
        yield client
        nursery.cancel_scope.cancel()


async def request(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    """One op, sent again after ``retry_after_s`` while it is refused ``rate_limited`` (a node's
    lease of the user's bucket can run dry for a sync interval before the burst is spent)."""
    for _ in range(RATE_LIMITED_ATTEMPTS):
        answer = await client.request(op, **fields)
        if answer["ok"] or answer["error"]["code"] != "rate_limited":
            break
        await trio.sleep(float(answer["error"]["details"]["retry_after_s"]))
    return answer


async def subscribe(client: Client, thread_id: str, after_seq: int | None = 0) -> dict[str, Any]:
    reply = await request(client, "subscribe", thread_id=thread_id, after_seq=after_seq)
    assert reply["ok"], reply
    return reply["data"]  # type: ignore[no-any-return]


def durable(client: Client, thread_id: str) -> list[dict[str, Any]]:
    return [e for e in client.events if e["thread_id"] == thread_id and e["seq"] is not None]


async def ws_send(client: Client, thread_id: str, content: str, *, reply: bool = False) -> Any:
    answer = await request(
        client,
        "send",
        thread_id=thread_id,
        content=content,
        client_msg_id=uuid.uuid4().hex,
        reply=reply,
    )
    assert answer["ok"], answer
    return answer["data"]
