"""Helpers for the WebSocket tests: users, threads and a small JSON client over trio-websocket."""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from server.auth import create_user_with_token
from server.commands.bus import execute
from server.commands.models import CreateProject, CreateThread, SendMessage
from server.principal import Principal
from server.runtime import RunningServer, open_server
from server.services import Services
from server.ws import Realtime
from tests.conftest import make_settings


@contextlib.asynccontextmanager
async def server_with(
    tmp_path: Path, pg_dsn: str, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A whole server on a free loopback port, with settings overridden for one test."""
    async with open_server(
        make_settings(tmp_path, **overrides), pg_dsn, bind="127.0.0.1:0"
    ) as running:
        yield running


def realtime(server: RunningServer) -> Realtime:
    return server.services.extras["realtime"]  # type: ignore[no-any-return]


async def until(predicate: Any, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a bounded loop on a condition, not a sleep for time to pass)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@dataclass
class Owner:
    """A user with a bearer token and one project."""

    principal: Principal
    token: str
    project_id: str


async def new_owner(services: Services) -> Owner:
    user, token = await create_user_with_token(services)
    principal = Principal(
        user_id=user.id, email=user.email, jti=uuid.uuid4().hex, expires_at=2e9, via="bearer"
    )
    project = await execute(services, principal, CreateProject(name="p"))
    assert project.data is not None
    return Owner(principal, token, str(project.data["id"]))


async def new_thread(services: Services, owner: Owner) -> str:
    thread = await execute(
        services, owner.principal, CreateThread(project_id=owner.project_id, title="t")
    )
    assert thread.data is not None
    return str(thread.data["id"])


async def post(services: Services, owner: Owner, thread_id: str, content: str) -> dict[str, Any]:
    """Send a user message through the command bus (as REST does), without an assistant reply."""
    result = await execute(
        services,
        owner.principal,
        SendMessage(
            thread_id=thread_id, content=content, client_msg_id=uuid.uuid4().hex, reply=False
        ),
    )
    assert result.data is not None
    return result.data


def ws_url(server: RunningServer) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


class Client:
    """A JSON WebSocket client: ``request`` waits for its reply, events queue up in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._refs = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self._replies: dict[str, dict[str, Any]] = {}
        self.reply_refs: list[str | None] = []  # every reply's ref, in the order read
        self._changed = trio.Event()
        self.closed: tuple[int | None, str | None] | None = None

    async def pump(self) -> None:
        """Read frames until the connection closes (run it in a nursery)."""
        from trio_websocket import ConnectionClosed

        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                if frame["op"] == "reply":
                    self._replies[frame["ref"]] = frame
                    self.reply_refs.append(frame["ref"])
                else:
                    self.events.append(frame)
                self._changed.set()
                self._changed = trio.Event()
        except ConnectionClosed as exc:
            self.closed = (exc.reason.code, exc.reason.reason)
            self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                if self.closed is not None and not predicate():
                    raise AssertionError(f"closed {self.closed} while waiting")
                await self._changed.wait()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        ref = f"r{next(self._refs)}"
        await self.ws.send_message(json.dumps({"op": op, "ref": ref, **fields}))
        await self.wait_for(lambda: ref in self._replies)
        return self._replies.pop(ref)

    async def wait_events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.wait_for(lambda: len(self.events) >= count, timeout)
        return self.events

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        with trio.fail_after(timeout):
            while self.closed is None:
                await self._changed.wait()
        return self.closed


@contextlib.asynccontextmanager
async def connect(server: RunningServer, token: str) -> AsyncIterator[Client]:
    """Open an authenticated WebSocket and pump it for the duration of the block."""
    async with (
        open_websocket_url(
            ws_url(server), extra_headers=[("Authorization", f"Bearer {token}")]
        ) as ws,
        trio.open_nursery() as nursery,
    ):
        client = Client(ws)
        nursery.start_soon(client.pump)
        yield client
        nursery.cancel_scope.cancel()
