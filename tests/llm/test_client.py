"""The resilient client against the fake provider over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from server import metrics
from server.llm.client import LLMClient, LLMError
from server.llm.fake_server import FakeLLM
from server.llm.openai_provider import OpenAIProvider
from server.llm.provider import ChatMessage
from server.llm.resilience import RetryPolicy
from tests.conftest import make_settings
from tests.llm.conftest import llm_settings

PROMPT = [ChatMessage("user", "hello")]


def _client(tmp_path: Path, fake: FakeLLM, **overrides: object) -> LLMClient:
    settings = llm_settings(tmp_path, fake, **overrides)
    return LLMClient(
        OpenAIProvider(settings), settings, retry=RetryPolicy(settings.llm_max_retries, base_s=0.01)
    )


def _count(outcome: str) -> float:
    return metrics.LLM_REQUESTS.labels(outcome=outcome)._value.get()


async def test_two_503s_then_success(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm, llm_max_retries=3)
    fake_llm.configure(fail_next=2, status=503, tokens=5)
    retries, oks = _count("retry"), _count("ok")
    got: list[str] = []

    async def on_text(text: str) -> None:
        got.append(text)

    completion = await client.stream_chat(PROMPT, on_text=on_text)
    assert fake_llm.stats.requests == 3 and fake_llm.stats.failed == 2
    assert completion.text == "".join(got) and len(got) == 5
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert _count("retry") - retries == 2 and _count("ok") - oks == 1
    assert client.health()["circuit"] == "closed"
    await client.aclose()


async def test_429_retry_after_is_honoured(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm)
    fake_llm.configure(fail_next=1, status=429, retry_after=0.3)
    start = trio.current_time()
    await client.stream_chat(PROMPT)
    assert trio.current_time() - start >= 0.3
    assert fake_llm.stats.requests == 2
    await client.aclose()


async def test_client_errors_are_not_retried(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm)
    fake_llm.configure(fail_next=5, status=400)
    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "provider_error" and fake_llm.stats.requests == 1
    assert client.health()["consecutive_failures"] == 0
    await client.aclose()


async def test_never_retried_once_text_was_streamed(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm, llm_max_retries=3)
    fake_llm.configure(drop_after_tokens=3, tokens=10)
    got: list[str] = []

    async def on_text(text: str) -> None:
        got.append(text)

    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT, on_text=on_text)
    assert caught.value.streamed and caught.value.reason == "provider_error"
    assert len(got) == 3 and fake_llm.stats.requests == 1
    await client.aclose()


async def test_total_timeout_covers_a_hanging_provider(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm, llm_total_timeout_s=0.3, llm_read_timeout_s=10.0)
    fake_llm.configure(hang=True)
    # Read timeouts alone would take 10 s (and retries): the total deadline must end it first.
    with trio.fail_after(5), pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "timeout"
    assert "within 0.3s" in str(caught.value)  # the total timeout's failure, not a read's
    assert fake_llm.stats.requests == 1
    fake_llm.configure(hang=False)
    await client.aclose()


async def test_read_timeout_is_a_retried_timeout(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm, llm_read_timeout_s=0.2, llm_max_retries=1)
    fake_llm.configure(hang=True)
    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "timeout" and fake_llm.stats.requests == 2
    fake_llm.configure(hang=False)
    await client.aclose()


async def test_constant_failure_opens_the_circuit_which_recovers(
    tmp_path: Path, fake_llm: FakeLLM, mock_clock: trio.testing.MockClock
) -> None:
    client = _client(
        tmp_path, fake_llm, llm_max_retries=0, llm_circuit_failures=3, llm_circuit_reset_s=30.0
    )
    fake_llm.configure(fail_next=1000, status=503)
    for _ in range(3):
        with pytest.raises(LLMError) as caught:
            await client.stream_chat(PROMPT)
        assert caught.value.reason == "provider_error"
    health = client.health()
    assert health["circuit"] == "open" and health["ok"] is False
    assert health["provider"] == "openai"
    # Open: refused at once, no request reaches the provider.
    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "circuit_open" and fake_llm.stats.requests == 3
    # After the pause one probe goes out; it fails, so the circuit opens again.
    mock_clock.jump(30)
    assert client.health()["circuit"] == "half_open"
    with pytest.raises(LLMError):
        await client.stream_chat(PROMPT)
    assert fake_llm.stats.requests == 4 and client.health()["circuit"] == "open"
    # The provider recovers: the next probe succeeds and closes the circuit.
    fake_llm.configure(fail_next=0)
    mock_clock.jump(30)
    completion = await client.stream_chat(PROMPT)
    assert completion.text
    assert client.health()["circuit"] == "closed" and client.health()["ok"] is True
    assert metrics.LLM_CIRCUIT_STATE._value.get() == 0
    await client.aclose()


async def test_unreachable_provider_is_a_connection_error(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = make_settings(
        tmp_path,
        llm_base_url=f"http://127.0.0.1:{port}/v1",
        llm_max_retries=1,
        llm_api_key="sk-secret-value",
    )
    client = LLMClient(OpenAIProvider(s), s, retry=RetryPolicy(1, base_s=0.01))
    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "provider_error"
    assert "sk-secret-value" not in str(caught.value)
    await client.aclose()


async def test_an_error_event_mid_stream_fails_the_call(tmp_path: Path, fake_llm: FakeLLM) -> None:
    client = _client(tmp_path, fake_llm, llm_max_retries=3)
    fake_llm.configure(error_after_tokens=2, tokens=10)
    got: list[str] = []

    async def on_text(text: str) -> None:
        got.append(text)

    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT, on_text=on_text)
    assert caught.value.reason == "provider_error" and caught.value.streamed
    assert got == ["the", " quick"] and fake_llm.stats.requests == 1
    await client.aclose()


async def test_a_retry_after_beyond_the_deadline_fails_at_once(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    client = _client(tmp_path, fake_llm, llm_total_timeout_s=5.0)
    fake_llm.configure(fail_next=1, status=429, retry_after=3600)
    start = trio.current_time()
    with pytest.raises(LLMError) as caught:
        await client.stream_chat(PROMPT)
    assert caught.value.reason == "provider_error" and fake_llm.stats.requests == 1
    assert trio.current_time() - start < 2.0
    await client.aclose()
