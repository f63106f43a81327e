"""Text PostgreSQL cannot store (NUL) is the client's error on every route, never a 500."""

from __future__ import annotations

import httpx


async def test_nul_in_auth_fields_is_a_client_error(client: httpx.AsyncClient) -> None:
    body = {"email": "a\u0000@example.com", "password": "x\u0000xxxxxxxxx"}
    for path in ("/api/v1/auth/register", "/api/v1/auth/login"):
        response = await client.post(path, json=body)
        assert 400 <= response.status_code < 500, (path, response.text)
        assert response.json()["error"]["code"] in ("bad_request", "validation_failed")
