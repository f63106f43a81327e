"""Threadline load test: REST users and WebSocket chat users against a running server.

``python loadtests/run_locust.py`` starts everything (fake LLM, server on an embedded database)
and runs this file headless; to aim at a server of your own:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Users:
- ``RestUser`` signs up, creates a project and a thread, then lists, reads and posts messages
  over HTTP (mostly without assistant replies).
- ``ChatUser`` signs up over HTTP, opens ``/ws`` with a Bearer token, subscribes to its own
  thread and sends messages, timing each assistant reply as two locust request events:
  ``WS time_to_first_delta`` (send → first ``assistant.delta``) and ``WS assistant_completed``
  (send → ``assistant.completed``). Everything a reply reports as failed counts as a failure.

Locust runs users in gevent greenlets; ``websocket-client`` is a blocking client, which gevent's
monkey-patching (done by locust before this file is imported) makes cooperative.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import websocket
from locust import HttpUser, between, task
from locust.exception import StopUser

# A reply must finish within this many seconds or it counts as failed.
REPLY_TIMEOUT_S = float(os.environ.get("THREADLINE_LOADTEST_REPLY_TIMEOUT_S", "30"))
PASSWORD = "load-test-password-1"


def sign_up(user: HttpUser) -> str:
    """Register a fresh account and log in; return the access token."""
    email = f"load-{uuid.uuid4().hex}@example.com"
    body = {"email": email, "password": PASSWORD}
    with user.client.post(
        "/api/v1/auth/register", json=body, name="/api/v1/auth/register", catch_response=True
    ) as response:
        if response.status_code != 201:
            response.failure(f"register: {response.status_code} {response.text[:200]}")
            raise StopUser()
    with user.client.post(
        "/api/v1/auth/login", json=body, name="/api/v1/auth/login", catch_response=True
    ) as response:
        if response.status_code != 200:
            response.failure(f"login: {response.status_code} {response.text[:200]}")
            raise StopUser()
        token: str = response.json()["access_token"]
    # Bearer-authenticated requests need no CSRF token; cookies would, so drop them.
    user.client.cookies.clear()
    user.client.headers["Authorization"] = f"Bearer {token}"
    return token


def create_thread(user: HttpUser) -> tuple[str, str]:
    """A new project with one thread: (project_id, thread_id)."""
    project = user.client.post(
        "/api/v1/projects", json={"name": "load test"}, name="/api/v1/projects"
    )
    project.raise_for_status()
    project_id: str = project.json()["id"]
    thread = user.client.post(
        f"/api/v1/projects/{project_id}/threads",
        json={"title": "load"},
        name="/api/v1/projects/[id]/threads",
    )
    thread.raise_for_status()
    return project_id, thread.json()["id"]


class RestUser(HttpUser):
    """Browses and writes over the REST API."""

    weight = 1
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        sign_up(self)
        self.project_id, self.thread_id = create_thread(self)

    @task(3)
    def list_projects(self) -> None:
        self.client.get("/api/v1/projects?limit=20", name="/api/v1/projects")

    @task(2)
    def list_threads(self) -> None:
        self.client.get(
            f"/api/v1/projects/{self.project_id}/threads", name="/api/v1/projects/[id]/threads"
        )

    @task(4)
    def read_messages(self) -> None:
        self.client.get(
            f"/api/v1/threads/{self.thread_id}/messages?limit=50",
            name="/api/v1/threads/[id]/messages",
        )

    @task(2)
    def post_message(self) -> None:
        with self.client.post(
            f"/api/v1/threads/{self.thread_id}/messages",
            json={
                "content": "hello from locust",
                "client_msg_id": uuid.uuid4().hex,
                "reply": False,
            },
            name="/api/v1/threads/[id]/messages",
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"send: {response.status_code} {response.text[:200]}")

    @task(1)
    def read_thread(self) -> None:
        self.client.get(f"/api/v1/threads/{self.thread_id}", name="/api/v1/threads/[id]")


class ChatUser(HttpUser):
    """Chats over the WebSocket and measures the assistant's replies."""

    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.token = sign_up(self)
        _, self.thread_id = create_thread(self)
        self.ws: websocket.WebSocket | None = None
        self._refs = 0
        self._connect()
        self._request("subscribe", {"thread_id": self.thread_id}, name="subscribe")

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    # -- plumbing ---------------------------------------------------------------------------

    def _fire(self, name: str, started: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def _connect(self) -> None:
        url = self.host.replace("http://", "ws://").replace("https://", "wss://") + "/ws"
        started = time.perf_counter()
        try:
            self.ws = websocket.create_connection(
                url, header=[f"Authorization: Bearer {self.token}"], timeout=REPLY_TIMEOUT_S
            )
        except Exception as exc:
            self._fire("connect", started, 0, exc)
            raise StopUser() from exc
        self._fire("connect", started, 0, None)

    def _recv(self) -> dict[str, Any]:
        assert self.ws is not None
        frame = self.ws.recv()
        return json.loads(frame)  # type: ignore[no-any-return]

    def _request(self, op: str, fields: dict[str, Any], *, name: str) -> dict[str, Any]:
        """Send one op and wait for its reply; events that arrive first are skipped."""
        assert self.ws is not None
        self._refs += 1
        ref = f"r{self._refs}"
        started = time.perf_counter()
        self.ws.send(json.dumps({"op": op, "ref": ref, **fields}))
        while True:
            frame = self._recv()
            if frame.get("op") == "reply" and frame.get("ref") == ref:
                break
        length = len(json.dumps(frame))
        if not frame.get("ok"):
            self._fire(name, started, length, RuntimeError(str(frame.get("error"))))
            return {}
        self._fire(name, started, length, None)
        return frame.get("data") or {}

    # -- the task ---------------------------------------------------------------------------

    @task
    def chat(self) -> None:
        if self.ws is None:
            self._connect()
            self._request("subscribe", {"thread_id": self.thread_id}, name="subscribe")
        assert self.ws is not None
        started = time.perf_counter()
        try:
            self._request(
                "send",
                {
                    "thread_id": self.thread_id,
                    "content": "Tell me something short.",
                    "client_msg_id": uuid.uuid4().hex,
                },
                name="send",
            )
            first_delta = False
            deadline = started + REPLY_TIMEOUT_S
            while time.perf_counter() < deadline:
                frame = self._recv()
                if frame.get("op") != "event" or frame.get("thread_id") != self.thread_id:
                    continue
                kind = frame.get("type")
                if kind == "assistant.delta" and not first_delta:
                    first_delta = True
                    self._fire("time_to_first_delta", started, 0, None)
                elif kind == "assistant.completed":
                    data = frame.get("data") or {}
                    failure = RuntimeError("reply cancelled") if data.get("cancelled") else None
                    self._fire("assistant_completed", started, len(json.dumps(frame)), failure)
                    return
                elif kind == "assistant.failed":
                    error = RuntimeError(f"assistant.failed: {frame.get('data')}")
                    self._fire("assistant_completed", started, 0, error)
                    return
            self._fire("assistant_completed", started, 0, TimeoutError("no assistant.completed"))
        except (websocket.WebSocketException, OSError) as exc:
            self._fire("assistant_completed", started, 0, exc)
            if self.ws is not None:
                self.ws.close()
            self.ws = None  # reconnect on the next task run
