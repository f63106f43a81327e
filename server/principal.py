"""Who is acting: the authenticated user behind a request or a WebSocket connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user. ``via`` says how the credential arrived (CSRF rules depend on it)."""

    user_id: str
    email: str
    jti: str
    expires_at: float  # Unix time at which the credential expires
    via: Literal["cookie", "bearer"]
