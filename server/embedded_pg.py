"""The embedded PostgreSQL used when no THREADLINE_DATABASE_URL is configured.

It is the real PostgreSQL shipped in the ``pgserver`` wheel, its files kept under
``<data_dir>/pgdata`` across restarts and reached over a Unix socket only (no TCP port is opened).

Supervision: ``threadline serve`` watches the postmaster (``EmbeddedPostgres.supervise``) and
starts it again when it dies (SIGKILL, OOM killer), on the same socket, hence the same DSN;
PostgreSQL's crash recovery replays its WAL, so every committed transaction is there. Several
processes may share one data dir and all notice the death at once: a restart happens only under
pgserver's inter-process lock and only if, once the lock is held, no postmaster runs and no
process of the dead cluster is left (a new postmaster beside surviving old backends could
corrupt the data files). Whoever comes second finds it running and does nothing.

A process may also miss the death altogether: a restart takes as little as 0.1 s, less than a
starved process's gap between two looks. Each look therefore compares the running postmaster's pid
with the one this process last saw; a new one (started by another process) counts as a death seen
and a restart that was not ours, and pgserver's record of "its" postmaster is pointed at it, so
that whichever process lets go last stops the postmaster that actually runs (pgserver would
otherwise check the dead one, find it gone once it has been reaped, and leave PostgreSQL running).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import structlog
import trio

from server import metrics

log = structlog.get_logger(__name__)

# How often the supervisor looks at the postmaster (a pid file read and a process lookup).
SUPERVISE_INTERVAL_S = 0.5
_START_TIMEOUT_S = 60.0  # pg_ctl start -w: includes crash recovery


def _pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR under root
        import pgserver

    return pgserver


class NotYet(Exception):
    """The dead cluster still has live processes; a start now would be unsafe."""


class EmbeddedPostgres:
    """A handle on the embedded server: its DSN, its state, and a supervisor that restarts it.

    ``state`` is ``running``, ``down`` (found dead, waiting for the old processes to go) or
    ``restarting`` (pg_ctl start in progress); ``/readyz`` shows it with the restart count.
    """

    def __init__(self, server: Any, pgdata: Path) -> None:
        self._server = server
        self.pgdata = pgdata
        info = server.get_postmaster_info()
        self.dsn: str = server.get_uri()
        self._socket_dir = str(info.socket_dir)
        self.state = "running"
        self.postmaster_pid: int | None = self._read_postmaster_pid()  # the one last seen running
        self.restarts = 0  # restarts this process performed
        self.deaths_seen = 0  # postmasters this process saw die or replaced by another process
        self.last_error: str | None = None
        self.restarted_at: float | None = None  # trio.current_time() of the last restart
        self._changed = trio.Event()

    # -- looking -----------------------------------------------------------------------

    def _read_postmaster_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """The postmaster named in ``postmaster.pid`` is alive (a zombie is dead)."""
        pid = self._read_postmaster_pid()
        return pid is not None and _alive(pid)

    def _leftovers(self) -> list[int]:
        """Live processes of a dead cluster: postgres processes run in the data directory."""
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] != "postgres":
                continue
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == self.pgdata:
                    found.append(proc.pid)
        return found

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``{"state", "restarts"}`` and the last restart error, if any."""
        result: dict[str, Any] = {"state": self.state, "restarts": self.restarts}
        if self.last_error is not None:
            result["last_error"] = self.last_error
        return result

    # -- restarting --------------------------------------------------------------------

    def ensure_running(self) -> bool:
        """Start the postmaster if it is dead; True if this call started it. Blocking.

        Raises NotYet while processes of the dead cluster remain, CalledProcessError or
        TimeoutExpired if pg_ctl fails.
        """
        pgserver = _pgserver()
        with pgserver.PostgresServer._lock:  # the lock pgserver itself starts servers under
            if self.is_running():
                return False  # another process restarted it first
            leftovers = self._leftovers()
            if leftovers:
                raise NotYet(f"{len(leftovers)} processes of the dead server remain")
            # The lock files name a dead postmaster and nothing else of it runs: remove them,
            # or postgres refuses to start while that pid is a zombie no one has reaped yet.
            for lock in (
                self.pgdata / "postmaster.pid",
                Path(self._socket_dir) / ".s.PGSQL.5432.lock",
            ):
                _remove_stale_lock(lock)
            user = self._server.system_user
            pgserver._commands.pg_ctl(
                [
                    "-w",
                    "-t",
                    str(int(_START_TIMEOUT_S)),
                    "-o",
                    '-h ""',
                    "-o",
                    f"-k {self._socket_dir}",
                    # Crash recovery first syncs the data directory: one syncfs() instead of
                    # an fsync() per file (seconds on a busy disk).
                    "-o",
                    "-c recovery_init_sync_method=syncfs",
                    "-l",
                    str(self.pgdata / "log"),
                    "start",
                ],
                pgdata=self.pgdata,
                user=user,
                timeout=_START_TIMEOUT_S + 5,
            )
            self.adopt_running_postmaster()
            return True

    def adopt_running_postmaster(self) -> int | None:
        """Point pgserver's record of "its" postmaster at the one running now; its pid, or None.

        pgserver stops that postmaster when the last process lets go of the data dir, and it
        checks the process it recorded at start: after a restart (by any process) that one is
        dead. None while no postmaster runs or its ``postmaster.pid`` is still being written.
        """
        try:
            info = _pgserver().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        except (OSError, ValueError, LookupError, AssertionError):  # a file not yet whole
            return None
        if info is None or not _alive(info.pid):
            return None
        self._server._postmaster_info = info
        return int(info.pid)

    async def supervise(self, interval_s: float = SUPERVISE_INTERVAL_S) -> None:
        """Watch the postmaster until cancelled; start it again when it has died."""
        while True:
            await trio.sleep(interval_s)
            pid = self._read_postmaster_pid()
            if pid is not None and _alive(pid):
                if pid != self.postmaster_pid:
                    self._replaced(pid)
                elif self.state != "running":
                    self._set("running")
                continue
            if self.state == "running":
                self.deaths_seen += 1
                log.error("db.embedded.died", pgdata=str(self.pgdata))
                self._set("down")
            try:
                self._set("restarting")
                started = await trio.to_thread.run_sync(self.ensure_running, abandon_on_cancel=True)
            except NotYet as exc:
                if self.last_error != str(exc):
                    log.info("db.embedded.waiting", reason=str(exc))
                self._set("down", str(exc))
                continue
            except (subprocess.SubprocessError, OSError) as exc:
                self._set("down", f"pg_ctl start failed ({type(exc).__name__})")
                log.warning("db.embedded.restart_failed", error=type(exc).__name__)
                continue
            self.last_error = None
            self.postmaster_pid = self.adopt_running_postmaster()
            if started:
                self.restarts += 1
                self.restarted_at = trio.current_time()
                metrics.DB_EMBEDDED_RESTARTS.inc()
                log.warning("db.embedded.restarted", pgdata=str(self.pgdata))
            self._set("running")

    def _replaced(self, pid: int) -> None:
        """A postmaster this process did not start runs now: another process restarted it."""
        if self.adopt_running_postmaster() != pid:
            return  # its postmaster.pid is still being written: look again next time
        if self.state == "running" and self.postmaster_pid is not None:
            self.deaths_seen += 1  # the death happened between two looks
        self.postmaster_pid = pid
        self.last_error = None
        log.warning("db.embedded.replaced", pgdata=str(self.pgdata), postmaster_pid=pid)
        self._set("running")

    def _set(self, state: str, error: str | None = None) -> None:
        self.state = state
        if error is not None:
            self.last_error = error
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked at each change of state (tests, tools)."""
        while not predicate():
            await self._changed.wait()


def _remove_stale_lock(path: Path) -> None:
    """Remove a PostgreSQL lock file whose first line names a process that is not alive."""
    try:
        pid = int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if not _alive(pid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@contextlib.contextmanager
def open_embedded(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """Start (or join) the embedded server for ``data_dir``; yield its handle; stop it on exit.

    Stopping happens when the last process using the same data dir lets go of it, so a second
    ``threadline`` command against the same data dir (a migration, say) does not stop the server.
    """
    pgserver = _pgserver()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    log.info("db.embedded.starting", pgdata=str(pgdata))
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    handle: EmbeddedPostgres | None = None
    try:
        handle = EmbeddedPostgres(server, pgdata)
        log.info("db.embedded.ready", pgdata=str(pgdata))
        yield handle
    finally:
        _forget_dead_users(server)
        if handle is not None:  # pgserver stops the postmaster it recorded: the one running now
            handle.adopt_running_postmaster()
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


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Like ``open_embedded``, yielding only the DSN."""
    with open_embedded(data_dir) as handle:
        yield handle.dsn
