"""``/api/v1/projects/{id}/threads`` and ``/api/v1/threads/{id}``."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from server.api.context import current_principal, current_services
from server.api.inputs import json_object, query_int, query_str
from server.commands import (
    CreateThread,
    DeleteThread,
    UpdateThread,
    execute,
    parse_command,
    queries,
)

blueprint = Blueprint("threads_api", __name__, url_prefix="/api/v1")


@blueprint.post("/projects/<project_id>/threads")
async def create_thread(project_id: str) -> tuple[Response, int]:
    """Create a thread in a project: 201 with it."""
    who = await current_principal()
    body = await json_object(optional=True)
    body["project_id"] = project_id
    result = await execute(current_services(), who, parse_command(CreateThread, body))
    return jsonify(result.data), 201


@blueprint.get("/projects/<project_id>/threads")
async def list_threads(project_id: str) -> Response:
    """A project's threads, oldest first, a page at a time."""
    who = await current_principal()
    page = await queries.list_threads(
        current_services(), who, project_id, limit=query_int("limit"), cursor=query_str("cursor")
    )
    return jsonify(page)


@blueprint.get("/threads/<thread_id>")
async def get_thread(thread_id: str) -> Response:
    who = await current_principal()
    return jsonify(await queries.get_thread(current_services(), who, thread_id))


@blueprint.patch("/threads/<thread_id>")
async def update_thread(thread_id: str) -> Response:
    """Rename a thread."""
    who = await current_principal()
    body = await json_object()
    body["thread_id"] = thread_id
    result = await execute(current_services(), who, parse_command(UpdateThread, body))
    return jsonify(result.data)


@blueprint.delete("/threads/<thread_id>")
async def delete_thread(thread_id: str) -> tuple[str, int]:
    """Delete a thread with its messages and events: 204."""
    who = await current_principal()
    await execute(current_services(), who, DeleteThread(thread_id=thread_id))
    return "", 204
