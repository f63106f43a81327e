"""``/api/v1/threads/{id}/messages`` and ``/api/v1/messages/{id}`` (+ ``/history``)."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from server.api.context import current_principal, current_services
from server.api.inputs import if_match_version, json_object, query_int, query_str
from server.commands import DeleteMessage, EditMessage, SendMessage, execute, parse_command, queries

blueprint = Blueprint("messages_api", __name__, url_prefix="/api/v1")


@blueprint.get("/threads/<thread_id>/messages")
async def list_messages(thread_id: str) -> Response:
    """Messages by seq; ``after_seq`` or ``before_seq`` pick where the page starts."""
    who = await current_principal()
    page = await queries.list_messages(
        current_services(),
        who,
        thread_id,
        limit=query_int("limit"),
        cursor=query_str("cursor"),
        after_seq=query_int("after_seq"),
        before_seq=query_int("before_seq"),
    )
    return jsonify(page)


@blueprint.post("/threads/<thread_id>/messages")
async def send_message(thread_id: str) -> tuple[Response, int]:
    """Send: 201 with the new message, 200 with the first one for a repeated client_msg_id."""
    who = await current_principal()
    body = await json_object()
    body["thread_id"] = thread_id
    result = await execute(current_services(), who, parse_command(SendMessage, body))
    return jsonify(result.data), 201 if result.created else 200


@blueprint.get("/messages/<message_id>")
async def get_message(message_id: str) -> Response:
    who = await current_principal()
    return jsonify(await queries.get_message(current_services(), who, message_id))


@blueprint.patch("/messages/<message_id>")
async def edit_message(message_id: str) -> Response:
    """Edit at ``If-Match: <version>`` (or body ``expected_version``)."""
    who = await current_principal()
    body = await json_object()
    if_match_version(body)
    body["message_id"] = message_id
    result = await execute(current_services(), who, parse_command(EditMessage, body))
    return jsonify(result.data)


@blueprint.delete("/messages/<message_id>")
async def delete_message(message_id: str) -> Response:
    """Soft-delete at ``If-Match: <version>``: 200 with the tombstone."""
    who = await current_principal()
    body = await json_object(optional=True)
    if_match_version(body)
    body["message_id"] = message_id
    result = await execute(current_services(), who, parse_command(DeleteMessage, body))
    return jsonify(result.data)


@blueprint.get("/messages/<message_id>/history")
async def message_history(message_id: str) -> Response:
    """Every edit and delete of the message: who, when, old and new content, version."""
    who = await current_principal()
    page = await queries.message_history(
        current_services(), who, message_id, limit=query_int("limit"), cursor=query_str("cursor")
    )
    return jsonify(page)
