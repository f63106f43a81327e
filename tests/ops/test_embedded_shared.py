"""Several processes on one embedded data dir (a cluster on one host): when the postmaster dies,
exactly one of them starts it again, a process that missed the death entirely follows the new
postmaster, and whichever process lets go last stops the postmaster that actually runs.

The test process reaps the killed postmaster as a real init does (it makes itself a child
subreaper, so orphans of its descendants become its children): the dead postmaster is then gone,
not a zombie that would still look like a running process to pgserver.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.figures import record

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="child subreapers are Linux's")

_PR_SET_CHILD_SUBREAPER = 36

# A process holding the data dir. With "now" it supervises at once; otherwise it waits for a
# "go" line first (it misses the death, as a starved process does). It prints "running ..."
# once a new postmaster runs and it is back to state running, then holds until stdin closes.
_WATCHER = """
import sys, trio
from pathlib import Path
from server.embedded_pg import open_embedded

async def main(handle):
    first = handle.postmaster_pid
    print("watching", flush=True)
    if sys.argv[2] != "now":
        await trio.to_thread.run_sync(sys.stdin.readline)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle.supervise, 0.05)
        with trio.fail_after(60):  # else the test would read our output forever
            await handle.wait_until(
                lambda: handle.state == "running" and handle.postmaster_pid not in (None, first)
            )
        print(f"running restarts={handle.restarts} deaths={handle.deaths_seen}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # hold the handle until the test is done
        nursery.cancel_scope.cancel()

with open_embedded(Path(sys.argv[1])) as handle:
    trio.run(main, handle)
"""


@contextmanager
def _child_subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) refused")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _watcher(data_dir: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(data_dir), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: subprocess.Popen[str], prefix: str) -> str:
    """The next line of ``proc``'s output that starts with ``prefix`` (logs are skipped)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"the watcher ended before printing {prefix!r}")


def _field(line: str, name: str) -> int:
    return int(line.split(f"{name}=", 1)[1].split()[0])


def _cluster_processes(pgdata: Path) -> list[int]:
    """Live (not zombie) postgres processes running in ``pgdata``."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (
                proc.info["name"] == "postgres"
                and proc.status() != psutil.STATUS_ZOMBIE
                and Path(proc.cwd()) == pgdata
            ):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def _reap(pids: list[int], timeout_s: float = 30.0) -> None:
    """Reap these exited orphans (adopted as a subreaper); only these: other children of the
    test process (servers of other fixtures) are not ours to wait for."""
    left = set(pids)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child, or reaped already
                done = pid
            if done:
                left.discard(pid)
        if left:
            time.sleep(0.05)  # polling exits of processes we cannot wait on as a group


def test_processes_sharing_a_data_dir_restart_the_database_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two processes race to restart a SIGKILLed postmaster: one does; a third, starved through
    the whole restart, follows the new postmaster; the last to let go stops it."""
    data_dir = tmp_path_factory.mktemp("shared-pg")
    pgdata = data_dir.resolve() / "pgdata"
    adopted: list[int] = []  # postgres processes orphaned to this test process: reaped at the end
    with _child_subreaper():
        racing = [_watcher(data_dir, "now") for _ in range(2)]
        late = _watcher(data_dir, "later")
        watchers = [*racing, late]
        try:
            for proc in watchers:
                _line(proc, "watching")
            log = pgdata / "log"
            ready_before = log.read_text().count("ready to accept connections")
            postmaster = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
            adopted += _cluster_processes(pgdata)
            os.kill(postmaster, signal.SIGKILL)  # the postmaster only; its children follow
            os.waitpid(postmaster, 0)  # reaped at once, as by a real init: no zombie lingers
            lines = [_line(proc, "running") for proc in racing]  # each once it runs again
            restarts = sorted(_field(line, "restarts") for line in lines)
            assert restarts == [0, 1], lines
            # The late process never saw the postmaster dead: it finds another in its place.
            assert late.stdin is not None
            late.stdin.write("go\n")
            late.stdin.flush()
            late_line = _line(late, "running")
            assert (_field(late_line, "restarts"), _field(late_line, "deaths")) == (0, 1)
            assert log.read_text().count("ready to accept connections") == ready_before + 1
            adopted += _cluster_processes(pgdata)
            # Let go in this order: the restarter, the other racer, the late one (last, it
            # is the one that stops the server; before the fix it checked the dead postmaster).
            order = sorted(racing, key=lambda p: -_field(lines[racing.index(p)], "restarts"))
            for proc in [*order, late]:
                assert proc.stdin is not None
                proc.stdin.close()
                assert proc.wait(timeout=90) == 0  # the last one stops PostgreSQL
            left = _cluster_processes(pgdata)
            record(
                "embedded db shared by 3 processes, postmaster SIGKILLed",
                restarts=restarts,
                late_process=late_line,
                left_running_after_all_exit=len(left),
            )
            assert not left, f"PostgreSQL left running after every process let go: {left}"
        finally:
            for proc in watchers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for pid in _cluster_processes(pgdata):
                os.kill(pid, signal.SIGKILL)
                adopted.append(pid)
            _reap(adopted)
