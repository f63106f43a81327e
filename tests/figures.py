"""Figures measured by the proof tests, printed in pytest's terminal summary.

``make test`` runs pytest without ``-s``; a test calls ``record("property", key=value, ...)`` and
the figures appear at the end of the run (and in ``$THREADLINE_FIGURES``, a JSON-lines file, when
that is set), so docs/reliability.md quotes real runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

RECORDED: list[tuple[str, dict[str, Any]]] = []


def record(name: str, **figures: Any) -> None:
    """Keep one line of figures for the summary."""
    RECORDED.append((name, figures))
    path = os.environ.get("THREADLINE_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"name": name, **figures}, default=str) + "\n")


def summary_lines() -> list[str]:
    return [
        f"{name}: " + ", ".join(f"{key}={value}" for key, value in figures.items())
        for name, figures in RECORDED
    ]
