"""``authenticate_handshake``: what the WebSocket transport relies on before upgrading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from trio_websocket import HandshakeError, open_websocket_url

from server import auth
from server.config import Settings
from server.errors import Forbidden, Unauthorized
from server.runtime import RunningServer
from tests.conftest import make_settings

APP_ORIGIN = "https://app.example"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, allowed_origins=[APP_ORIGIN])


async def test_bearer_is_enough(server: RunningServer) -> None:
    user, token = await auth.create_user_with_token(server.services)
    principal = await auth.authenticate_handshake(
        server.services, {"authorization": f"Bearer {token}"}, {}, b""
    )
    assert principal.user_id == user.id
    assert principal.email == user.email
    assert principal.via == "bearer"


async def test_cookie_needs_an_allowed_origin(server: RunningServer) -> None:
    user, token = await auth.create_user_with_token(server.services)
    cookies = {"tl_session": token}
    principal = await auth.authenticate_handshake(
        server.services, {"Origin": APP_ORIGIN}, cookies, b""
    )
    assert principal.user_id == user.id and principal.via == "cookie"
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        with pytest.raises(Forbidden):
            await auth.authenticate_handshake(server.services, headers, cookies, b"")


@pytest.mark.parametrize(
    "query", [b"token=x", b"a=1&access_token=x", b"JWT=x", b"auth=", b"session=abc"]
)
async def test_a_token_in_the_query_string_is_refused(server: RunningServer, query: bytes) -> None:
    _, token = await auth.create_user_with_token(server.services)
    with pytest.raises(Unauthorized):
        await auth.authenticate_handshake(
            server.services, {"Authorization": f"Bearer {token}"}, {}, query
        )


async def test_no_or_bad_credentials(server: RunningServer) -> None:
    with pytest.raises(Unauthorized):
        await auth.authenticate_handshake(server.services, {}, {}, b"")
    with pytest.raises(Unauthorized):
        await auth.authenticate_handshake(
            server.services, {"Authorization": "Bearer nope"}, {}, b""
        )
    with pytest.raises(Unauthorized):
        await auth.authenticate_handshake(
            server.services, {"Origin": APP_ORIGIN}, {"tl_session": "nope"}, b""
        )


async def test_revoked_token_is_refused_and_expired_revocations_are_purged(
    server: RunningServer,
) -> None:
    user, token = await auth.create_user_with_token(server.services)
    headers = {"Authorization": f"Bearer {token}"}
    principal = await auth.authenticate_handshake(server.services, headers, {}, b"")
    await server.services.db.fetchval(
        "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ($1, $2, $3)",
        "stale-jti-" + user.id[:8],
        user.id,
        datetime.now(UTC) - timedelta(hours=1),
    )
    await auth.revoke(server.services, principal)
    with pytest.raises(Unauthorized):
        await auth.authenticate_handshake(server.services, headers, {}, b"")
    remaining = await server.services.db.fetch(
        "SELECT jti FROM revoked_tokens WHERE user_id = $1", user.id
    )
    assert [r["jti"] for r in remaining] == [principal.jti]


def _ws_url(server: RunningServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws"


async def test_cookie_handshake_over_a_real_websocket(server: RunningServer) -> None:
    _, token = await auth.create_user_with_token(server.services)
    cookie = ("Cookie", f"tl_session={token}")
    for origin, status in (("https://evil.example", 403), (None, 403)):
        headers = [cookie] + ([("Origin", origin)] if origin else [])
        with pytest.raises(HandshakeError) as refused:
            async with open_websocket_url(_ws_url(server), extra_headers=headers):
                pass
        assert getattr(refused.value, "status_code", None) == status
    async with open_websocket_url(
        _ws_url(server), extra_headers=[cookie, ("Origin", APP_ORIGIN)]
    ) as ws:
        await ws.send_message('{"op": "ping", "ref": "p1"}')
        reply = await ws.get_message()
        assert '"ok":true' in reply.replace(" ", "")
