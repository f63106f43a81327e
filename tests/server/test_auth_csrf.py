"""The CSRF double-submit matrix for cookie sessions, over real HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.conftest import make_settings

APP_ORIGIN = "https://app.example"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, allowed_origins=[APP_ORIGIN])


async def _session(client: httpx.AsyncClient) -> tuple[str, str]:
    """Register and log in a fresh user; return (session token, csrf token). The jar stays empty."""
    email = f"c-{uuid.uuid4().hex[:10]}@example.com"
    body = {"email": email, "password": "pw-12345678"}
    assert (await client.post("/api/v1/auth/register", json=body)).status_code == 201
    login = await client.post("/api/v1/auth/login", json=body)
    assert login.status_code == 200
    client.cookies.clear()
    return login.json()["access_token"], login.json()["csrf_token"]


def _cookie(session: str, csrf: str | None) -> str:
    return f"tl_session={session}" + (f"; tl_csrf={csrf}" if csrf is not None else "")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_header", 403),
        ("wrong_header", 403),
        ("planted_pair", 403),
        ("no_csrf_cookie", 403),
        ("right", 204),
        ("right_allowed_origin", 204),
        ("right_foreign_origin", 403),
        ("right_null_origin", 403),
    ],
)
async def test_cookie_authenticated_unsafe_request(
    client: httpx.AsyncClient, case: str, expected: int
) -> None:
    session, csrf = await _session(client)
    cookie_csrf: str | None = csrf
    headers: dict[str, str] = {}
    if case == "wrong_header":
        headers["X-CSRF-Token"] = csrf[:-2] + ("AA" if not csrf.endswith("AA") else "BB")
    elif case == "planted_pair":
        # An attacker able to set cookies on the domain still cannot mint a valid token.
        cookie_csrf = headers["X-CSRF-Token"] = "attacker-chosen-value"
    elif case == "no_csrf_cookie":
        cookie_csrf = None
        headers["X-CSRF-Token"] = csrf
    elif case != "no_header":
        headers["X-CSRF-Token"] = csrf
    if case == "right_allowed_origin":
        headers["Origin"] = APP_ORIGIN
    elif case == "right_foreign_origin":
        headers["Origin"] = "https://evil.example"
    elif case == "right_null_origin":
        headers["Origin"] = "null"
    headers["Cookie"] = _cookie(session, cookie_csrf)

    response = await client.post("/api/v1/auth/logout", headers=headers)
    assert response.status_code == expected, response.text
    if expected == 403:
        assert response.json()["error"]["code"] == "csrf_failed"
        # Refused means nothing happened: the session still works.
        me = await client.get("/api/v1/auth/me", headers={"Cookie": _cookie(session, csrf)})
        assert me.status_code == 200
    else:
        me = await client.get("/api/v1/auth/me", headers={"Cookie": _cookie(session, csrf)})
        assert me.status_code == 401


async def test_safe_methods_need_no_csrf_token(client: httpx.AsyncClient) -> None:
    session, _ = await _session(client)
    me = await client.get(
        "/api/v1/auth/me",
        headers={"Cookie": f"tl_session={session}", "Origin": "https://evil.example"},
    )
    assert me.status_code == 200


async def test_bearer_requests_are_exempt(client: httpx.AsyncClient) -> None:
    session, _ = await _session(client)
    response = await client.post(
        "/api/v1/auth/logout",
        headers={"Authorization": f"Bearer {session}", "Origin": "https://evil.example"},
    )
    assert response.status_code == 204


async def test_csrf_token_of_another_session_is_refused(client: httpx.AsyncClient) -> None:
    session_a, _ = await _session(client)
    _, csrf_b = await _session(client)
    response = await client.post(
        "/api/v1/auth/logout",
        headers={"Cookie": _cookie(session_a, csrf_b), "X-CSRF-Token": csrf_b},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
