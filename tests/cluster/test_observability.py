"""Contract section 6: the ``cluster`` check in /readyz lists the live nodes; the cluster metrics
are exported; every log line names its node."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import (
    Cluster,
    durable,
    new_thread,
    new_user,
    rest_send,
    subscribe,
    ws_client,
)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_the_cluster_check_and_metrics_on_every_node(cluster: Cluster) -> None:
    names = {node.name for node in cluster.nodes[:3]}
    one, two, _ = cluster.nodes[:3]
    user = await new_user(one)
    thread_id = await new_thread(one, user)
    async with ws_client(two, user) as watcher:  # some broker traffic to count
        await subscribe(watcher, thread_id, after_seq=0)
        await rest_send(one, user, thread_id, "counted")
        await watcher.wait_for(lambda: len(durable(watcher, thread_id)) >= 1)
    for node in cluster.nodes[:3]:
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
            ready = await http.get("/readyz")
            exposition = (await http.get("/metrics")).text
        assert ready.status_code == 200, ready.text
        check = ready.json()["checks"]["cluster"]
        assert check["ok"] is True and check["node_id"] == node.name
        listed = {n["node_id"] for n in check["nodes"]}
        assert names <= listed and check["live"] == len(check["nodes"])
        assert [n["self"] for n in check["nodes"] if n["node_id"] == node.name] == [True]
        assert check["broker"]["connected"] is True
        assert check["rate_limits"]["mode"] == "cluster"
        samples = _samples(exposition)
        assert samples[("threadline_cluster_nodes", ())] == check["live"] >= 3
        assert samples[("threadline_broker_messages_total", (("direction", "in"),))] > 0
        assert samples[("threadline_broker_lag_seconds_count", ())] > 0
    for node in cluster.nodes[:3]:
        lines = node.logs()
        assert lines and all(line.get("node_id") == node.name for line in lines)
