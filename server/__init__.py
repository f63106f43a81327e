"""Threadline server: HTTP/WebSocket transport, auth, commands, storage, LLM and ops endpoints."""

from __future__ import annotations

__version__ = "0.1.0"
