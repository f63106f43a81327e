"""An OpenAI-compatible chat-completions provider on the official ``openai`` client.

``AsyncOpenAI`` runs on trio: its transport (``httpx2``/``httpcore2``) detects the running
library through sniffio/anyio and uses trio sockets. We hand it our own HTTP client with explicit
connect/read/write/pool timeouts and set ``max_retries=0``: retries, back-off and the total
timeout belong to ``server.llm.client.LLMClient``, where they are visible and measured.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
import structlog
import trio

from server.config import Settings
from server.llm.provider import (
    ChatMessage,
    Completion,
    OnText,
    ProviderError,
    ProviderTimeout,
    Usage,
)

log = structlog.get_logger(__name__)

# The longest SSE line we read. A chat chunk is a few hundred bytes; a provider (or something in
# between) that sends megabytes on one line is broken, and buffering it would cost that memory
# per reply. Past this the call fails (``provider_error``) instead.
MAX_LINE_BYTES = 1 << 20
# After ``[DONE]``, how long and how many lines the rest of the body may take to be read (see
# ``_drain``).
_DRAIN_TIMEOUT_S = 0.5
_DRAIN_MAX_LINES = 16
# How long an idle connection to the provider is kept for the next request (httpx's default is
# 5 s): a new connection costs a TCP and TLS handshake, several round trips to a remote provider,
# all of it added to a reply's time to first token. A connection the provider closed meanwhile
# is noticed (readable EOF) before reuse and replaced.
_KEEPALIVE_EXPIRY_S = 60.0
# How much of a non-stream body (a 200 carrying an error object) is read to describe it.
_MAX_ERROR_BODY_BYTES = 64 * 1024


def _retry_after(response: httpx2.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from LLM providers; fall back to our back-off


def _decode(data: str) -> dict[str, Any]:
    """One SSE ``data:`` payload as a dict; an ``error`` object or bad JSON is a ProviderError."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ProviderError("The provider sent a malformed chunk.", retryable=False) from None
    if not isinstance(chunk, dict):
        raise ProviderError("The provider sent a malformed chunk.", retryable=False)
    if chunk.get("error"):
        raise ProviderError("The provider reported an error mid-stream.", retryable=False)
    return chunk


async def _sse_lines(chunks: AsyncIterator[bytes]) -> AsyncGenerator[str, None]:
    """The lines of an SSE body, each at most ``MAX_LINE_BYTES``; else a ProviderError."""
    buffer = b""
    async for data in chunks:
        buffer += data
        lines = buffer.split(b"\n")
        buffer = lines.pop()
        if len(buffer) > MAX_LINE_BYTES:
            raise ProviderError(
                f"The provider sent a line longer than {MAX_LINE_BYTES} bytes.", retryable=False
            )
        for line in lines:
            if len(line) > MAX_LINE_BYTES:
                raise ProviderError(
                    f"The provider sent a line longer than {MAX_LINE_BYTES} bytes.",
                    retryable=False,
                )
            try:
                yield line.rstrip(b"\r").decode()
            except UnicodeDecodeError:
                raise ProviderError(
                    "The provider sent a chunk that is not UTF-8.", retryable=False
                ) from None
    if buffer.strip():
        yield buffer.rstrip(b"\r").decode(errors="replace")


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows ``[DONE]`` (normally only the body's end) so that the connection goes
    back to the pool: a response closed before its end closes its connection, and the next
    request would pay a new TCP (and TLS) handshake. Bounded in time and lines; a provider that
    keeps the body open after ``[DONE]`` only loses the reuse of its connection."""
    with trio.move_on_after(_DRAIN_TIMEOUT_S):
        for _ in range(_DRAIN_MAX_LINES):
            try:
                await anext(lines)
            except (StopAsyncIteration, ProviderError, httpx2.HTTPError):
                return  # the answer is complete either way


async def _error_body(chunks: AsyncIterator[bytes]) -> ProviderError:
    """A 2xx answer that is not an event stream: describe it (bounded read) as a failure."""
    body = b""
    async for data in chunks:
        body += data
        if len(body) > _MAX_ERROR_BODY_BYTES:
            break
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    kind = "an error object" if error else "no event stream"
    # Gateways answer transient upstream failures this way: worth a retry, as a 5xx would be.
    return ProviderError(f"The provider answered 200 with {kind}.", retryable=True)


def _status_error(exc: openai.APIStatusError) -> ProviderError:
    status = exc.status_code
    retryable = status == 429 or status == 408 or status >= 500
    # The body may echo the request; only the status reaches logs and clients.
    return ProviderError(
        f"The provider answered HTTP {status}.",
        retryable=retryable,
        status=status,
        retry_after=_retry_after(exc.response),
    )


class OpenAIProvider:
    """Streams chat completions from any OpenAI-compatible ``/v1`` endpoint."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        if settings.llm_base_url is None:
            raise ValueError("OpenAIProvider needs THREADLINE_LLM_BASE_URL")
        self.model = settings.llm_model
        connect = settings.llm_connect_timeout_s
        read = settings.llm_read_timeout_s
        self._http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(connect=connect, read=read, write=read, pool=connect),
            limits=httpx2.Limits(
                max_connections=200,
                max_keepalive_connections=50,
                keepalive_expiry=_KEEPALIVE_EXPIRY_S,
            ),
        )
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unused"
        self._client = openai.AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=key,
            max_retries=0,
            http_client=self._http,
        )
        self._warm()

    def _warm(self) -> None:
        """Import now what the first request would import lazily: the client's chat resources
        and the transport's trio backend (30-60 ms on the development VM, otherwise added to the
        first reply's time to first token)."""
        self._client.chat.completions.with_streaming_response  # noqa: B018 - lazy imports
        with contextlib.suppress(ImportError):
            importlib.import_module("anyio._backends._trio")

    async def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, on_text: OnText
    ) -> Completion:
        """See ``Provider.stream``. Maps every transport and HTTP failure to ProviderError."""
        payload: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        model = self.model
        try:
            # The official client builds, authenticates and sends the request and raises typed
            # errors for non-2xx answers; the SSE body is then read line by line and each chunk
            # decoded with json.loads: the client's per-chunk model objects cost ~0.5 ms of CPU
            # each, which at thousands of tokens per second would be most of the server's time.
            #
            # The messages go in ``extra_body`` (merged into the JSON body as they are; the body
            # on the wire is the same): ``create`` would otherwise walk every message through its
            # TypedDict transform, about 0.18 ms of CPU per message (7 ms for 40 turns), which is
            # the identity for plain role/content text messages.
            async with self._client.chat.completions.with_streaming_response.create(
                model=self.model,
                messages=(),
                extra_body={"messages": payload},
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens,
            ) as response:
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise await _error_body(response.iter_bytes())
                async with contextlib.aclosing(_sse_lines(response.iter_bytes())) as lines:
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue  # blank separators, comments, event: lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            await _drain(lines)
                            break
                        chunk = _decode(data)
                        model = chunk.get("model") or model
                        raw_usage = chunk.get("usage")
                        if raw_usage:
                            usage = Usage(
                                prompt_tokens=int(raw_usage.get("prompt_tokens") or 0),
                                completion_tokens=int(raw_usage.get("completion_tokens") or 0),
                            )
                        for choice in chunk.get("choices") or ():
                            if choice.get("finish_reason"):
                                finish = str(choice["finish_reason"])
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                parts.append(text)
                                await on_text(text)
        except openai.APITimeoutError:
            raise ProviderTimeout("The provider did not answer in time.") from None
        except openai.APIStatusError as exc:
            raise _status_error(exc) from None
        except openai.APIConnectionError as exc:
            raise ProviderError(
                f"Could not reach the provider ({type(exc.__cause__ or exc).__name__}).",
                retryable=True,
            ) from None
        except httpx2.TimeoutException:
            raise ProviderTimeout("The provider stopped sending within the read timeout.") from None
        except httpx2.HTTPError as exc:
            raise ProviderError(
                f"The provider's stream broke off ({type(exc).__name__}).", retryable=True
            ) from None
        except openai.APIError as exc:
            raise ProviderError(
                f"The provider sent an error ({type(exc).__name__}).", retryable=False
            ) from None
        if finish is None:
            raise ProviderError(
                "The provider's stream ended before the answer did.", retryable=True
            )
        return Completion(text="".join(parts), model=model, usage=usage, finish_reason=finish)

    async def aclose(self) -> None:
        with contextlib.suppress(httpx2.HTTPError):
            await self._http.aclose()
