"""The built-in offline model: deterministic, no network, and it says what it is.

It answers when no ``THREADLINE_LLM_BASE_URL`` is configured, so a fresh install works end to
end. Its model name is ``threadline-offline`` (priced at zero) and every reply states that it
comes from the offline model, so nobody mistakes it for a real one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import trio

from server.llm import tokens
from server.llm.provider import ChatMessage, Completion, OnText, Usage

OFFLINE_MODEL = "threadline-offline"
SUMMARY_MARKER = "[summarise]"  # the summariser's instruction starts with this
_PIECES = re.compile(r"\S+\s*|\s+")
_EXCERPT_CHARS = 160


def offline_reply(messages: Sequence[ChatMessage]) -> str:
    """The offline model's whole answer to ``messages`` (a pure function of them)."""
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    if any(m.role == "system" and m.content.startswith(SUMMARY_MARKER) for m in messages):
        words = len(last_user.split())
        excerpt = " ".join(last_user.split()[:24])
        return f"(offline model summary of {words} words) {excerpt}"
    excerpt = " ".join(last_user.split())
    if len(excerpt) > _EXCERPT_CHARS:
        excerpt = excerpt[:_EXCERPT_CHARS].rstrip() + "…"
    return (
        "This reply comes from Threadline's built-in offline model (threadline-offline), not "
        "from a language model: no provider is configured (set THREADLINE_LLM_BASE_URL). "
        f'You wrote {len(last_user.split())} words: "{excerpt}"'
    )


class OfflineProvider:
    """The offline model as a Provider: streams its answer word by word."""

    name = "offline"
    model = OFFLINE_MODEL

    async def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, on_text: OnText
    ) -> Completion:
        """See ``Provider.stream``; never fails, never touches the network."""
        text = offline_reply(messages)
        pieces = _PIECES.findall(text)[:max_tokens]
        for piece in pieces:
            await trio.lowlevel.checkpoint()
            await on_text(piece)
        answer = "".join(pieces)
        usage = Usage(
            prompt_tokens=tokens.count_messages(messages),
            completion_tokens=tokens.count_text(answer),
        )
        finish = "stop" if len(pieces) == len(_PIECES.findall(text)) else "length"
        return Completion(text=answer, model=self.model, usage=usage, finish_reason=finish)

    async def aclose(self) -> None:
        return None
