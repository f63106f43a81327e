"""The resilient LLM client: retries, a circuit breaker, a total timeout and metrics.

Every call to a provider goes through ``LLMClient.stream_chat``:

* the whole call, retries and back-off included, runs under one ``llm_total_timeout_s`` scope;
* connection errors, timeouts, 429 (honouring ``Retry-After``) and 5xx are retried up to
  ``llm_max_retries`` times with exponential back-off and full jitter, but never once a piece of
  text has been handed on (a retry then would repeat text a user has already seen), and never
  when the wait would run past the total deadline (the call fails at once instead);
* a circuit breaker refuses calls (no request leaves the process) after repeated failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
import trio

from server import metrics
from server.config import Settings
from server.llm.provider import ChatMessage, Completion, OnText, Provider, ProviderError
from server.llm.resilience import CircuitBreaker, CircuitState, Clock, RetryPolicy

log = structlog.get_logger(__name__)

# Statuses that mean "this provider is unusable as configured": they count against the circuit.
_CONFIG_FAILURES = frozenset({401, 403, 404})


class LLMError(Exception):
    """A completion could not be had. ``reason`` is the contract's ``assistant.failed`` reason.

    ``streamed`` tells whether some text had already been handed on before the failure.
    """

    def __init__(
        self, reason: str, message: str, *, streamed: bool = False, retry_in: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.streamed = streamed
        self.retry_in = retry_in


class LLMClient:
    """A provider made safe to call: see the module docstring. Reports ``health()``."""

    def __init__(
        self,
        provider: Provider,
        settings: Settings,
        *,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock = trio.current_time,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self._clock = clock
        self.breaker = breaker or CircuitBreaker(
            settings.llm_circuit_failures, settings.llm_circuit_reset_s, clock=clock
        )
        self.retry = retry or RetryPolicy(settings.llm_max_retries)

    @property
    def model(self) -> str:
        return self.provider.model

    def health(self) -> dict[str, Any]:
        """The /readyz ``llm`` check: not ok while the circuit is open."""
        state = self.breaker.state
        result: dict[str, Any] = {
            "ok": state is not CircuitState.OPEN,
            "provider": self.provider.name,
            "model": self.provider.model,
            "circuit": state.label,
            "consecutive_failures": self.breaker.consecutive_failures,
        }
        if state is CircuitState.OPEN:
            result["retry_in_s"] = round(self.breaker.retry_in(), 3)
        return result

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        on_text: OnText | None = None,
    ) -> Completion:
        """One completion, streamed to ``on_text``. Raises LLMError with a typed ``reason``.

        Cancellation propagates (the provider's response is closed on the way out) and leaves
        the circuit as it was.
        """
        max_tokens = max_tokens or self.settings.llm_max_reply_tokens
        streamed = False
        attempt_started = 0.0

        async def relay(text: str) -> None:
            nonlocal streamed
            if not streamed:
                streamed = True
                metrics.LLM_TTFT.observe(max(0.0, self._clock() - attempt_started))
            if on_text is not None:
                await on_text(text)

        attempt = 0
        with trio.move_on_after(self.settings.llm_total_timeout_s) as total:
            while True:
                if not self.breaker.allow():
                    metrics.LLM_REQUESTS.labels(outcome="circuit_open").inc()
                    raise LLMError(
                        "circuit_open",
                        "The language model is unavailable; calls are paused.",
                        retry_in=self.breaker.retry_in(),
                    )
                attempt_started = self._clock()
                try:
                    completion = await self.provider.stream(
                        messages, max_tokens=max_tokens, on_text=relay
                    )
                except ProviderError as exc:
                    if exc.retryable or exc.status in _CONFIG_FAILURES:
                        self.breaker.record_failure()
                    else:
                        self.breaker.record_success()  # it answered; the request was bad
                    delay = self.retry.delay(attempt, exc.retry_after)
                    give_up = (
                        streamed
                        or not exc.retryable
                        or attempt >= self.retry.max_retries
                        # a wait past the deadline (a long Retry-After) cannot end in an answer
                        or trio.current_time() + delay >= total.deadline
                    )
                    log.warning(
                        "llm.attempt_failed",
                        reason=exc.reason,
                        status=exc.status,
                        attempt=attempt,
                        streamed=streamed,
                        final=give_up,
                    )
                    if give_up:
                        outcome = "timeout" if exc.reason == "timeout" else "error"
                        metrics.LLM_REQUESTS.labels(outcome=outcome).inc()
                        raise LLMError(exc.reason, str(exc), streamed=streamed) from exc
                    metrics.LLM_REQUESTS.labels(outcome="retry").inc()
                    await trio.sleep(delay)
                    attempt += 1
                except trio.Cancelled:
                    if not total.cancel_called:
                        self.breaker.release()
                        metrics.LLM_REQUESTS.labels(outcome="cancelled").inc()
                    raise
                else:
                    self.breaker.record_success()
                    metrics.LLM_REQUESTS.labels(outcome="ok").inc()
                    return completion
        # Only the total timeout gets here.
        assert total.cancelled_caught
        self.breaker.record_failure()
        metrics.LLM_REQUESTS.labels(outcome="timeout").inc()
        log.warning("llm.total_timeout", timeout_s=self.settings.llm_total_timeout_s)
        raise LLMError(
            "timeout",
            f"No complete answer within {self.settings.llm_total_timeout_s:g}s.",
            streamed=streamed,
        )

    async def aclose(self) -> None:
        await self.provider.aclose()
