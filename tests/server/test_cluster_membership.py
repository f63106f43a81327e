"""Cluster membership: each server is a node with a row in ``nodes``, listed by /readyz."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from server.cluster import Cluster
from server.config import ConfigError, load_settings
from server.db import Database
from server.logs import _add_node_id, set_node_id
from server.runtime import open_server
from tests.conftest import make_settings


async def _readyz(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_two_servers_see_each_other_and_a_stopped_one_leaves(
    tmp_path: Path, pg_dsn: str
) -> None:
    a_settings = make_settings(tmp_path / "a", node_id="node-a-" + uuid.uuid4().hex[:6])
    b_settings = make_settings(tmp_path / "b", node_id="node-b-" + uuid.uuid4().hex[:6])
    async with open_server(a_settings, pg_dsn, bind="127.0.0.1:0") as a:
        async with open_server(b_settings, pg_dsn, bind="127.0.0.1:0") as b:
            cluster_a: Cluster = a.services.extras["cluster"]
            await cluster_a.beat()  # a's view is refreshed by its heartbeat; do one now
            check = (await _readyz(a.url))["checks"]["cluster"]  # type: ignore[index]
            assert check["ok"] is True and check["node_id"] == a_settings.node_id
            listed = {n["node_id"]: n for n in check["nodes"]}
            assert {a_settings.node_id, b_settings.node_id} <= set(listed)
            assert listed[a_settings.node_id]["self"] is True
            assert listed[b_settings.node_id]["self"] is False
            assert listed[b_settings.node_id]["url"] is None or "127.0.0.1" in str(
                listed[b_settings.node_id]["url"]
            )
            b_incarnation = b.services.extras["cluster"].incarnation
        # b stopped cleanly: its row is gone at once, not after the timeout.
        rows = await a.services.db.fetchval(
            "SELECT count(*) FROM nodes WHERE incarnation = $1", b_incarnation
        )
        assert rows == 0
        await cluster_a.beat()
        assert b_settings.node_id not in {n.node_id for n in cluster_a.nodes}


async def test_a_node_that_stops_beating_drops_out_after_the_timeout(db: Database) -> None:
    """Liveness is judged on the database's clock: a row older than the timeout is dead."""
    settings = make_settings(Path("/tmp"), node_timeout_s=2.0)
    observer = Cluster(db, settings)
    await observer.join()
    silent = str(uuid.uuid4())
    await db.fetchval(
        """INSERT INTO nodes (incarnation, node_id, host, pid, started_at, last_seen_at)
           VALUES ($1, 'silent', 'h', 1, now() - interval '10 s', now() - interval '1 s')""",
        silent,
    )
    await observer.beat()
    assert silent in observer.live_incarnations()
    await db.fetchval(
        "UPDATE nodes SET last_seen_at = now() - interval '3 s' WHERE incarnation = $1", silent
    )
    await observer.beat()
    assert silent not in observer.live_incarnations()
    assert observer.health()["live"] == len(observer.nodes)
    await db.fetchval("DELETE FROM nodes WHERE incarnation = $1", silent)
    await observer.leave()


async def test_two_live_processes_under_one_node_id_are_reported(db: Database) -> None:
    settings = make_settings(Path("/tmp"), node_id="twin-" + uuid.uuid4().hex[:6])
    first, second = Cluster(db, settings), Cluster(db, settings)
    await first.join()
    await second.join()
    await first.beat()
    assert first.health()["duplicate_node_ids"] == [settings.node_id]
    await second.leave()
    await first.beat()
    assert "duplicate_node_ids" not in first.health()
    await first.leave()


async def test_a_failing_heartbeat_turns_the_check_red_after_the_timeout(db: Database) -> None:
    clock_settings = make_settings(Path("/tmp"), node_timeout_s=0.5)
    cluster = Cluster(db, clock_settings)
    assert cluster.health()["ok"] is False  # never beaten: not part of the cluster yet
    await cluster.join()
    assert cluster.health()["ok"] is True
    # The last successful beat, moved back past the timeout (as if the database stopped answering).
    cluster._last_ok = trio.current_time() - 0.6
    assert cluster.health()["ok"] is False
    await cluster.leave()


def test_node_ids_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_NODE_ID", "bad id with spaces")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "THREADLINE_NODE_ID" in str(err.value)
    monkeypatch.setenv("THREADLINE_NODE_ID", "web-1.eu_west")
    assert load_settings().node_id == "web-1.eu_west"
    monkeypatch.delenv("THREADLINE_NODE_ID")
    assert load_settings().node_id.endswith(f"-{__import__('os').getpid()}")


def test_every_log_line_names_the_node() -> None:
    set_node_id("node-logs")
    try:
        with capture_logs(processors=[_add_node_id]) as logs:
            import structlog

            structlog.get_logger("t").info("some.event", x=1)
        assert logs[0]["node_id"] == "node-logs"
        assert json.dumps(logs[0])  # still one flat JSON object
    finally:
        set_node_id(None)
