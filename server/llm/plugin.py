"""The assistant subsystem as a runtime plugin: provider, client, replies and the summariser.

Fills ``services.assistant`` (the ``Assistant`` the bus and WebSocket call),
``services.extras["llm"]`` (its ``health()`` is the /readyz ``llm`` check) and
``services.extras["summariser"]``, and registers a shutdown hook that saves in-flight replies
as ``interrupted``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from server.config import Settings
from server.events import ThreadEvent
from server.llm import tokens
from server.llm.client import LLMClient
from server.llm.generation import AssistantService
from server.llm.offline import OfflineProvider
from server.llm.openai_provider import OpenAIProvider
from server.llm.provider import Provider
from server.llm.summaries import build_summariser
from server.services import Services

_CLOSE_TIMEOUT_S = 2.0


def build_provider(settings: Settings) -> Provider:
    """The configured OpenAI-compatible provider, else the built-in offline model."""
    if settings.llm_base_url:
        return OpenAIProvider(settings)
    return OfflineProvider()


@contextlib.asynccontextmanager
async def assistant_plugin(services: Services) -> AsyncIterator[None]:
    """Run the assistant subsystem for the lifetime of the server (see module docstring)."""
    # Build the tokenizer now, off the event loop: done lazily, the first reply would block
    # every task for the ~0.5 s it takes to load the ranks.
    await trio.to_thread.run_sync(tokens.encoding)
    llm = LLMClient(build_provider(services.settings), services.settings)

    def publish(event: ThreadEvent) -> None:
        services.publish(event)  # looked up per call: the actor hub may attach after us

    try:
        async with trio.open_nursery() as nursery:
            summariser = build_summariser(services.db, llm, services.settings, publish)
            await nursery.start(summariser.run)
            assistant = AssistantService(services, llm, nursery, on_completed=summariser.poke)
            services.assistant = assistant
            services.extras["llm"] = llm
            services.extras["summariser"] = summariser
            services.shutdown_hooks.append(assistant.shutdown)
            nursery.start_soon(assistant.sweep_stale)
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await assistant.shutdown()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
            await llm.aclose()
