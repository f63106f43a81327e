"""The broker's log during an outage: one warning for the loss, one for the reconnection."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from structlog.testing import capture_logs

from server.broker import PgBroker
from server.db import Database


async def test_an_outage_logs_one_loss_and_one_reconnection_with_the_attempts(
    db: Database,
) -> None:
    broker = PgBroker(db, "incarnation-1", "node-1")
    listener: Any = SimpleNamespace(backend_pid=1)
    with capture_logs() as logs:
        broker._on_connected(listener)  # the first connection
        broker._on_lost("ConnectionResetError")  # the database goes away
        for _ in range(5):  # five reconnection attempts fail, a second apart
            broker._on_lost("ConnectionRefusedError")
        broker._on_connected(listener)
    warnings = [(e["event"], e.get("failed_attempts")) for e in logs if e["log_level"] == "warning"]
    assert warnings == [("broker.connection_lost", None), ("broker.reconnected", 5)]
    failed = [e for e in logs if e["event"] == "broker.reconnect_failed"]
    assert [e["log_level"] for e in failed] == ["debug"] * 5
    assert broker.connected and broker.last_error == "ConnectionRefusedError"
