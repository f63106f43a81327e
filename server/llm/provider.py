"""The provider interface: what the assistant needs of a language model, and how one fails.

A provider streams one chat completion per call and reports each piece of text through a
callback, so the caller's timeout and cancel scopes wrap the whole call (no async generator has
to yield across a scope). Retries, the circuit breaker and metrics are not the provider's job:
``server.llm.client.LLMClient`` adds them around any provider.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]
OnText = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a prompt. ``role`` is set by our prompt builder, never by user text."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a completion consumed; ``estimated`` when we counted them ourselves."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished completion: the whole text, the model that wrote it and its usage."""

    text: str
    model: str
    usage: Usage | None
    finish_reason: str | None


class ProviderError(Exception):
    """A call to the provider failed.

    ``retryable`` marks failures worth another attempt (connection errors, 429, 5xx, timeouts);
    ``retry_after`` is the provider's own ``Retry-After`` in seconds, when it sent one.
    The message never contains credentials.
    """

    reason = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class ProviderTimeout(ProviderError):
    """No answer (or no next chunk) within the connect/read timeout."""

    reason = "timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class Provider(Protocol):
    """A chat-completions backend (OpenAI-compatible HTTP, or the offline model)."""

    name: str  # "openai" | "offline": shown in /readyz
    model: str

    async def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, on_text: OnText
    ) -> Completion:
        """Stream one completion, awaiting ``on_text`` for each piece of text as it arrives.

        Raises ProviderError on failure. On cancellation the HTTP response is closed and
        ``trio.Cancelled`` propagates; text already handed to ``on_text`` stays delivered.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...
