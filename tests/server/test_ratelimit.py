"""The token-bucket limiter (unit, with an injected clock) and 429 over real HTTP."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import httpx
import pytest

from server import auth, metrics
from server.config import ConfigError, Settings, load_settings
from server.errors import RateLimited
from server.ratelimit import Limit, RateLimiter, client_ip, parse_networks
from server.runtime import RunningServer
from tests.conftest import make_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(
    clock: FakeClock, *, rate: float = 2.0, burst: int = 3, max_buckets: int = 100
) -> RateLimiter:
    return RateLimiter(
        user_limit=Limit(rate, burst),
        ip_limit=Limit(rate * 10, burst * 10),
        max_buckets=max_buckets,
        clock=clock,
    )


def test_burst_then_refill_at_the_rate() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    for _ in range(3):
        assert limiter.try_acquire("user:a") is None
    wait = limiter.try_acquire("user:a")
    assert wait == pytest.approx(0.5)  # one token at 2/s
    clock.now += 0.25
    assert limiter.try_acquire("user:a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.try_acquire("user:a") is None
    # A long idle period refills to the burst, never beyond it.
    clock.now += 3600
    for _ in range(3):
        assert limiter.try_acquire("user:a") is None
    assert limiter.try_acquire("user:a") is not None


def test_keys_are_independent_and_check_raises_with_retry_after() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=1)
    limiter.check_user("a")
    with pytest.raises(RateLimited) as refused:
        limiter.check_user("a")
    assert refused.value.retry_after_s == pytest.approx(0.5)
    assert refused.value.details == {"retry_after_s": 0.5}
    assert refused.value.status == 429
    limiter.check_user("b")  # another user is unaffected
    for _ in range(10):
        limiter.check_ip("10.0.0.1")  # the IP limit is its own bucket with its own shape


def test_refused_attempts_cost_nothing() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rate=1.0, burst=1)
    assert limiter.try_acquire("k") is None
    for _ in range(100):
        assert limiter.try_acquire("k") is not None
    clock.now += 1.0
    assert limiter.try_acquire("k") is None


def test_memory_is_bounded_and_least_recently_used_go_first() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, burst=1, max_buckets=100)
    limiter.try_acquire("hot")
    for i in range(10_000):
        limiter.try_acquire(f"ip:{i}")
        if i % 50 == 0:
            assert limiter.try_acquire("hot") is not None  # touched: stays, still empty
        assert len(limiter) <= 100
    assert len(limiter) == 100
    # "hot" was kept (recently used) and is still limited; an early key was forgotten.
    assert limiter.try_acquire("hot") is not None
    assert limiter.try_acquire("ip:0") is None
    # Each bucket is a couple of floats, not a list of timestamps.
    bucket = next(iter(limiter._buckets.values()))
    assert not hasattr(bucket, "__dict__")
    assert sys.getsizeof(bucket) < 100


def test_settings_shape_the_limiter(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        rate_limit_per_s=3.0,
        rate_limit_burst=7,
        ip_rate_limit_per_s=11.0,
        ip_rate_limit_burst=13,
        rate_limit_max_buckets=123,
        trusted_proxies="10.0.0.0/8, 192.168.1.1",
    )
    limiter = RateLimiter.from_settings(settings)
    assert limiter.user_limit == Limit(3.0, 7)
    assert limiter.ip_limit == Limit(11.0, 13)
    assert limiter.max_buckets == 123
    assert limiter.is_trusted_proxy("10.1.2.3")
    assert limiter.is_trusted_proxy("192.168.1.1")
    assert not limiter.is_trusted_proxy("192.168.1.2")


def test_bad_trusted_proxies_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as bad:
        load_settings(trusted_proxies="10.0.0.0/8, not-a-network")
    assert "THREADLINE_TRUSTED_PROXIES" in str(bad.value)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Limit(0, 5)
    with pytest.raises(ValueError):
        Limit(1, 0)


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        # An untrusted peer cannot choose its address by sending the header.
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),
        ("10.0.0.2", "1.2.3.4", "1.2.3.4"),
        # Walk from the right past trusted hops; the leftmost entries are client-supplied.
        ("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.7", "1.2.3.4"),
        ("10.0.0.2", "10.0.0.5, 10.0.0.7", "10.0.0.5"),
        ("10.0.0.2", "garbage, 1.2.3.4", "1.2.3.4"),
        ("10.0.0.2", "1.2.3.4, garbage", "10.0.0.2"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        (None, "1.2.3.4", "unknown"),
    ],
)
def test_client_ip_honours_forwarded_for_only_from_trusted_proxies(
    peer: str | None, xff: str | None, expected: str
) -> None:
    trusted = parse_networks(["10.0.0.0/8", "::1"])
    assert trusted[1] == ipaddress.ip_network("::1/128")
    assert client_ip(peer, xff, trusted) == expected


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path,
        # Refills slow enough (a token per 100 s) that a loaded machine's slow requests never
        # earn one back in the middle of a test (0.5/s did: 9 requests over 2 s).
        rate_limit_per_s=0.01,
        rate_limit_burst=3,
        ip_rate_limit_per_s=0.01,
        ip_rate_limit_burst=8,
    )


def _rate_limited_total() -> float:
    value = metrics.RATE_LIMITED.labels(transport="http")._value.get()
    return float(value)


async def test_per_user_limit_gives_429_with_retry_after(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    _, token = await auth.create_user_with_token(server.services)
    _, other = await auth.create_user_with_token(server.services)
    before = _rate_limited_total()
    headers = {"Authorization": f"Bearer {token}"}
    statuses = [
        (await client.get("/api/v1/auth/me", headers=headers)).status_code for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    refused = await client.get("/api/v1/auth/me", headers=headers)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["retry_after_s"] > 0
    assert int(refused.headers["Retry-After"]) >= 1
    assert error["request_id"] == refused.headers["X-Request-ID"]
    assert _rate_limited_total() == before + 2
    # Another user from the same IP still has their own bucket (and the IP has tokens left).
    ok = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {other}"})
    assert ok.status_code == 200


async def test_per_ip_limit_applies_without_credentials(client: httpx.AsyncClient) -> None:
    statuses = [(await client.get("/api/v1/auth/me")).status_code for _ in range(9)]
    assert statuses == [401] * 8 + [429]
    # Ops endpoints are not rate limited: probes must always get through.
    assert (await client.get("/healthz")).status_code == 200


async def test_login_costs_more_than_a_plain_request(client: httpx.AsyncClient) -> None:
    body = {"email": "nobody@example.com", "password": "whatever-123"}
    first = await client.post("/api/v1/auth/login", json=body)
    assert first.status_code == 401
    second = await client.post("/api/v1/auth/login", json=body)
    assert second.status_code == 429  # 5 + 5 tokens exceed the burst of 8
    assert second.json()["error"]["code"] == "rate_limited"
