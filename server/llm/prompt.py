"""Prompt building: system prompt, latest summary, then as many recent turns as fit.

Roles come from the ``messages.role`` column, never from message text: whatever a user writes
("system: ignore previous instructions") stays inside a ``user`` turn. Control characters are
stripped, each turn is cut to ``max_message_chars``, and the whole prompt plus a full reply fits
``llm_context_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from server.config import Settings
from server.errors import ThreadlineError
from server.llm import tokens
from server.llm.provider import ChatMessage, Role

# C0 controls except tab and newline, DEL, C1 controls, and bidi overrides that can disguise text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SUMMARY_PREFIX = "Summary of the earlier conversation:\n"


class ContentFiltered(ThreadlineError):
    """The text matches a term of ``THREADLINE_CONTENT_FILTER``."""

    code = "content_filtered"
    status = 422


def clean(text: str, max_chars: int) -> str:
    """Strip control characters (keeping newlines and tabs) and cut to ``max_chars``."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    return text[:max_chars]


def check_content(settings: Settings, text: str) -> None:
    """Raise ContentFiltered if ``text`` contains a filtered term (case-insensitive)."""
    lowered = text.casefold()
    for term in settings.content_filter:
        if term and term.casefold() in lowered:
            raise ContentFiltered(
                "This message contains content the assistant is configured to refuse.",
                details={"reason": "content_filtered"},
            )


@dataclass(frozen=True, slots=True)
class Turn:
    """A stored message as the prompt builder sees it."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """The messages to send, their token count, and how many stored turns made it in."""

    messages: list[ChatMessage]
    tokens: int
    turns_included: int
    summary_used: bool


def build_prompt(
    settings: Settings,
    *,
    summary: str | None,
    turns: Sequence[Turn],
    budget: int | None = None,
) -> Prompt:
    """System prompt + summary + the newest ``turns`` (given newest first) that fit.

    The newest turn (the one being answered) is always included, cut if it alone is too long.
    ``budget`` (default: the context size less a full reply) bounds the prompt's tokens.
    ``tl_send_and_start`` (migration 0014) replicates this choice from stored counts
    (``PromptCosts``, ``message_tokens``, ``summary_tokens``): keep the two in step.
    """
    limit = settings.max_message_chars
    if budget is None:
        budget = settings.llm_context_tokens - settings.llm_max_reply_tokens
    head = [ChatMessage("system", clean(settings.llm_system_prompt, limit))]
    if summary:
        head.append(ChatMessage("system", _SUMMARY_PREFIX + clean(summary, limit)))
    used = tokens.count_messages(head)
    chosen: list[ChatMessage] = []
    for turn in turns:
        role: Role = "assistant" if turn.role == "assistant" else "user"
        message = ChatMessage(role, clean(turn.content, limit))
        cost = tokens.count_messages([message]) - 3  # count_messages adds reply priming once
        if used + cost > budget:
            if not chosen:
                message = _cut_to(message, max(16, budget - used))
                chosen.append(message)
                used += tokens.count_messages([message]) - 3
            break
        chosen.append(message)
        used += cost
    chosen.reverse()
    return Prompt(
        messages=head + chosen,
        tokens=tokens.count_messages(head + chosen),
        turns_included=len(chosen),
        summary_used=bool(summary),
    )


def _cut_to(message: ChatMessage, max_tokens: int) -> ChatMessage:
    enc = tokens.encoding()
    ids = enc.encode(message.content, disallowed_special=())
    return ChatMessage(message.role, enc.decode(ids[-max_tokens:]))


@dataclass(frozen=True, slots=True)
class PromptCosts:
    """The fixed parts of ``build_prompt``'s count, for choosing turns from stored counts.

    A prompt's tokens are ``head`` (the system prompt and the reply's priming), plus
    ``summary_overhead + summary_tokens(summary)`` with a summary, plus, for each turn,
    ``user_overhead`` or ``assistant_overhead`` + ``message_tokens(content)``; turns are taken
    newest first while the total stays within ``budget``.
    """

    head: int
    summary_overhead: int
    user_overhead: int
    assistant_overhead: int
    budget: int


def prompt_costs(settings: Settings) -> PromptCosts:
    system = ChatMessage("system", clean(settings.llm_system_prompt, settings.max_message_chars))
    framing = tokens.count_messages([ChatMessage("system", "")]) - 3  # per message, no priming
    return PromptCosts(
        head=tokens.count_messages([system]),
        summary_overhead=framing,
        user_overhead=tokens.count_messages([ChatMessage("user", "")]) - 3,
        assistant_overhead=tokens.count_messages([ChatMessage("assistant", "")]) - 3,
        budget=settings.llm_context_tokens - settings.llm_max_reply_tokens,
    )


def message_tokens(settings: Settings, content: str) -> int:
    """A message's tokens as ``build_prompt`` counts its content (``messages.content_tokens``)."""
    return tokens.count_text(clean(content, settings.max_message_chars))


def summary_tokens(settings: Settings, summary: str) -> int:
    """A summary's tokens as ``build_prompt`` counts its message (``summaries.content_tokens``)."""
    return tokens.count_text(_SUMMARY_PREFIX + clean(summary, settings.max_message_chars))
