"""A short real load test: fake LLM + server + locust as processes; no request may fail."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_locust_run_ends_without_failures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtests" / "run_locust.py"),
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--run-time",
            "6s",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with (out / "threadline_stats.csv").open() as fh:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 10, rows.keys()
    assert int(total["Failure Count"]) == 0, (out / "threadline_failures.csv").read_text()
    for expected in [
        ("POST", "/api/v1/auth/register"),
        ("POST", "/api/v1/auth/login"),
        ("GET", "/api/v1/threads/[id]/messages"),
        ("WS", "connect"),
        ("WS", "subscribe"),
        ("WS", "send"),
        ("WS", "time_to_first_delta"),
        ("WS", "assistant_completed"),
    ]:
        assert expected in rows, f"{expected} never ran: {sorted(rows)}"
        assert int(rows[expected]["Request Count"]) > 0
    assert (out / "report.html").stat().st_size > 0
    # The server's own metrics after the run saw the traffic and the replies.
    exposition = (out / "metrics.txt").read_text()
    assert (
        'threadline_http_requests_total{method="POST",route="/api/v1/auth/login",status="200"}'
        in (exposition)
    )
    assert "threadline_llm_time_to_first_token_seconds_count" in exposition
