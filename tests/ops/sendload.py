"""A load of clients sending messages over REST and retrying failed sends with the same id.

Each client sends ``<prefix>-<n>`` with ``client_msg_id`` = the content; a send that fails (an
error status, a timeout, a broken connection) is sent again with the same id until it is
acknowledged, as a well-behaved client would. ``verify`` then reads the database: every
acknowledged id is there exactly once and every thread's event seqs run 1..n without a gap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import httpx
import psycopg
import trio

_RETRY_PAUSE_S = 0.25  # a client's pause before sending the same id again


@dataclass
class SendLoad:
    """What the clients saw."""

    acked: Counter[str] = field(default_factory=Counter)  # id -> acknowledgements (2xx)
    retried: set[str] = field(default_factory=set)  # ids that failed at least once
    failures: Counter[str] = field(default_factory=Counter)  # status code or exception type
    failed_at: list[float] = field(default_factory=list)  # trio time of each failure
    stop: trio.Event = field(default_factory=trio.Event)
    progress: trio.Event = field(default_factory=trio.Event)

    @property
    def total_acked(self) -> int:
        return len(self.acked)

    async def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        """Wait until at least ``count`` distinct sends have been acknowledged."""
        with trio.fail_after(timeout):
            while self.total_acked < count:
                await self.progress.wait()

    async def client(
        self, base_url: str, token: str, thread_id: str, prefix: str, timeout_s: float = 3.0
    ) -> None:
        """One client: send until ``stop``; finish (with retries) the send in progress."""
        headers = {"Authorization": f"Bearer {token}"}
        url = f"/api/v1/threads/{thread_id}/messages"
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as http:
            n = 0
            while not self.stop.is_set():
                cid = f"{prefix}-{n}"
                n += 1
                while True:
                    body = {"content": cid, "client_msg_id": cid, "reply": False}
                    try:
                        response = await http.post(url, json=body)
                    except httpx.HTTPError as exc:
                        failure = type(exc).__name__
                    else:
                        if response.status_code in (200, 201):
                            self.acked[cid] += 1
                            self.progress.set()
                            self.progress = trio.Event()
                            break
                        failure = str(response.status_code)
                    self.failures[failure] += 1
                    self.failed_at.append(trio.current_time())
                    self.retried.add(cid)
                    await trio.sleep(_RETRY_PAUSE_S)


def verify(dsn: str, thread_ids: list[str], load: SendLoad) -> dict[str, int]:
    """Check the database against what was acknowledged; return counts for the figures."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT client_msg_id, count(*) FROM messages WHERE thread_id = ANY(%s::uuid[])"
            " GROUP BY client_msg_id",
            (thread_ids,),
        ).fetchall()
        stored = {cid: count for cid, count in rows}
        duplicates = {cid: c for cid, c in stored.items() if c != 1}
        assert not duplicates, f"stored more than once: {list(duplicates)[:5]}"
        missing = set(load.acked) - set(stored)
        assert not missing, f"acknowledged but missing: {sorted(missing)[:5]}"
        # Every id a client sent ended acknowledged (clients retry until then): nothing extra.
        assert set(stored) == set(load.acked)
        for thread_id in thread_ids:
            seqs = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM thread_events WHERE thread_id = %s ORDER BY seq", (thread_id,)
                )
            ]
            assert seqs == list(range(1, len(seqs) + 1)), f"seq gap in {thread_id}"
            messages = conn.execute(
                "SELECT count(*), count(DISTINCT seq), max(seq) FROM messages WHERE thread_id = %s",
                (thread_id,),
            ).fetchone()
            assert messages is not None and messages[0] == messages[1] == len(seqs)
    return {
        "acknowledged": len(load.acked),
        "retried_ids": len(load.retried),
        "failed_attempts": sum(load.failures.values()),
    }
