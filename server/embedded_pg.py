"""The embedded PostgreSQL used when no THREADLINE_DATABASE_URL is configured.

It is the real PostgreSQL shipped in the ``pgserver`` wheel, its files kept under
``<data_dir>/pgdata`` across restarts and reached over a Unix socket only (no TCP port is opened).
"""

from __future__ import annotations

import contextlib
import logging
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
        server.cleanup()
        log.info("db.embedded.released", pgdata=str(pgdata))
