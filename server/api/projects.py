"""``/api/v1/projects``: HTTP <-> commands and queries, nothing more."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from server.api.context import current_principal, current_services
from server.api.inputs import json_object, query_int, query_str
from server.commands import (
    CreateProject,
    DeleteProject,
    UpdateProject,
    execute,
    parse_command,
    queries,
)

blueprint = Blueprint("projects_api", __name__, url_prefix="/api/v1")


@blueprint.post("/projects")
async def create_project() -> tuple[Response, int]:
    """Create a project: 201 with it."""
    who = await current_principal()
    command = parse_command(CreateProject, await json_object())
    result = await execute(current_services(), who, command)
    return jsonify(result.data), 201


@blueprint.get("/projects")
async def list_projects() -> Response:
    """The caller's projects, oldest first, a page at a time."""
    who = await current_principal()
    page = await queries.list_projects(
        current_services(), who, limit=query_int("limit"), cursor=query_str("cursor")
    )
    return jsonify(page)


@blueprint.get("/projects/<project_id>")
async def get_project(project_id: str) -> Response:
    who = await current_principal()
    return jsonify(await queries.get_project(current_services(), who, project_id))


@blueprint.patch("/projects/<project_id>")
async def update_project(project_id: str) -> Response:
    """Change ``name`` and/or ``monthly_budget_usd`` (null removes the limit)."""
    who = await current_principal()
    body = await json_object()
    body["project_id"] = project_id
    result = await execute(current_services(), who, parse_command(UpdateProject, body))
    return jsonify(result.data)


@blueprint.delete("/projects/<project_id>")
async def delete_project(project_id: str) -> tuple[str, int]:
    """Delete the project with its threads and messages: 204."""
    who = await current_principal()
    await execute(current_services(), who, DeleteProject(project_id=project_id))
    return "", 204


@blueprint.get("/projects/<project_id>/usage")
async def project_usage(project_id: str) -> Response:
    """Tokens and cost: this month, in total and by model."""
    who = await current_principal()
    return jsonify(await queries.project_usage_report(current_services(), who, project_id))
