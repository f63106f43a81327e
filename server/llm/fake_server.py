"""``threadline fake-llm``: a local OpenAI-compatible server for tests, development and load tests.

It speaks the real chat-completions wire format over HTTP (``POST /v1/chat/completions``,
streaming ``data: {...}`` SSE chunks ending with a usage chunk and ``data: [DONE]``, or one JSON
body; ``GET /v1/models``), and can be told to misbehave:

``POST /control`` with any of ``{"fail_next": N, "status": 503, "retry_after": 1,
"delay_per_token_ms": 5, "first_token_delay_ms": 0, "hang": true, "drop_after_tokens": K,
"error_after_tokens": K, "malformed_after_tokens": K, "end_after_tokens": K,
"stall_after_tokens": K, "omit_done": true, "hold_after_done": true, "error_body_200": true,
"huge_chunk_bytes": N, "tokens": N, "text": "exact reply", "reset": true}``;
``GET /control/stats`` counts requests.

Run it in-process with ``open_fake_llm()`` (port 0 picks a free port) or as a process with
``threadline fake-llm --port P``. The reply to a prompt is deterministic.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from server.llm import tokens
from server.llm.provider import ChatMessage

log = structlog.get_logger(__name__)

FAKE_MODEL = "fake-gpt"
_FIRST_TOKEN_KEEP = 10_000
_WORDS = (
    "the quick brown fox jumps over the lazy dog while streaming tokens arrive one by one "
    "from a fake but faithful provider"
).split()


@dataclass
class FakeControls:
    """How the next requests behave; changed with ``POST /control`` or directly in-process."""

    fail_next: int = 0  # answer the next N requests with ``status``
    status: int = 503
    retry_after: float | None = None  # seconds, sent as Retry-After on failures
    delay_per_token_ms: float = 0.0
    first_token_delay_ms: float = 0.0
    hang: bool = False  # accept the request, then send nothing until released
    drop_after_tokens: int | None = None  # break the connection after K tokens
    error_after_tokens: int | None = None  # send an SSE ``error`` object after K tokens, then end
    malformed_after_tokens: int | None = None  # send a ``data:`` line that is not JSON after K
    end_after_tokens: int | None = None  # end the body cleanly after K tokens: no finish, no [DONE]
    stall_after_tokens: int | None = None  # after K tokens send nothing more until released
    omit_done: bool = False  # a complete stream (finish, usage) without the final ``[DONE]``
    hold_after_done: bool = False  # after ``[DONE]`` keep the body open until released
    error_body_200: bool = False  # answer 200 with a JSON ``{"error": ...}`` body, not a stream
    huge_chunk_bytes: int | None = None  # the first text chunk is one SSE line of N bytes
    tokens: int = 12  # completion length, in tokens (words)
    text: str | None = None  # reply with exactly this text instead (split on spaces)


@dataclass
class FakeStats:
    """What reached the server (``GET /control/stats``)."""

    requests: int = 0  # every POST /v1/chat/completions
    failed: int = 0  # answered with an error status
    completed: int = 0  # streams or bodies finished normally
    dropped: int = 0  # connections broken on purpose
    in_flight: int = 0
    connections: int = 0  # distinct client connections (host, port) that sent a completion request
    last_messages: list[dict[str, Any]] = field(default_factory=list)
    last_max_tokens: int | None = None


def reply_pieces(controls: FakeControls) -> list[str]:
    """The text pieces (one per token) the fake streams for one request."""
    if controls.text is not None:
        words = controls.text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]
    return [
        (_WORDS[i % len(_WORDS)] if i == 0 else " " + _WORDS[i % len(_WORDS)])
        for i in range(controls.tokens)
    ]


class FakeLLM:
    """The fake provider's state and its quart-trio app."""

    def __init__(self) -> None:
        self.controls = FakeControls()
        self.stats = FakeStats()
        self.url = ""  # the /v1 base URL once serving
        self._release = trio.Event()
        self.request_started = trio.Event()  # set (and replaced) on each completion request
        # trio.current_time() at which the first token of a stream was sent, by the last user
        # message of its prompt (load tests measure the server's added latency from it).
        self.first_token_at: dict[str, float] = {}
        self.first_token_unix: dict[str, float] = {}  # the same in Unix time, for other processes
        # time.time() at which each stream's request reached the handler, by the same key: the
        # fake's own latency (request in -> first token out) is the difference.
        self.request_at_unix: dict[str, float] = {}
        self._clients: set[tuple[str, int]] = set()  # (host, port) of each client connection

    def configure(self, **changes: Any) -> None:
        """Apply control changes: ``reset=True`` restores defaults, ``hang=False`` releases."""
        if changes.pop("reset", False):
            self.controls = FakeControls()
            self.stats = FakeStats()
            self._clients.clear()
        names = {f.name for f in fields(FakeControls)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown controls: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self.controls, name, value)
        if not self.controls.hang:
            self._release.set()
            self._release = trio.Event()

    def app(self) -> QuartTrio:
        app = QuartTrio("threadline-fake-llm")
        app.config["RESPONSE_TIMEOUT"] = None
        app.config["BODY_TIMEOUT"] = None

        @app.post("/control")
        async def control() -> tuple[Response, int] | Response:
            body = await request.get_json(force=True, silent=True) or {}
            try:
                self.configure(**body)
            except (ValueError, TypeError) as exc:
                return Response(json.dumps({"error": str(exc)}), 400, mimetype="application/json")
            return Response(json.dumps(asdict(self.controls)), mimetype="application/json")

        @app.get("/control/stats")
        async def stats() -> Response:
            body = {
                **asdict(self.stats),
                "first_token_at_unix": self.first_token_unix,
                "request_at_unix": self.request_at_unix,
            }
            return Response(json.dumps(body), mimetype="application/json")

        @app.get("/v1/models")
        async def models() -> Response:
            body = {
                "object": "list",
                "data": [
                    {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "threadline"}
                ],
            }
            return Response(json.dumps(body), mimetype="application/json")

        @app.post("/v1/chat/completions")
        async def completions() -> Response:
            return await self._completions()

        return app

    async def _completions(self) -> Response:
        arrived = time.time()
        body = await request.get_json(force=True, silent=True) or {}
        self.stats.requests += 1
        client = request.scope.get("client")
        if client is not None:
            peer = (str(client[0]), int(client[1]))
            if peer not in self._clients:
                self._clients.add(peer)
                self.stats.connections += 1
        self.stats.last_messages = list(body.get("messages") or [])
        self.stats.last_max_tokens = body.get("max_tokens")
        started, self.request_started = self.request_started, trio.Event()
        started.set()
        controls = FakeControls(**asdict(self.controls))  # this request's snapshot
        if self.controls.fail_next > 0:
            self.controls.fail_next -= 1
            self.stats.failed += 1
            headers = {}
            if controls.retry_after is not None:
                headers["Retry-After"] = f"{controls.retry_after:g}"
            error = {"error": {"message": "fake failure", "type": "server_error", "code": None}}
            return Response(
                json.dumps(error), controls.status, headers=headers, mimetype="application/json"
            )
        if controls.error_body_200:
            # Some gateways answer an upstream failure with 200 and an error object.
            self.stats.failed += 1
            error = {"error": {"message": "upstream overloaded", "type": "server_error"}}
            return Response(json.dumps(error), 200, mimetype="application/json")
        if controls.hang:
            self.stats.in_flight += 1
            try:
                await self._release.wait()
            finally:
                self.stats.in_flight -= 1
        model = str(body.get("model") or FAKE_MODEL)
        prompt = [
            ChatMessage(role=m.get("role", "user"), content=str(m.get("content", "")))
            for m in self.stats.last_messages
        ]
        pieces = reply_pieces(controls)
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens < len(pieces):
            pieces, finish = pieces[:max_tokens], "length"
        else:
            finish = "stop"
        usage = {
            "prompt_tokens": tokens.count_messages(prompt),
            "completion_tokens": len(pieces),
            "total_tokens": tokens.count_messages(prompt) + len(pieces),
        }
        if not body.get("stream"):
            self.stats.completed += 1
            return Response(
                json.dumps(_completion(model, "".join(pieces), finish, usage)),
                mimetype="application/json",
            )
        key = next((m.content for m in reversed(prompt) if m.role == "user"), "")
        self._remember(self.request_at_unix, key, arrived)
        response = Response(
            self._sse(model, pieces, finish, usage, controls, key),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
        response.timeout = None
        return response

    async def _sse(
        self,
        model: str,
        pieces: list[str],
        finish: str,
        usage: dict[str, int],
        controls: FakeControls,
        key: str,
    ) -> AsyncIterator[bytes]:
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        self.stats.in_flight += 1
        try:
            if controls.first_token_delay_ms:
                await trio.sleep(controls.first_token_delay_ms / 1000)
            yield _sse(_chunk(cid, created, model, {"role": "assistant", "content": ""}, None))
            if controls.huge_chunk_bytes is not None:
                pieces = ["x" * controls.huge_chunk_bytes, *pieces]
            for i, piece in enumerate(pieces):
                if controls.error_after_tokens is not None and i >= controls.error_after_tokens:
                    error = {"message": "fake mid-stream failure", "type": "server_error"}
                    yield _sse({"error": error})
                    return
                if (
                    controls.malformed_after_tokens is not None
                    and i >= controls.malformed_after_tokens
                ):
                    yield b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"con\n\n'
                    return
                if controls.end_after_tokens is not None and i >= controls.end_after_tokens:
                    return  # a clean end of the body, as a provider restarting mid-answer may do
                if controls.stall_after_tokens is not None and i >= controls.stall_after_tokens:
                    await self._release.wait()
                    return
                if controls.drop_after_tokens is not None and i >= controls.drop_after_tokens:
                    self.stats.dropped += 1
                    # Ending the body without the final chunks and [DONE], then breaking the
                    # connection, is what a provider dying mid-stream looks like to a client.
                    raise _DropConnection
                if controls.delay_per_token_ms and i:
                    await trio.sleep(controls.delay_per_token_ms / 1000)
                if i == 0:
                    self._first_token(key)
                yield _sse(_chunk(cid, created, model, {"content": piece}, None))
            yield _sse(_chunk(cid, created, model, {}, finish))
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
            if not controls.omit_done:
                yield b"data: [DONE]\n\n"
            if controls.hold_after_done:
                await self._release.wait()
            self.stats.completed += 1
        finally:
            self.stats.in_flight -= 1

    def _first_token(self, key: str) -> None:
        self._remember(self.first_token_at, key, trio.current_time())
        self._remember(self.first_token_unix, key, time.time())

    @staticmethod
    def _remember(times: dict[str, float], key: str, value: float) -> None:
        if len(times) >= _FIRST_TOKEN_KEEP and key not in times:  # bounded: drop the oldest
            times.pop(next(iter(times)))
        times[key] = value


class _DropConnection(Exception):
    """Raised inside a streaming body to make the server abort the connection."""


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _completion(model: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = 75
    return config


@contextlib.asynccontextmanager
async def open_fake_llm(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[FakeLLM]:
    """Serve a FakeLLM in the caller's trio run for the duration of the block."""
    fake = FakeLLM()
    await trio.to_thread.run_sync(tokens.encoding)  # not on the first request's clock
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: serve(
                fake.app(),
                _config(host, port),
                shutdown_trigger=trio.sleep_forever,
                task_status=task_status,
            )
        )
        fake.url = binds[0] + "/v1"
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


def main(host: str = "127.0.0.1", port: int = 8001) -> int:
    """``threadline fake-llm``: serve until SIGINT/SIGTERM. Prints the base URL on one line."""

    async def _run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_fake_llm(host, port) as fake:
                print(f"fake-llm: serving on {fake.url}", flush=True)
                async for _ in signals:
                    break

    trio.run(_run)
    return 0
