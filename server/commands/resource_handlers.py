"""Handlers of the project and thread commands."""

from __future__ import annotations

from server.commands.models import (
    CreateProject,
    CreateThread,
    DeleteProject,
    DeleteThread,
    UpdateProject,
    UpdateThread,
)
from server.commands.serialize import project_to_dict, thread_to_dict
from server.commands.unit import CommandContext, CommandResult, require_id
from server.errors import NotFound
from server.storage import projects, threads


async def create_project(ctx: CommandContext, cmd: CreateProject) -> CommandResult:
    """Create a project owned by the principal."""
    row = await projects.insert_project(ctx.tx, ctx.user_id, cmd.name, cmd.monthly_budget_usd)
    return CommandResult(project_to_dict(row), created=True)


async def update_project(ctx: CommandContext, cmd: UpdateProject) -> CommandResult:
    """Change the fields present in the command (an explicit null budget removes the limit)."""
    project_id = require_id(cmd.project_id)
    current = await projects.get_project(ctx.tx, ctx.user_id, project_id, for_update=True)
    if current is None:
        raise NotFound("No such project.")
    present = cmd.model_fields_set
    name = cmd.name if "name" in present and cmd.name is not None else current["name"]
    budget = (
        cmd.monthly_budget_usd if "monthly_budget_usd" in present else current["monthly_budget_usd"]
    )
    row = await projects.update_project(ctx.tx, project_id, name=name, monthly_budget_usd=budget)
    return CommandResult(project_to_dict(row))


async def delete_project(ctx: CommandContext, cmd: DeleteProject) -> CommandResult:
    """Delete a project with all its threads and messages."""
    if not await projects.delete_project(ctx.tx, ctx.user_id, require_id(cmd.project_id)):
        raise NotFound("No such project.")
    return CommandResult(None)


async def create_thread(ctx: CommandContext, cmd: CreateThread) -> CommandResult:
    """Create a thread in one of the principal's projects."""
    project_id = require_id(cmd.project_id)
    if await projects.get_project(ctx.tx, ctx.user_id, project_id) is None:
        raise NotFound("No such project.")
    row = await threads.insert_thread(ctx.tx, project_id, cmd.title)
    return CommandResult(thread_to_dict(row), created=True)


async def update_thread(ctx: CommandContext, cmd: UpdateThread) -> CommandResult:
    """Rename a thread."""
    thread_id = require_id(cmd.thread_id)
    if await threads.get_thread(ctx.tx, ctx.user_id, thread_id, for_update=True) is None:
        raise NotFound("No such thread.")
    row = await threads.update_thread(ctx.tx, thread_id, cmd.title)
    return CommandResult(thread_to_dict(row))


async def delete_thread(ctx: CommandContext, cmd: DeleteThread) -> CommandResult:
    """Delete a thread with its messages and events."""
    if not await threads.delete_thread(ctx.tx, ctx.user_id, require_id(cmd.thread_id)):
        raise NotFound("No such thread.")
    return CommandResult(None)
