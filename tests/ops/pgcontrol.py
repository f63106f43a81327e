"""Stop and start a test's own embedded PostgreSQL, as pgserver itself runs it.

pgserver runs ``postgres`` as the ``pgserver`` system user when the caller is root, listening on a
Unix socket only; the socket directory is read back from ``postmaster.pid`` so a restarted server
answers on the same DSN.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pgserver
import psutil

PG_CTL = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"


def _run_as() -> str | None:
    return "pgserver" if os.geteuid() == 0 else None


def socket_dir(pgdata: Path) -> str:
    """The ``-k`` socket directory of the running server (line 5 of ``postmaster.pid``)."""
    return (pgdata / "postmaster.pid").read_text().splitlines()[4].strip()


def is_running(pgdata: Path) -> bool:
    result = subprocess.run(
        [str(PG_CTL), "-D", str(pgdata), "status"],
        user=_run_as(),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PG_CTL), "-D", *args], user=_run_as(), capture_output=True, text=True, check=False
    )


def stop(pgdata: Path) -> None:
    """Fast shutdown: open sessions are terminated, as in a real database outage."""
    result = _pg_ctl(str(pgdata), "-m", "fast", "-w", "-t", "30", "stop")
    # What matters is that the server is down; pg_ctl's own exit status has been seen to be 1
    # for a shutdown that completed (see the server log), so check the outcome itself.
    if result.returncode != 0 and is_running(pgdata):
        raise RuntimeError(f"pg_ctl stop failed ({result.returncode}): {result.stderr}")


def start(pgdata: Path, sockets: str) -> None:
    """Start it again on the same socket directory, hence the same DSN."""
    result = _pg_ctl(
        str(pgdata),
        "-w",
        "-t",
        "30",
        "-o",
        '-h ""',
        "-o",
        f"-k {sockets}",
        "-l",
        str(pgdata / "log"),
        "start",
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed ({result.returncode}): {result.stderr}")


def freeze(pgdata: Path, sig: signal.Signals = signal.SIGSTOP) -> None:
    """Stop (or, with SIGCONT, resume) the postmaster and every backend: a silent database."""
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    postmaster = psutil.Process(pid)
    for proc in [postmaster, *postmaster.children(recursive=True)]:
        proc.send_signal(sig)


def thaw(pgdata: Path) -> None:
    freeze(pgdata, signal.SIGCONT)
