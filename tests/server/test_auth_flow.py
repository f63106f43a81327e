"""Register, login, me, logout over real HTTP against the real server and database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server import auth, migrate
from server.config import ConfigError, load_settings
from server.runtime import RunningServer, open_server
from tests.conftest import make_settings

PASSWORD = "pw-12345678"


def _email() -> str:
    return f"u-{uuid.uuid4().hex[:10]}@example.com"


async def _register(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": password}
    )
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()["user"]
    return user


async def _login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/api/v1/auth/login", json={"email": email, "password": password})


def _set_cookies(response: httpx.Response) -> dict[str, str]:
    """Set-Cookie headers by cookie name (the raw header, attributes included)."""
    return {h.split("=", 1)[0]: h for h in response.headers.get_list("set-cookie")}


async def test_register_login_me_logout(client: httpx.AsyncClient) -> None:
    email = _email()
    user = await _register(client, email)
    assert set(user) == {"id", "email"}
    assert user["email"] == email

    login = await _login(client, email)
    assert login.status_code == 200, login.text
    body = login.json()
    assert body["user"] == user
    assert body["access_token"] and body["csrf_token"]
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    client.cookies.clear()

    me = await client.get("/api/v1/auth/me", headers=bearer)
    assert me.status_code == 200
    assert me.json() == {"user": user}

    out = await client.post("/api/v1/auth/logout", headers=bearer)
    assert out.status_code == 204
    again = await client.get("/api/v1/auth/me", headers=bearer)
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "unauthorized"


async def test_login_sets_the_contract_cookies(client: httpx.AsyncClient) -> None:
    email = _email()
    await _register(client, email)
    login = await _login(client, email)
    cookies = _set_cookies(login)
    session = cookies["tl_session"].lower()
    assert "httponly" in session and "samesite=strict" in session and "path=/" in session
    assert "secure" not in session  # plain HTTP in a test environment
    csrf = cookies["tl_csrf"].lower()
    assert "samesite=strict" in csrf and "httponly" not in csrf
    assert login.headers["cache-control"] == "no-store"
    assert client.cookies["tl_csrf"] == login.json()["csrf_token"]
    assert client.cookies["tl_session"] == login.json()["access_token"]

    # The cookie alone authenticates a safe request.
    me = await client.get("/api/v1/auth/me")
    assert me.status_code == 200

    # Cookie logout (with its CSRF token) revokes the token and clears both cookies.
    token = login.json()["access_token"]
    out = await client.post(
        "/api/v1/auth/logout", headers={"X-CSRF-Token": login.json()["csrf_token"]}
    )
    assert out.status_code == 204
    cleared = _set_cookies(out)
    assert set(cleared) == {"tl_session", "tl_csrf"}
    assert all("max-age=0" in c.lower() or "expires=" in c.lower() for c in cleared.values())
    client.cookies.clear()
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401


async def test_secure_cookies_in_production(tmp_path: Path, pg_dsn: str) -> None:
    settings = make_settings(tmp_path, env="production")
    async with (
        open_server(settings, pg_dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        email = _email()
        await _register(http, email)
        login = await _login(http, email)
        assert login.status_code == 200
        cookies = _set_cookies(login)
        assert set(cookies) == {"tl_session", "tl_csrf", "tl_device"}, cookies
        for header in cookies.values():
            assert "; secure" in header.lower(), header


async def test_bad_credentials_do_not_say_what_was_wrong(client: httpx.AsyncClient) -> None:
    email = _email()
    await _register(client, email)
    wrong_password = await _login(client, email, "not-the-password")
    unknown_user = await _login(client, _email())
    assert wrong_password.status_code == unknown_user.status_code == 401
    a, b = wrong_password.json()["error"], unknown_user.json()["error"]
    assert a["code"] == b["code"] == "unauthorized"
    assert a["message"] == b["message"]
    assert "tl_session" not in _set_cookies(wrong_password)


async def test_login_email_is_case_insensitive(client: httpx.AsyncClient) -> None:
    email = _email()
    await _register(client, email)
    login = await _login(client, email.upper())
    assert login.status_code == 200
    assert login.json()["user"]["email"] == email


async def test_duplicate_email_is_a_conflict_case_insensitively(
    client: httpx.AsyncClient,
) -> None:
    email = _email()
    await _register(client, email)
    again = await client.post(
        "/api/v1/auth/register", json={"email": email.upper(), "password": PASSWORD}
    )
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "conflict"
    assert error["details"]["fields"] == ["email"]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, ["email"]),
        ({"email": "a@b.example", "password": "short"}, ["password"]),
        ({"email": "a@b.example", "password": "x" * 1025}, ["password"]),
        ({"password": PASSWORD}, ["email"]),
        ({"email": 5, "password": None}, ["email", "password"]),
    ],
)
async def test_register_validation_names_the_fields(
    client: httpx.AsyncClient, body: dict[str, Any], fields: list[str]
) -> None:
    response = await client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    assert error["details"]["fields"] == fields
    assert PASSWORD not in response.text


async def test_register_refuses_non_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/auth/register", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


async def test_password_hash_is_upgraded_when_parameters_change(
    tmp_path: Path, pg_dsn: str
) -> None:
    email = _email()
    weak = make_settings(tmp_path / "a")
    async with (
        open_server(weak, pg_dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        await _register(http, email)
    stronger = make_settings(tmp_path / "b", argon2_time_cost=2)
    async with (
        open_server(stronger, pg_dsn, bind="127.0.0.1:0") as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        assert (await _login(http, email)).status_code == 200
        row = await running.services.db.fetchrow(
            "SELECT password_hash FROM users WHERE email = $1", email
        )
        assert row is not None and "t=2" in row["password_hash"]
        assert row["password_hash"].startswith("$argon2id$")
        assert (await _login(http, email)).status_code == 200


async def test_login_from_a_foreign_origin_is_refused(client: httpx.AsyncClient) -> None:
    email = _email()
    await _register(client, email)
    response = await client.post(
        "/api/v1/auth/login",
        json={"email": email, "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    assert "tl_session" not in _set_cookies(response)


async def test_create_user_with_token_helper(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user, token = await auth.create_user_with_token(server.services)
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["user"] == user.public()


@pytest.fixture
async def single_user_server(tmp_path: Path, scratch_dsn: str) -> AsyncIterator[RunningServer]:
    """A single-user server on its own empty database (the shared one already has users)."""
    migrate.upgrade(scratch_dsn)
    settings = make_settings(tmp_path, single_user=True)
    async with open_server(settings, scratch_dsn, bind="127.0.0.1:0") as running:
        yield running


async def test_single_user_refuses_a_second_registration(
    single_user_server: RunningServer, scratch_dsn: str
) -> None:
    async with httpx.AsyncClient(base_url=single_user_server.url, timeout=30) as http:
        await _register(http, _email())
        second = await http.post(
            "/api/v1/auth/register", json={"email": _email(), "password": PASSWORD}
        )
        assert second.status_code == 403
        error = second.json()["error"]
        assert error["code"] == "forbidden"
        assert "single-user" in error["message"]
    with psycopg.connect(scratch_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM users").fetchone()
    assert row is not None and row[0] == 1


def test_argon2_memory_must_fit_the_parallelism() -> None:
    with pytest.raises(ConfigError):
        load_settings(argon2_memory_kib=16, argon2_parallelism=4)
