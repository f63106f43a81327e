"""Register, login, me, logout over real HTTP against the real server and database."""

from __future__ import annotations

import uuid

import httpx

from server import auth
from server.runtime import RunningServer


def _email() -> str:
    return f"u-{uuid.uuid4().hex[:10]}@example.com"


async def _register(client: httpx.AsyncClient, email: str, password: str = "pw-12345678") -> dict:
    response = await client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    return response.json()["user"]


async def _login(client: httpx.AsyncClient, email: str, password: str = "pw-12345678") -> dict:
    response = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


async def test_register_login_me_logout(client: httpx.AsyncClient) -> None:
    email = _email()
    user = await _register(client, email)
    assert user["email"] == email and isinstance(user["id"], str)

    body = await _login(client, email)
    assert body["user"] == user
    token = body["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}

    me = await client.get("/api/v1/auth/me", headers=bearer)
    assert me.status_code == 200
    assert me.json() == {"user": user}

    out = await client.post("/api/v1/auth/logout", headers=bearer)
    assert out.status_code == 204
    again = await client.get("/api/v1/auth/me", headers=bearer)
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "unauthorized"


async def test_issue_token_helper(server: RunningServer, client: httpx.AsyncClient) -> None:
    user, token = await auth.create_user_with_token(server.services)
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["user"]["id"] == user.id
