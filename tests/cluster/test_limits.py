"""Contract section 6: rate limits hold for the cluster as a whole (spreading requests over the
nodes does not multiply a user's budget)."""

from __future__ import annotations

import json

import httpx
import trio

from tests.cluster.conftest import USER_BURST, USER_RATE_PER_S, Cluster, new_user, ws_client


async def test_a_user_spreading_requests_over_three_nodes_gets_one_budget(
    cluster: Cluster,
) -> None:
    nodes = cluster.nodes[:3]
    user = await new_user(nodes[0])
    statuses: list[int] = []
    started = trio.current_time()

    async def client(index: int) -> None:
        node = nodes[index % len(nodes)]
        async with httpx.AsyncClient(base_url=node.url, timeout=20) as http:
            for _ in range(10):
                response = await http.get("/api/v1/projects", headers=user.headers)
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert int(response.headers["Retry-After"]) >= 1

    async with trio.open_nursery() as nursery:
        for index in range(30):  # 300 requests, ten clients per node, as fast as they go
            nursery.start_soon(client, index)
    elapsed = trio.current_time() - started
    accepted = statuses.count(200)
    assert set(statuses) <= {200, 429} and len(statuses) == 300
    one_budget = USER_BURST + USER_RATE_PER_S * elapsed
    # Three separate buckets would have let through at least 3 x 60 = 180.
    assert accepted <= one_budget + USER_BURST / 3, (accepted, one_budget, elapsed)
    assert accepted >= 0.6 * USER_BURST, (accepted, one_budget)


async def test_a_websocket_burst_within_the_budget_is_not_refused_by_a_nodes_share(
    cluster: Cluster,
) -> None:
    """A new user's burst of ops on one node, within the user's budget: the node's lease (a
    share of the burst) runs dry, and the ops wait for the shared bucket instead of being
    refused ``rate_limited``; their replies come in order."""
    user = await new_user(cluster.nodes[0])
    # Within what the user has left: registration and the project were charged on node 0,
    # which still holds its share (a fifth of the burst) in its lease.
    burst = USER_BURST * 2 // 3
    async with ws_client(cluster.nodes[1], user) as client:
        refs = [f"b{i}" for i in range(burst)]
        for ref in refs:  # all written before any reply is read
            await client.ws.send_message(json.dumps({"op": "ping", "ref": ref}))
        await client.wait_for(lambda: all(ref in client._replies for ref in refs), timeout=30)
        refused = [ref for ref in refs if not client._replies[ref]["ok"]]
        assert refused == [], [client._replies[ref] for ref in refused[:3]]
        assert client.reply_refs[-burst:] == refs
