"""Token-bucket rate limiting per user and per client IP, shared by HTTP and WebSocket.

One ``RateLimiter`` lives per process (``Services.limiter``). A bucket is two floats (tokens left,
time of the last refill), never a list of timestamps. Memory is bounded: at most ``max_buckets``
buckets are kept, least recently used first out. An evicted bucket had usually been idle long
enough to refill completely, so forgetting it changes nothing; under a flood of distinct keys
the oldest are forgotten, which can only make the limiter more lenient to those keys, never
stricter to anyone.

The limiter is synchronous and never awaits, so it is safe to call from any trio task without a
lock (trio switches tasks only at await points).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from server.config import Settings
from server.errors import RateLimited

Clock = Callable[[], float]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket's shape: ``rate_per_s`` tokens refill per second, at most ``burst`` held."""

    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("a limit needs rate_per_s > 0 and burst >= 1")


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token buckets keyed by string (``"user:<id>"``, ``"ip:<addr>"``), LRU-bounded.

    ``user_limit`` applies to keys checked with ``check_user``, ``ip_limit`` to ``check_ip``;
    ``check``/``try_acquire`` take any key and an explicit ``Limit`` (default: ``user_limit``).
    """

    def __init__(
        self,
        *,
        user_limit: Limit,
        ip_limit: Limit,
        max_buckets: int,
        trusted_proxies: list[IPNetwork] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.user_limit = user_limit
        self.ip_limit = ip_limit
        self.max_buckets = max_buckets
        self.trusted_proxies = trusted_proxies or []
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.monotonic) -> RateLimiter:
        """The process limiter as configured by ``THREADLINE_*RATE_LIMIT*``."""
        return cls(
            user_limit=Limit(settings.rate_limit_per_s, settings.rate_limit_burst),
            ip_limit=Limit(settings.ip_rate_limit_per_s, settings.ip_rate_limit_burst),
            max_buckets=settings.rate_limit_max_buckets,
            trusted_proxies=parse_networks(settings.trusted_proxies),
            clock=clock,
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def try_acquire(self, key: str, limit: Limit | None = None, cost: float = 1.0) -> float | None:
        """Take ``cost`` tokens from ``key``'s bucket: None if granted, else seconds to wait.

        A refused request takes nothing, so a client that keeps retrying too early is refused
        only for as long as it keeps exceeding the rate.
        """
        limit = limit or self.user_limit
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(limit.burst), now)
            self._buckets[key] = bucket
            self._evict()
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.rate_per_s)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        wait = (cost - bucket.tokens) / limit.rate_per_s
        return wait if wait > 0 else math.ulp(1.0)

    def check(self, key: str, limit: Limit | None = None, cost: float = 1.0) -> None:
        """Like ``try_acquire`` but raises ``RateLimited(retry_after_s)`` when refused."""
        wait = self.try_acquire(key, limit, cost)
        if wait is not None:
            raise RateLimited(wait)

    def check_user(self, user_id: str, cost: float = 1.0) -> None:
        """Charge the per-user bucket; raises ``RateLimited``."""
        self.check(f"user:{user_id}", self.user_limit, cost)

    def check_ip(self, ip: str, cost: float = 1.0) -> None:
        """Charge the per-client-IP bucket; raises ``RateLimited``."""
        self.check(f"ip:{ip}", self.ip_limit, cost)

    def may_wait(self, key: str) -> bool:
        """True if a refusal of ``key`` now could be lifted by ``acquire`` waiting briefly (a
        cluster node's lease running dry before the shared bucket is spent). Never for local
        buckets: their refusal stands until the bucket refills."""
        return False

    async def acquire(self, key: str, limit: Limit | None = None, cost: float = 1.0) -> None:
        """``check``, from a task that may wait: in a cluster, a refusal by this node's lease of
        a shared bucket waits (briefly) for the bucket's answer (``server/cluster_limits.py``)."""
        self.check(key, limit, cost)

    async def acquire_user(self, user_id: str, cost: float = 1.0) -> None:
        """``check_user`` from a task that may wait (see ``acquire``)."""
        await self.acquire(f"user:{user_id}", self.user_limit, cost)

    async def acquire_ip(self, ip: str, cost: float = 1.0) -> None:
        """``check_ip`` from a task that may wait (see ``acquire``)."""
        await self.acquire(f"ip:{ip}", self.ip_limit, cost)

    async def warm_user(self, user_id: str) -> None:
        """Prepare the user's bucket before a burst (a WebSocket opening). Nothing to do for
        local buckets; the cluster's limiter leases here (``server/cluster_limits.py``)."""

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client address behind ``peer`` (see ``client_ip``), for the per-IP bucket."""
        return client_ip(peer, forwarded_for, self.trusted_proxies)

    def is_trusted_proxy(self, peer: str | None) -> bool:
        """True if ``peer`` is in ``THREADLINE_TRUSTED_PROXIES``."""
        return peer is not None and _trusted(peer, self.trusted_proxies)

    def _evict(self) -> None:
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)


def parse_networks(cidrs: list[str]) -> list[IPNetwork]:
    """``THREADLINE_TRUSTED_PROXIES`` entries (addresses or CIDRs) as networks; bad ones raise."""
    return [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[IPNetwork]) -> str:
    """The client's address for rate limiting.

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy; then the list
    is walked from the right past every trusted proxy, and the first other address is the
    client (entries further left are client-supplied and could be forged).
    """
    address = peer or "unknown"
    if not forwarded_for or not _trusted(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not _valid_ip(hop):
            return address  # a malformed list: fall back to the last trustworthy hop
        address = hop
        if not _trusted(hop, trusted):
            return hop
    return address


def _valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: list[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)
