"""The built-in offline model: deterministic, labelled, no network."""

from __future__ import annotations

from server.llm import tokens
from server.llm.offline import SUMMARY_MARKER, OfflineProvider, offline_reply
from server.llm.provider import ChatMessage

PROMPT = [ChatMessage("system", "Be brief."), ChatMessage("user", "What is trio?")]


async def test_offline_reply_is_deterministic_labelled_and_counted() -> None:
    provider = OfflineProvider()
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    first = await provider.stream(PROMPT, max_tokens=500, on_text=on_text)
    second = await provider.stream(PROMPT, max_tokens=500, on_text=on_text)
    assert first == second and first.text == offline_reply(PROMPT)
    assert "".join(pieces) == first.text * 2
    assert first.model == "threadline-offline" and "offline model" in first.text
    assert '"What is trio?"' in first.text and first.finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.prompt_tokens == tokens.count_messages(PROMPT)
    assert first.usage.completion_tokens == tokens.count_text(first.text)


async def test_offline_reply_respects_max_tokens() -> None:
    async def ignore(text: str) -> None:
        return None

    cut = await OfflineProvider().stream(PROMPT, max_tokens=3, on_text=ignore)
    assert cut.finish_reason == "length" and len(cut.text.split()) == 3


def test_offline_summary_is_labelled() -> None:
    prompt = [ChatMessage("system", SUMMARY_MARKER + " summarise"), ChatMessage("user", "a b c")]
    assert offline_reply(prompt).startswith("(offline model summary of 3 words)")
