"""The circuit breaker and the back-off policy, on a MockClock."""

from __future__ import annotations

import random

import trio
import trio.testing

from server import metrics
from server.llm.resilience import CircuitBreaker, CircuitState, RetryPolicy


def _gauge() -> float:
    return metrics.LLM_CIRCUIT_STATE._value.get()


async def test_breaker_opens_half_opens_and_closes(mock_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(3, 30.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN and _gauge() == 2
    assert not breaker.allow()
    mock_clock.jump(29.9)
    assert not breaker.allow() and 0 < breaker.retry_in() <= 0.1 + 1e-9
    mock_clock.jump(0.1)
    assert breaker.state is CircuitState.HALF_OPEN and _gauge() == 1
    assert breaker.allow()  # the single probe
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    mock_clock.jump(30)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and _gauge() == 0
    assert breaker.consecutive_failures == 0


async def test_a_cancelled_probe_lets_another_caller_probe(
    mock_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(1, 5.0)
    breaker.record_failure()
    mock_clock.jump(5)
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=5, base_s=0.5, cap_s=4.0, rng=random.Random(7))
    for attempt in range(8):
        bound = min(4.0, 0.5 * 2**attempt)
        samples = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > bound * 0.8  # full jitter spreads over the whole range
    assert policy.delay(0, retry_after=3.0) >= 3.0
