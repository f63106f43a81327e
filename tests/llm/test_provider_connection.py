"""How the OpenAI-compatible provider uses its HTTP connection and builds its requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from server.llm.fake_server import FakeLLM
from server.llm.openai_provider import OpenAIProvider
from server.llm.provider import ChatMessage
from tests.llm.conftest import llm_settings


async def _nothing(text: str) -> None:
    pass


async def test_a_warm_provider_connection_is_reused(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """Consecutive replies go over one kept-alive connection: the body is read to its end after
    ``[DONE]``, so the connection goes back to the pool instead of being closed (which made every
    reply pay a new TCP handshake, and a TLS one with a real provider)."""
    provider = OpenAIProvider(llm_settings(tmp_path, fake_llm))
    fake_llm.configure(tokens=3)
    for _ in range(3):
        completion = await provider.stream(
            [ChatMessage("user", "hello")], max_tokens=16, on_text=_nothing
        )
        assert completion.finish_reason == "stop"
    assert fake_llm.stats.requests == 3
    assert fake_llm.stats.connections == 1
    await provider.aclose()


async def test_a_body_held_open_after_done_costs_at_most_the_drain_bound(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """A provider that keeps the body open after ``[DONE]`` gets a complete answer back at once
    (within the drain bound, 0.5 s), not after the read timeout; only its connection is lost."""
    provider = OpenAIProvider(llm_settings(tmp_path, fake_llm, llm_read_timeout_s=30.0))
    fake_llm.configure(tokens=3, hold_after_done=True)
    started = trio.current_time()
    with trio.fail_after(5):
        completion = await provider.stream(
            [ChatMessage("user", "hello")], max_tokens=16, on_text=_nothing
        )
    assert completion.text == "the quick brown"
    assert completion.usage is not None
    assert trio.current_time() - started < 3.0
    fake_llm.configure(hold_after_done=False)
    await provider.aclose()


async def test_the_prompt_reaches_the_provider_as_built(
    tmp_path: Path, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages go on the wire exactly as built, in order, with the request's other fields; and
    they skip the client's per-message TypedDict transform (about 0.18 ms of CPU per message,
    the identity for role/content text messages): only the request's other fields pass it."""
    from openai.resources.chat.completions import completions

    transformed: list[Any] = []
    original = completions.async_maybe_transform

    async def spy(data: Any, expected_type: Any) -> Any:
        transformed.append(data)
        return await original(data, expected_type)

    monkeypatch.setattr(completions, "async_maybe_transform", spy)
    provider = OpenAIProvider(llm_settings(tmp_path, fake_llm))
    prompt = [
        ChatMessage("system", "You are terse."),
        *(ChatMessage("user" if i % 2 else "assistant", f"turn {i} ü 'q' \\n") for i in range(40)),
    ]
    await provider.stream(prompt, max_tokens=42, on_text=_nothing)
    assert fake_llm.stats.last_messages == [{"role": m.role, "content": m.content} for m in prompt]
    assert fake_llm.stats.last_max_tokens == 42
    assert transformed and all(len(list(body["messages"])) == 0 for body in transformed)
    await provider.aclose()


def test_the_first_request_finds_its_imports_done(tmp_path: Path) -> None:
    """Building the provider imports what the first request would otherwise import lazily
    (the chat resources and the transport's trio backend), in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from server.llm.openai_provider import OpenAIProvider\n"
        "from tests.conftest import make_settings\n"
        "from pathlib import Path\n"
        f"s = make_settings(Path({str(tmp_path)!r}), llm_base_url='http://127.0.0.1:9/v1')\n"
        "before = {m for m in ('anyio._backends._trio',"
        " 'openai.resources.chat.completions.completions') if m in sys.modules}\n"
        "OpenAIProvider(s)\n"
        "after = {m for m in ('anyio._backends._trio',"
        " 'openai.resources.chat.completions.completions') if m in sys.modules}\n"
        "print(len(before), len(after))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["0", "2"], out.stdout + out.stderr
