"""SQL of the shared token buckets (``rate_buckets``, ``tl_rate_lease``; migration 0009)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.db import Database

# Buckets untouched this long are full again and carry no information: they are deleted.
FORGET_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """One key's part of a lease statement."""

    key: str
    charge: float  # tokens granted by the node without a lease, to take from the bucket now
    want: float  # tokens the node asks for
    give_back: float  # tokens the node leased earlier and no longer needs
    rate_per_s: float
    burst: float


async def lease(db: Database, requests: Sequence[LeaseRequest]) -> dict[str, float]:
    """Charge, return and lease for every key in one statement; tokens granted per key."""
    rows = await db.fetch(
        "SELECT bucket_key, granted FROM tl_rate_lease($1, $2, $3, $4, $5, $6)",
        [r.key for r in requests],
        [r.charge for r in requests],
        [r.want for r in requests],
        [r.give_back for r in requests],
        [r.rate_per_s for r in requests],
        [r.burst for r in requests],
    )
    return {row["bucket_key"]: float(row["granted"]) for row in rows}


async def forget_idle(db: Database) -> None:
    """Delete buckets nobody has used for ``FORGET_AFTER_S``."""
    await db.fetchval(
        "DELETE FROM rate_buckets WHERE updated_at < now() - make_interval(secs => $1)",
        FORGET_AFTER_S,
    )
