"""The embedded PostgreSQL used when no THREADLINE_DATABASE_URL is configured.

It is the real PostgreSQL shipped in the ``pgserver`` wheel, its files kept under
``<data_dir>/pgdata`` across restarts and reached over a Unix socket only (no TCP port is opened).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or join) the embedded server for ``data_dir``; yield its DSN; stop it on exit.

    Stopping happens when the last process using the same data dir lets go of it, so a second
    ``threadline`` command against the same data dir (a migration, say) does not stop the server.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under root
        import pgserver

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    log.info("db.embedded.starting", pgdata=str(pgdata))
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        uri: str = server.get_uri()
        log.info("db.embedded.ready", pgdata=str(pgdata))
        yield uri
    finally:
        _forget_dead_users(server)
        server.cleanup()
        log.info("db.embedded.released", pgdata=str(pgdata))


def _forget_dead_users(server: object) -> None:
    """Drop processes that died without letting go (SIGKILL) from pgserver's list of users.

    pgserver stops the server when the last process on its list lets go; a node killed with
    SIGKILL stays on that list forever, so without this the last survivor of a cluster on one
    data dir would leave PostgreSQL running after it exits.
    """
    users = server.global_process_id_list  # type: ignore[attr-defined]
    with server._lock:  # type: ignore[attr-defined]  # pgserver's own inter-process lock
        for pid in users.get():
            if pid != os.getpid() and not _alive(pid):
                users.get_and_remove(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
