"""Hostile JSON (deep nesting, huge numbers, non-finite values) is a client error, never a crash.

Over WebSocket: an error reply and the connection lives on. Over REST: 400 in the error envelope.
"""

from __future__ import annotations

import httpx
import pytest

from server import jsoninput
from server.errors import BadRequest
from server.runtime import RunningServer
from tests.server.rest_client import assert_error, new_api
from tests.server.ws_support import connect, new_owner, new_thread

DEEP = '{"op": "ping", "ref": "deep", "x": ' + "[" * 1000 + "]" * 1000 + "}"
HUGE_INT = '{"op": "ping", "ref": "huge", "x": ' + "7" * 5000 + "}"
HOSTILE = {
    "deep": DEEP,
    "huge": HUGE_INT,
    "inf": '{"op": "ping", "ref": "inf", "x": 1e999}',
    "nan": '{"op": "ping", "ref": "nan", "x": NaN}',
}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 33 + "]" * 33,
        "[" * 100_000,
        '{"a":' * 40 + "1" + "}" * 40,
        "1" * 41,
        "-" + "1" * 40,
        "1." + "0" * 40,
        "1e400",
        "-Infinity",
        "NaN",
        '"\\ud800',
    ],
)
def test_loads_refuses_hostile_json(text: str) -> None:
    with pytest.raises(BadRequest):
        jsoninput.loads(text)
    with pytest.raises(BadRequest):
        jsoninput.loads(text.encode())


def test_loads_accepts_what_fits() -> None:
    at_limit = "[" * jsoninput.MAX_DEPTH + "]" * jsoninput.MAX_DEPTH
    assert jsoninput.loads(at_limit) is not None
    # Brackets inside strings are text, not nesting (escaped quotes included).
    assert jsoninput.loads('["' + "[" * 100 + '\\"[[[", 1]') == ["[" * 100 + '"[[[', 1]
    assert jsoninput.loads("[" + ",".join(["[[1]]"] * 200) + "]")[0] == [[1]]
    assert jsoninput.loads("9" * jsoninput.MAX_NUMBER_CHARS) == int("9" * 40)
    assert jsoninput.loads(b'{"a": -1.5e10}') == {"a": -1.5e10}


async def test_ws_hostile_frames_get_error_replies_and_the_connection_lives(
    server: RunningServer,
) -> None:
    owner = await new_owner(server.services)
    thread_id = await new_thread(server.services, owner)
    async with connect(server, owner.token) as client:
        for ref, text in HOSTILE.items():
            await client.ws.send_message(text)
            # The ref cannot be read from a frame that does not decode: the reply has ref null.
            await client.wait_for(lambda: None in client._replies)
            reply = client._replies.pop(None)
            assert reply["ok"] is False, (ref, reply)
            assert reply["error"]["code"] == "bad_request", (ref, reply)
        # A number that decodes but cannot be a seq is a validation error, not a database crash.
        big = await client.request("subscribe", thread_id=thread_id, after_seq=10**30)
        assert big["ok"] is False and big["error"]["code"] == "validation_failed", big
        assert big["error"]["details"]["fields"] == ["after_seq"]
        # Still open, still serving.
        assert (await client.request("subscribe", thread_id=thread_id))["ok"] is True
        assert client.closed is None


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_rest_hostile_bodies_are_400(
    server: RunningServer, client: httpx.AsyncClient, name: str
) -> None:
    api = await new_api(server, client)
    body = HOSTILE[name].encode()
    headers = {"Content-Type": "application/json"}
    # A route reading its body through each of the two body readers.
    for path in ("/projects", "/auth/login"):
        response = await api.call("POST", path, content=body, headers=headers)
        assert_error(response, 400, "bad_request")
