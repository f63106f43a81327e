"""What every benchmark under ``loadtests/`` needs, in one place (keep this API small and stable).

* ``free_port()``, ``raise_nofile_limit()``;
* ``percentile(values, q)`` (q in 0-100) and ``percentiles(values)`` -> ``{"p50": .., "p99": ..}``;
* ``database()``: a migrated PostgreSQL for the run (``THREADLINE_TEST_DATABASE_URL`` or an
  embedded one in a temporary directory);
* ``bench_env()``: the environment a benchmarked ``threadline serve`` runs with (rate limits out
  of the way, cheap password hashing, quiet logs);
* ``server_process(argv, env, ready)``: a server subprocess, yielding ``(pid, base_url)`` once
  its first line starts with ``ready`` (``"threadline: serving on"``); SIGTERM on exit;
* ``revision_tree(rev)``: an older revision's files, to run beside the current code;
* ``cpu_seconds(pid)``, ``cpu_split(pid)`` (user, system), ``rss_bytes(pid)``,
  ``postgres_backends(dsn)``, ``cpu_of(procs)``;
* ``ClientProcesses(target, shares)``: the load generator in processes of its own. Each share
  runs ``target(share, link)`` in a spawned process; ``link.ready(info)`` tells the driver it is
  set up, ``link.stopping()`` says whether the driver asked it to stop, ``link.result(value)``
  hands its figures back. The driver calls ``wait_ready()``, ``stop()`` and ``results()``.

Each benchmark process is plain Python (no event loop needed in the driver); client targets
may run whatever loop they like. A target must be importable (a module-level function of a
module under ``loadtests/``): processes are spawned, not forked.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so spawned client processes can import ``loadtests.*``
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def percentiles(values: Sequence[float], qs: Iterable[float] = (50, 99)) -> dict[str, float]:
    """``{"p50": .., "p99": ..}`` of ``values`` (one sort)."""
    ordered = sorted(values)
    return {f"p{q:g}": percentile(ordered, q) for q in qs}


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A migrated database for the run: external if configured, else embedded in a temp dir."""
    from server import migrate

    external = os.environ.get("THREADLINE_TEST_DATABASE_URL")
    if external:
        migrate.upgrade(external)
        yield external
        return
    from server.embedded_pg import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        os.chmod(tmp, 0o777)  # the embedded server may run as another user when we are root
        with embedded_postgres(Path(tmp)) as dsn:
            migrate.upgrade(dsn)
            yield dsn


def bench_env(**overrides: str) -> dict[str, str]:
    """The environment of a benchmarked ``threadline serve`` (ours, with ``overrides``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LOG_FORMAT="json",
        THREADLINE_RATE_LIMIT_PER_S="1000000",
        THREADLINE_RATE_LIMIT_BURST="1000000",
        THREADLINE_IP_RATE_LIMIT_PER_S="1000000",
        THREADLINE_IP_RATE_LIMIT_BURST="1000000",
        THREADLINE_DB_POOL_MAX="20",
        THREADLINE_ARGON2_TIME_COST="1",
        THREADLINE_ARGON2_MEMORY_KIB="8",
        THREADLINE_ARGON2_PARALLELISM="1",
    )
    env.update(overrides)
    return env


@contextlib.contextmanager
def server_process(
    argv: Sequence[str],
    env: dict[str, str],
    ready: str,
    *,
    timeout_s: float = 120.0,
    cwd: Path | None = None,
) -> Iterator[tuple[int, str]]:
    """Run ``python argv...``; yield (pid, base URL: the last word of its first line).

    ``BENCH_PYTHON_ARGS`` (e.g. ``-X importtime``) goes before ``argv``. The process is sent
    SIGTERM on exit, and killed if it has not stopped within 30 s.
    """
    raise_nofile_limit()  # the child inherits it
    proc = subprocess.Popen(
        [sys.executable, *os.environ.get("BENCH_PYTHON_ARGS", "").split(), *argv],
        env=env,
        cwd=cwd or ROOT,  # another checkout's directory runs that checkout's code
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(ready):
            raise SystemExit(f"{list(argv)} did not start: {line!r}")
        yield proc.pid, line.rsplit(" ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def revision_tree(rev: str) -> Iterator[Path]:
    """Revision ``rev`` of this repository, extracted into a temporary directory (``git
    archive``: the repository and its worktrees are not touched). Run a server from it with
    ``server_process(..., cwd=tree)`` to compare it with the current code in the same run."""
    with tempfile.TemporaryDirectory(prefix="tl-bench-rev-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user), float(times.system)


def rss_bytes(pid: int) -> int:
    """The process's resident set size."""
    return int(psutil.Process(pid).memory_info().rss)


def postgres_backends(dsn: str | None = None) -> list[psutil.Process]:
    """Running ``postgres`` processes (the postmaster and its backends).

    With the ``dsn`` of an embedded server (a Unix socket ``host=`` directory), only that
    server's, so the other PostgreSQL servers on a shared machine are not counted; an external
    server's ``dsn`` gives none (its CPU is not ours to read). Without ``dsn``, every one.
    """
    procs = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "postgres"]
    if dsn is None:
        return procs
    socket_dir = (parse_qs(urlsplit(dsn).query).get("host") or [""])[0]
    if not socket_dir:
        return []
    for proc in procs:
        if socket_dir in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                return [proc, *proc.children(recursive=True)]
    return []


def cpu_of(procs: Iterable[psutil.Process]) -> dict[int, float]:
    """CPU seconds used so far by each process still alive, by pid."""
    out = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            out[proc.pid] = sum(proc.cpu_times()[:2])
    return out


class ClientLink:
    """A client process's side of ``ClientProcesses`` (picklable; passed to the target)."""

    def __init__(self, index: int, queue: Any, stop: Any) -> None:
        self.index = index
        self._queue = queue
        self._stop = stop

    def ready(self, info: Any = None) -> None:
        """Tell the driver this process is set up (connected, subscribed...)."""
        self._queue.put(("ready", self.index, info))

    def stopping(self) -> bool:
        """Whether the driver has called ``stop()``."""
        return bool(self._stop.is_set())

    def result(self, value: Any) -> None:
        """Hand this process's figures to the driver (once, at the end)."""
        self._queue.put(("result", self.index, value))


def _client_main(target: Callable[[Any, ClientLink], None], share: Any, link: ClientLink) -> None:
    raise_nofile_limit()
    try:
        target(share, link)
    except BaseException as exc:
        link._queue.put(("error", link.index, f"{type(exc).__name__}: {exc}"))
        raise


class ClientProcesses:
    """Run ``target(share, link)`` in one spawned process per share (a context manager)."""

    def __init__(self, target: Callable[[Any, ClientLink], None], shares: Sequence[Any]) -> None:
        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self._procs = [
            ctx.Process(
                target=_client_main,
                args=(target, share, ClientLink(i, self._queue, self._stop)),
                daemon=True,
            )
            for i, share in enumerate(shares)
        ]
        self._pending: dict[str, dict[int, Any]] = {"ready": {}, "result": {}}

    def __enter__(self) -> ClientProcesses:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _collect(self, kind: str, timeout_s: float) -> list[Any]:
        import queue as queue_module
        import time

        deadline = time.monotonic() + timeout_s
        got = self._pending[kind]
        while len(got) < len(self._procs):
            try:
                what, index, value = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue_module.Empty:
                raise TimeoutError(
                    f"{len(got)}/{len(self._procs)} client processes reported {kind!r}"
                ) from None
            if what == "error":
                raise RuntimeError(f"client process {index} failed: {value}")
            self._pending[what][index] = value
        return [got[i] for i in range(len(self._procs))]

    def wait_ready(self, timeout_s: float = 120.0) -> list[Any]:
        """Every process's ``ready`` info, in share order."""
        return self._collect("ready", timeout_s)

    def stop(self) -> None:
        """Ask every process to stop (``link.stopping()`` turns true)."""
        self._stop.set()

    def results(self, timeout_s: float = 120.0) -> list[Any]:
        """Every process's result, in share order."""
        return self._collect("result", timeout_s)
