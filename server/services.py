"""The process-wide services a request handler may use, built once by the runtime."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from server.config import Settings
from server.db import Database
from server.events import Publish, drop_event


@dataclass
class Services:
    """Everything the transports need, owned by the runtime (not by the web framework).

    Subsystems fill in their hooks when they start (see ``server.runtime.PLUGINS``):
    ``publish`` is replaced by the actor hub; ``extras`` holds components that report health
    (``"llm"``, ``"supervisor"``), extra blueprints (``"blueprints"``) and ``"shutdown_hooks"``.
    """

    settings: Settings
    db: Database
    head_revision: str
    draining: trio.Event = field(default_factory=trio.Event)
    publish: Publish = drop_event
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
