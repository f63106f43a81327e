"""Fault tolerance around the provider: a circuit breaker and a retry back-off policy.

Both read time from an injectable clock (``trio.current_time`` by default), so tests drive them
with ``trio.testing.MockClock`` instead of waiting.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from server import metrics

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


class CircuitState(enum.Enum):
    """The breaker's states; the value is what ``threadline_llm_circuit_state`` exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class CircuitBreaker:
    """Stop calling a provider that keeps failing, and probe it again after a pause.

    closed: calls pass; ``failure_threshold`` consecutive failures open the circuit.
    open: calls are refused at once (no request reaches the provider) until ``reset_after_s``
    has passed since it opened; then the next caller becomes the single half-open probe.
    half-open: one probe at a time; its success closes the circuit, its failure re-opens it.
    """

    def __init__(
        self, failure_threshold: int, reset_after_s: float, *, clock: Clock = trio.current_time
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        metrics.LLM_CIRCUIT_STATE.set(self._state.value)

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit whose pause has passed reads as half-open."""
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.reset_after_s
        ):
            self._set(CircuitState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_after_s - self._clock())

    def allow(self) -> bool:
        """May a call go out now? In half-open, True for exactly one caller until it reports."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or self._state is CircuitState.HALF_OPEN:
            self._open()
        elif self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def release(self) -> None:
        """The call ended without a verdict (cancelled): let another caller probe."""
        self._probe_in_flight = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            log.warning("llm.circuit", state=state.label, failures=self._failures)
        self._state = state
        metrics.LLM_CIRCUIT_STATE.set(state.value)


@dataclass
class RetryPolicy:
    """Exponential back-off with full jitter: attempt n waits U(0, min(cap, base * 2**n)).

    A provider's ``Retry-After`` is honoured as a lower bound on the wait.
    """

    max_retries: int
    base_s: float = 0.25
    cap_s: float = 8.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        backoff = self.rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))
        if retry_after is not None:
            return max(retry_after, backoff)
        return backoff
