"""A small authenticated REST client for the resource tests (real HTTP, real users)."""

from __future__ import annotations

from typing import Any

import httpx

from server.auth import create_user_with_token
from server.runtime import RunningServer


class Api:
    """An authenticated client of one user."""

    def __init__(self, client: httpx.AsyncClient, token: str, user_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, *, expect: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = await self.client.request(method, "/api/v1" + path, headers=headers, **kwargs)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response

    async def project(self, **body: Any) -> dict[str, Any]:
        body.setdefault("name", "proj")
        return (await self.call("POST", "/projects", json=body, expect=201)).json()  # type: ignore[no-any-return]

    async def thread(self, project_id: str, title: str = "t") -> dict[str, Any]:
        r = await self.call(
            "POST", f"/projects/{project_id}/threads", json={"title": title}, expect=201
        )
        return r.json()  # type: ignore[no-any-return]

    async def send(self, thread_id: str, content: str, **body: Any) -> httpx.Response:
        body.setdefault("reply", False)
        return await self.call(
            "POST", f"/threads/{thread_id}/messages", json={"content": content, **body}
        )


async def new_api(server: RunningServer, client: httpx.AsyncClient) -> Api:
    user, token = await create_user_with_token(server.services)
    return Api(client, token, user.id)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error  # type: ignore[no-any-return]
