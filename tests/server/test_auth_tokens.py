"""Forged, expired, misaddressed and misplaced tokens are refused (401) over real HTTP."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest

from server import auth
from server.runtime import RunningServer


async def _user_token(server: RunningServer) -> tuple[str, str]:
    user, token = await auth.create_user_with_token(server.services)
    return user.id, token


def _claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "aud": "threadline",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "typ": "access",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


async def _me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})


async def test_a_well_formed_token_is_accepted(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    # The control for every refusal below: the same recipe with the right key works.
    user_id, _ = await _user_token(server)
    key = server.services.settings.signing_key()
    token = jwt.encode(_claims(user_id), key, algorithm="HS256")
    assert (await _me(client, token)).status_code == 200


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize(
    "case",
    [
        "alg_none",
        "bad_signature",
        "hs512",
        "expired",
        "wrong_aud",
        "no_aud",
        "wrong_typ",
        "no_jti",
        "no_exp",
        "no_iat",
        "future_iat",
        "sub_not_uuid",
        "unknown_user",
        "garbage",
    ],
)
async def test_bad_tokens_are_refused(
    server: RunningServer, client: httpx.AsyncClient, case: str
) -> None:
    user_id, _ = await _user_token(server)
    key = server.services.settings.signing_key()
    now = int(time.time())
    tokens = {
        "alg_none": lambda: jwt.encode(_claims(user_id), None, algorithm="none"),
        "bad_signature": lambda: jwt.encode(
            _claims(user_id), "another-key-that-is-long-enough-for-hs256", algorithm="HS256"
        ),
        "hs512": lambda: jwt.encode(_claims(user_id), key, algorithm="HS512"),
        "expired": lambda: jwt.encode(
            _claims(user_id, iat=now - 7200, exp=now - 3600), key, algorithm="HS256"
        ),
        "wrong_aud": lambda: jwt.encode(_claims(user_id, aud="other"), key, algorithm="HS256"),
        "no_aud": lambda: jwt.encode(_claims(user_id, aud=None), key, algorithm="HS256"),
        "wrong_typ": lambda: jwt.encode(_claims(user_id, typ="refresh"), key, algorithm="HS256"),
        "no_jti": lambda: jwt.encode(_claims(user_id, jti=None), key, algorithm="HS256"),
        "no_exp": lambda: jwt.encode(_claims(user_id, exp=None), key, algorithm="HS256"),
        "no_iat": lambda: jwt.encode(_claims(user_id, iat=None), key, algorithm="HS256"),
        "future_iat": lambda: jwt.encode(_claims(user_id, iat=now + 3600), key, algorithm="HS256"),
        "sub_not_uuid": lambda: jwt.encode(_claims("admin"), key, algorithm="HS256"),
        "unknown_user": lambda: jwt.encode(_claims(str(uuid.uuid4())), key, algorithm="HS256"),
        "garbage": lambda: "not.a.jwt",
    }
    response = await _me(client, tokens[case]())
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert "Traceback" not in response.text


async def test_tampered_payload_is_refused(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    _, token = await _user_token(server)
    other_id, _ = await _user_token(server)
    header, _, signature = token.split(".")
    # Every claim of the real token, valid as it is; only ``sub`` now names another user.
    claims = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "aud", "iat", "exp", "jti", "typ"} <= claims.keys()
    forged_claims = {**claims, "sub": other_id}
    forged_payload = jwt.api_jws.base64url_encode(
        json.dumps(forged_claims, separators=(",", ":")).encode()
    ).decode()
    response = await _me(client, f"{header}.{forged_payload}.{signature}")
    assert response.status_code == 401
    # The control: the same claims, signed with the server's key, are accepted -- so the refusal
    # above is for the signature alone.
    key = server.services.settings.signing_key()
    resigned = jwt.encode(forged_claims, key, algorithm="HS256")
    accepted = await _me(client, resigned)
    assert accepted.status_code == 200 and accepted.json()["user"]["id"] == other_id


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc", "Bearer a.b.c"]
)
async def test_other_authorization_schemes_are_refused(
    client: httpx.AsyncClient, authorization: str
) -> None:
    response = await client.get("/api/v1/auth/me", headers={"Authorization": authorization})
    assert response.status_code == 401


async def test_no_credentials_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/auth/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/auth/me?token={t}",
        "/api/v1/auth/me?access_token={t}",
        "/api/v1/projects?jwt={t}",
        "/healthz?auth={t}",
        "/metrics?session={t}",
        "/no/such/path?x=1&TOKEN={t}",
    ],
)
async def test_a_token_in_the_query_string_is_refused_on_any_path(
    server: RunningServer, client: httpx.AsyncClient, path: str
) -> None:
    _, token = await _user_token(server)
    # Even with a valid header alongside: the URL must not carry credentials.
    response = await client.get(path.format(t=token), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert token not in response.text


async def test_unrelated_query_parameters_are_fine(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz?tokens_used=3&x=token")
    assert response.status_code == 200


async def test_revoked_token_is_refused_but_others_of_the_user_still_work(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    user_id, first = await _user_token(server)
    second = await auth.issue_token(server.services, user_id)
    out = await client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {first}"})
    assert out.status_code == 204
    assert (await _me(client, first)).status_code == 401
    assert (await _me(client, second)).status_code == 200
    row = await server.services.db.fetchrow(
        "SELECT user_id, expires_at FROM revoked_tokens WHERE user_id = $1", user_id
    )
    assert row is not None and str(row["user_id"]) == user_id
