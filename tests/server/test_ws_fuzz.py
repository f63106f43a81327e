"""Hostile WebSocket input (issue 12, item 1), quick version: ``loadtests/ws_fuzz.py`` against a
``threadline serve`` subprocess, over raw sockets with hand-built frames.

Two rounds of every case (the first warms up for the memory figure): about 1,900 hostile frames
over 200 connections plus half-finished handshakes. ``make soak`` runs many more rounds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import trio

from loadtests import ws_fuzz
from server.runtime import open_server
from tests.conftest import make_settings
from tests.server.ws_support import new_owner


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


async def test_a_ping_flood_is_rate_limited_like_ops(tmp_path: Path, pg_dsn: str) -> None:
    # Every Ping costs the server a Pong: pings are charged like ops, and a flood ends 4029.
    settings = make_settings(
        tmp_path, rate_limit_per_s=5.0, rate_limit_burst=20, ws_abuse_strikes=10
    )
    async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as server:
        owner = await new_owner(server.services)
        host, port = server.url.removeprefix("http://").split(":")
        peer = await ws_fuzz.Peer.open(host, int(port), owner.token)
        for _ in range(200):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await peer.send(ws_fuzz.frame(ws_fuzz.PING, b"flood"))
        with trio.fail_after(ws_fuzz.OUTCOME_TIMEOUT_S):
            await peer.read_until(lambda: peer.close_code is not None)
        assert peer.close_code == 4029
        # Pongs came back for the pings admitted before the close (about the burst).
        assert 0 < peer.pongs <= 200
        await peer.stream.aclose()
