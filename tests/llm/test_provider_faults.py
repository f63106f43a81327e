"""Provider faults beyond errors and timeouts, through the real ``openai`` client over HTTP.

Each fault ends as a typed failure (the ``assistant.failed`` reasons of docs/assistant.md), in
bounded time, with the text streamed before it kept and counted (an estimated usage row).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from server.llm import tokens
from server.llm.client import LLMClient, LLMError
from server.llm.fake_server import FakeLLM, open_fake_llm
from server.llm.openai_provider import MAX_LINE_BYTES, OpenAIProvider
from server.llm.provider import ChatMessage
from server.llm.resilience import RetryPolicy
from server.runtime import RunningServer, open_server
from tests.llm.conftest import EventTap, llm_settings, request_for, seed_thread

PROMPT = [ChatMessage("user", "hello")]
# No fault may hold a call longer than this (the total timeout in these tests is 4 s).
BOUND_S = 8.0


def _client(tmp_path: Path, fake: FakeLLM, **overrides: object) -> LLMClient:
    values: dict[str, object] = {"llm_max_retries": 2, "llm_total_timeout_s": 4.0}
    values.update(overrides)
    settings = llm_settings(tmp_path, fake, **values)
    return LLMClient(
        OpenAIProvider(settings), settings, retry=RetryPolicy(settings.llm_max_retries, base_s=0.01)
    )


async def _fail(client: LLMClient) -> tuple[LLMError, list[str], float]:
    """Run one call that must fail; return the error, the text handed on and the time taken."""
    got: list[str] = []

    async def on_text(text: str) -> None:
        got.append(text)

    started = trio.current_time()
    with trio.fail_after(BOUND_S), pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT, on_text=on_text)
    await client.aclose()
    return caught.value, got, trio.current_time() - started


async def test_malformed_sse_after_text_fails_without_retry(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.configure(tokens=10, malformed_after_tokens=3)
    error, got, _ = await _fail(_client(tmp_path, fake_llm))
    assert error.reason == "provider_error" and error.streamed
    assert "malformed" in str(error)
    assert got == ["the", " quick", " brown"] and fake_llm.stats.requests == 1


async def test_a_stream_ending_without_finish_or_done(tmp_path: Path, fake_llm: FakeLLM) -> None:
    # After text: kept, no retry (it would repeat what was shown).
    fake_llm.configure(tokens=10, end_after_tokens=2)
    error, got, _ = await _fail(_client(tmp_path, fake_llm))
    assert error.reason == "provider_error" and error.streamed and len(got) == 2
    assert "ended before the answer" in str(error) and fake_llm.stats.requests == 1
    # Before any text: retried, then the same typed failure.
    fake_llm.configure(reset=True, end_after_tokens=0)
    error, got, _ = await _fail(_client(tmp_path, fake_llm, llm_max_retries=2))
    assert error.reason == "provider_error" and not error.streamed and got == []
    assert fake_llm.stats.requests == 3


async def test_a_complete_stream_without_done_is_a_complete_answer(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """Finish reason and usage arrived: the missing ``[DONE]`` marker loses nothing."""
    fake_llm.configure(tokens=6, omit_done=True)
    client = _client(tmp_path, fake_llm)
    with trio.fail_after(BOUND_S):
        completion = await client.stream_chat(PROMPT)
    await client.aclose()
    assert completion.finish_reason == "stop" and len(completion.text.split()) == 6
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert not completion.usage.estimated


async def test_a_200_carrying_an_error_body(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.configure(error_body_200=True)
    error, got, _ = await _fail(_client(tmp_path, fake_llm, llm_max_retries=2))
    assert error.reason == "provider_error" and got == []
    assert "200 with an error object" in str(error)
    assert fake_llm.stats.requests == 3  # retried like a 5xx: nothing had been shown


async def test_a_10_mb_chunk_is_refused_not_buffered(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.configure(huge_chunk_bytes=10 * 1024 * 1024, tokens=3)
    error, got, elapsed = await _fail(_client(tmp_path, fake_llm))
    assert error.reason == "provider_error" and got == []
    assert f"longer than {MAX_LINE_BYTES} bytes" in str(error)
    assert fake_llm.stats.requests == 1 and elapsed < BOUND_S


async def test_a_provider_that_never_answers(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """The request is read, no header ever comes back: read timeouts, then the total one."""
    fake_llm.configure(hang=True)
    client = _client(
        tmp_path, fake_llm, llm_read_timeout_s=0.5, llm_max_retries=10, llm_circuit_failures=50
    )
    try:
        error, got, elapsed = await _fail(client)
    finally:
        fake_llm.configure(hang=False)
    assert error.reason == "timeout" and got == []
    assert 3.5 <= elapsed < BOUND_S  # the 4 s total timeout ended it, not the 10 retries


async def test_a_socket_that_accepts_and_never_reads(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """Below HTTP: a listener that accepts connections and never reads or writes a byte."""
    accepted: list[trio.SocketStream] = []

    async def black_hole(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, black_hole, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        settings = llm_settings(
            tmp_path,
            fake_llm,
            llm_base_url=f"http://127.0.0.1:{port}/v1",
            llm_read_timeout_s=0.5,
            llm_total_timeout_s=3.0,
        )
        client = LLMClient(OpenAIProvider(settings), settings, retry=RetryPolicy(2, base_s=0.01))
        error, got, elapsed = await _fail(client)
        nursery.cancel_scope.cancel()
    assert error.reason == "timeout" and got == [] and elapsed < BOUND_S
    assert len(accepted) == 3  # the first attempt and two retries each connected


async def test_a_stream_that_stalls_after_text(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.configure(tokens=10, stall_after_tokens=2)
    client = _client(tmp_path, fake_llm, llm_read_timeout_s=0.5)
    try:
        error, got, elapsed = await _fail(client)
    finally:
        fake_llm.configure(stall_after_tokens=None)  # any change releases the stalled stream
    assert error.reason == "timeout" and error.streamed and got == ["the", " quick"]
    assert fake_llm.stats.requests == 1 and elapsed < 3.0  # one read timeout, no retry


@pytest.mark.parametrize(
    ("controls", "reason", "kept_tokens"),
    [
        ({"malformed_after_tokens": 3}, "provider_error", 3),
        ({"end_after_tokens": 4}, "provider_error", 4),
        ({"stall_after_tokens": 2}, "timeout", 2),
    ],
)
async def test_a_faulty_reply_keeps_and_counts_its_text(
    tmp_path: Path,
    pg_dsn: str,
    controls: dict[str, int],
    reason: str,
    kept_tokens: int,
) -> None:
    """Through the whole server: the failure reason, the partial text, an estimated usage row."""
    async with open_fake_llm() as fake:
        fake.configure(tokens=12, **controls)
        settings = llm_settings(tmp_path, fake, llm_read_timeout_s=0.5, llm_total_timeout_s=4.0)
        running: RunningServer
        async with open_server(settings, pg_dsn, bind="127.0.0.1:0") as running:
            db = running.services.db
            tap = EventTap(running)
            seeded = await seed_thread(db, ["tell me something"])
            assert running.services.assistant is not None
            running.services.assistant.start_reply(request_for(seeded))
            t = seeded.thread_id
            await tap.wait_for(lambda: bool(tap.of(t, "assistant.failed")), timeout=BOUND_S)
            failed = tap.of(t, "assistant.failed")[0]
            fake.configure(reset=True)  # releases a stalled stream
            assert failed.data["reason"] == reason
            text = failed.data["content"]
            assert len(text.split()) == kept_tokens
            row = await db.fetchrow(
                "SELECT status, content FROM messages WHERE id = $1", failed.data["message_id"]
            )
            assert row is not None and row["status"] == "failed" and row["content"] == text
            usage = await db.fetchrow(
                "SELECT * FROM usage_records WHERE message_id = $1", failed.data["message_id"]
            )
            assert usage is not None and usage["estimated"] is True
            assert usage["completion_tokens"] == tokens.count_text(text)
            assert usage["prompt_tokens"] > 0 and usage["cost_usd"] > 0
            assert failed.data["usage"]["estimated"] is True
