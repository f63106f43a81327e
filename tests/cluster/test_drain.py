"""Contract section 6: SIGTERM on one node. /readyz says draining, its WebSocket clients get 1001
and resume on another node with after_seq losing nothing, and its replies finish within the
grace period or end ``interrupted`` with their text saved, never left ``streaming``."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from tests.cluster.conftest import (
    Cluster,
    durable,
    new_thread,
    new_user,
    rest_send,
    subscribe,
    ws_client,
)
from tests.cluster.nodes import stop_node


def _of(events: list[dict[str, Any]], thread_id: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["thread_id"] == thread_id and e["type"] == type_]


async def test_sigterm_drains_a_node_and_its_clients_resume_elsewhere(cluster: Cluster) -> None:
    other = cluster.nodes[0]
    leaving = cluster.spare["leaving"]
    try:
        user = await new_user(other)
        short, long = await new_thread(other, user), await new_thread(other, user)
        async with ws_client(leaving, user) as client:
            for thread_id in (short, long):
                await subscribe(client, thread_id, after_seq=0)
            cluster.fake.control(tokens=3000, delay_per_token_ms=25)  # ~75 s: cannot finish
            await rest_send(leaving, user, long, "a long story please", reply=True)
            await client.wait_for(lambda: len(_of(client.events, long, "assistant.delta")) >= 3)
            cluster.fake.control(tokens=30)  # ~0.75 s: finishes while the node drains (2.4 s)
            await rest_send(leaving, user, short, "a short answer please", reply=True)
            await client.wait_for(lambda: bool(_of(client.events, short, "assistant.delta")))
            leaving.terminate()
            async with httpx.AsyncClient(base_url=leaving.url, timeout=5) as http:
                ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            code, reason = await client.wait_closed(timeout=15)
            assert code == 1001, (code, reason)
            seen = {t: [e["seq"] for e in durable(client, t)] for t in (short, long)}
        # Back on another node, each thread from its last seq.
        async with ws_client(other, user) as back:
            for thread_id in (short, long):
                answer = await subscribe(back, thread_id, after_seq=seen[thread_id][-1])
                assert answer["last_seq"] >= seen[thread_id][-1]
            await back.wait_for(
                lambda: (
                    bool(_of(back.events, short, "assistant.completed"))
                    and bool(_of(back.events, long, "assistant.failed"))
                ),
                timeout=30,
            )
            # One SIGTERM is all it gets (a second one would kill it, as it would under systemd).
            exit_code = await trio.to_thread.run_sync(lambda: leaving.proc.wait(timeout=30))
        assert exit_code == 0
        for thread_id in (short, long):
            resumed = [e["seq"] for e in durable(back, thread_id)]
            assert seen[thread_id] + resumed == list(range(1, len(seen[thread_id] + resumed) + 1))
        done = _of(back.events, short, "assistant.completed")[0]["data"]
        assert done["status"] == "completed" and done["content"]
        failed = _of(back.events, long, "assistant.failed")[0]["data"]
        assert failed["reason"] == "interrupted" and failed["content"]
        async with httpx.AsyncClient(base_url=other.url, timeout=10) as http:
            stored = await http.get(
                f"/api/v1/threads/{long}/messages", params={"limit": 200}, headers=user.headers
            )
        reply = next(m for m in stored.json()["items"] if m["role"] == "assistant")
        assert reply["status"] == "interrupted" and reply["content"] == failed["content"]
        events = [line["event"] for line in leaving.logs()]
        assert "assistant.draining" in events and "cluster.left" in events
    finally:
        cluster.fake.control(reset=True)
        if leaving.alive():
            stop_node(leaving)
