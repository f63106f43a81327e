"""Token counting is cl100k_base, from the bundled file, with no network and no cache."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from server.llm import tokens
from server.llm.provider import ChatMessage


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Any connection attempt is recorded and refused; tiktoken's caches point at nothing."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty-cache"))
    tokens.encoding.cache_clear()
    return attempts


def test_known_texts_have_cl100k_base_counts(no_network: list[Any], tmp_path: Path) -> None:
    # Reference ids from OpenAI's cl100k_base (tiktoken's own README example).
    assert tokens.encoding().encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tokens.count_text("hello world") == 2
    assert tokens.count_text("") == 0
    # Special-token lookalikes in user text are ordinary text, not control tokens.
    assert tokens.count_text("<|endoftext|>") > 1
    assert no_network == []
    assert not (tmp_path / "empty-cache").exists()


def test_chat_prompt_counting_matches_openai_accounting() -> None:
    # 3 framing tokens per message + role + content, plus 3 priming the reply.
    prompt = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "hi")]
    expected = (3 + 1 + tokens.count_text(prompt[0].content)) + (3 + 1 + 1) + 3
    assert tokens.count_messages(prompt) == expected


def test_a_corrupt_bundle_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setattr(tokens, "bundled_ranks_path", lambda: bad)
    tokens.encoding.cache_clear()
    try:
        with pytest.raises(tokens.TokenizerUnavailable):
            tokens.encoding()
    finally:
        monkeypatch.undo()
        tokens.encoding.cache_clear()
