"""Hostile WebSocket input (issue 12, item 1), quick version: ``loadtests/ws_fuzz.py`` against a
``threadline serve`` subprocess, over raw sockets with hand-built frames.

Two rounds of every case (the first warms up for the memory figure): about 1,900 hostile frames
over 200 connections plus half-finished handshakes. ``make soak`` runs many more rounds.
"""

from __future__ import annotations

import json

from loadtests import ws_fuzz


def test_hostile_frames_get_the_right_close_and_leave_nothing_behind(pg_dsn: str) -> None:
    figures = ws_fuzz.run(pg_dsn, rounds=2, concurrency=8, seed=20261202)
    print(json.dumps(figures, indent=2))  # the figures docs/reliability.md quotes
    assert figures["hostile_frames"] >= 1000
    # Every connection got the outcome its input deserves, within 5 s of its last frame.
    assert figures["failures"] == []
    assert figures["time_to_outcome_s"]["max"] <= ws_fuzz.OUTCOME_TIMEOUT_S
    outcomes = figures["outcomes"]
    for code in ("1002", "1007", "1009", "4003", "alive", "dropped"):
        assert outcomes.get(code, 0) > 0, (code, outcomes)
    # The server said why it closed (metrics), and logged no error doing it.
    by_reason = figures["server_disconnects_by_reason"]
    assert by_reason.get("protocol_error", 0) > 0 and by_reason.get("invalid_data", 0) > 0
    assert figures["server_error_log_lines"] == []
    # Ready throughout; nothing left behind.
    assert figures["readyz_polls"] > 0 and figures["readyz_failures"] == 0
    assert figures["close_wait_after"] == 0
    assert figures["open_websockets_after"] == 0
    assert figures["rss_growth_mb"] < 30
