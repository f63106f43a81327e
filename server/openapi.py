"""The OpenAPI 3.1 document of ``/api/v1``, served at ``GET /api/v1/openapi.json``.

Built from the same pydantic models the server validates commands with (request bodies) and
the resource models of ``server.commands.schemas`` (responses), plus a small path table.
Path ids are taken out of the command models' body schemas; every operation documents its
success response and, as ``default``, the error envelope.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Response, jsonify

from server.commands import models
from server.commands import schemas as out
from server.storage.pagination import DEFAULT_LIMIT, MAX_LIMIT

blueprint = Blueprint("openapi", __name__)

_REF = "#/components/schemas/{model}"
_ERROR_CODES = (
    "bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, "
    "not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, "
    "rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500"
)


class _Doc:
    """Collects component schemas while the paths are assembled."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str = "serialization") -> dict[str, str]:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[model.__name__] = schema
        return {"$ref": _REF.format(model=model.__name__)}

    def body(
        self,
        model: type[BaseModel],
        *,
        drop: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        required: bool = True,
    ) -> dict[str, Any]:
        """A request body from a command model, without the fields that come from the path."""
        schema = model.model_json_schema(ref_template=_REF, mode="validation")
        self.schemas.update(schema.pop("$defs", {}))
        for name in drop:
            schema["properties"].pop(name, None)
        schema["required"] = [
            r for r in schema.get("required", []) if r not in drop and r not in optional
        ]
        if not schema["required"]:
            schema.pop("required")
        name = f"{model.__name__}Body"
        schema["title"] = name
        self.schemas[name] = schema
        return {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=name)}}},
        }


def _json(ref: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_LIST_PARAMS = [
    _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        "page size",
    ),
    _query("cursor", {"type": "string"}, "the previous page's next_cursor (opaque)"),
]


def _op(
    doc: _Doc,
    summary: str,
    status: int,
    response: dict[str, Any] | None,
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    extra: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    error = _json(doc.ref(out.ErrorEnvelope), f"error envelope; codes: {_ERROR_CODES}")
    responses: dict[str, Any] = {
        str(status): response if response is not None else {"description": "no content"}
    }
    for code, value in (extra or {}).items():
        responses[str(code)] = value
    responses["default"] = error
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    return op


def _paths(doc: _Doc) -> dict[str, Any]:
    project = _json(doc.ref(out.Project), "the project")
    thread = _json(doc.ref(out.Thread), "the thread")
    message = _json(doc.ref(out.Message), "the message")
    pid, tid, mid = _path_param("project_id"), _path_param("thread_id"), _path_param("message_id")
    if_match = {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]{1,9}"?$'},
        "description": "the version you read (or expected_version in the body); one is required",
    }
    seq = {"type": "integer", "minimum": 0}
    v1 = "/api/v1"
    return {
        f"{v1}/projects": {
            "get": _op(
                doc,
                "List your projects (oldest first)",
                200,
                _json(doc.ref(out.ProjectPage), "a page"),
                params=_LIST_PARAMS,
            ),
            "post": _op(doc, "Create a project", 201, project, body=doc.body(models.CreateProject)),
        },
        f"{v1}/projects/{{project_id}}": {
            "parameters": [pid],
            "get": _op(doc, "Get a project", 200, project),
            "patch": _op(
                doc,
                "Change a project's name or budget (null budget = no limit)",
                200,
                project,
                body=doc.body(models.UpdateProject, drop=("project_id",)),
            ),
            "delete": _op(doc, "Delete a project with its threads", 204, None),
        },
        f"{v1}/projects/{{project_id}}/usage": {
            "parameters": [pid],
            "get": _op(doc, "Token usage and cost", 200, _json(doc.ref(out.Usage), "usage")),
        },
        f"{v1}/projects/{{project_id}}/threads": {
            "parameters": [pid],
            "get": _op(
                doc,
                "List a project's threads (oldest first)",
                200,
                _json(doc.ref(out.ThreadPage), "a page"),
                params=_LIST_PARAMS,
            ),
            "post": _op(
                doc,
                "Create a thread",
                201,
                thread,
                body=doc.body(models.CreateThread, drop=("project_id",), required=False),
            ),
        },
        f"{v1}/threads/{{thread_id}}": {
            "parameters": [tid],
            "get": _op(doc, "Get a thread", 200, thread),
            "patch": _op(
                doc,
                "Rename a thread",
                200,
                thread,
                body=doc.body(models.UpdateThread, drop=("thread_id",)),
            ),
            "delete": _op(doc, "Delete a thread with its messages", 204, None),
        },
        f"{v1}/threads/{{thread_id}}/messages": {
            "parameters": [tid],
            "get": _op(
                doc,
                "List messages by seq (tombstones included)",
                200,
                _json(doc.ref(out.MessagePage), "a page"),
                params=[
                    *_LIST_PARAMS,
                    _query("after_seq", seq, "messages with a greater seq"),
                    _query("before_seq", seq, "the page just before this seq"),
                ],
            ),
            "post": _op(
                doc,
                "Send a message (idempotent by client_msg_id)",
                201,
                message,
                body=doc.body(models.SendMessage, drop=("thread_id",)),
                extra={200: _json(doc.ref(out.Message), "the first message of this client_msg_id")},
            ),
        },
        f"{v1}/messages/{{message_id}}": {
            "parameters": [mid],
            "get": _op(doc, "Get a message", 200, message),
            "patch": _op(
                doc,
                "Edit a message at a version",
                200,
                message,
                params=[if_match],
                body=doc.body(
                    models.EditMessage, drop=("message_id",), optional=("expected_version",)
                ),
            ),
            "delete": _op(
                doc,
                "Soft-delete a message at a version (returns the tombstone)",
                200,
                message,
                params=[if_match],
                body=doc.body(
                    models.DeleteMessage,
                    drop=("message_id",),
                    optional=("expected_version",),
                    required=False,
                ),
            ),
        },
        f"{v1}/messages/{{message_id}}/history": {
            "parameters": [mid],
            "get": _op(
                doc,
                "Every edit and delete of a message",
                200,
                _json(doc.ref(out.HistoryPage), "a page"),
                params=_LIST_PARAMS,
            ),
        },
    }


def _auth_paths(doc: _Doc) -> dict[str, Any]:
    """The authentication endpoints (server/api/auth.py)."""
    credentials = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["email", "password"],
                    "properties": {"email": {"type": "string"}, "password": {"type": "string"}},
                }
            }
        },
    }
    error = {"$ref": _REF.format(model="ErrorEnvelope")}
    default = {
        "description": "error envelope",
        "content": {"application/json": {"schema": error}},
    }
    user = _json(doc.ref(out.UserEnvelope), "{user}")
    return {
        "/api/v1/auth/register": {
            "post": {
                "summary": "Register",
                "security": [],
                "requestBody": credentials,
                "responses": {"201": user, "default": default},
            }
        },
        "/api/v1/auth/login": {
            "post": {
                "summary": "Log in: access token, CSRF token, tl_session and tl_csrf cookies",
                "security": [],
                "requestBody": credentials,
                "responses": {
                    "200": _json(doc.ref(out.LoginResult), "{user, access_token, csrf_token}"),
                    "default": default,
                },
            }
        },
        "/api/v1/auth/logout": {
            "post": {
                "summary": "Log out (the token is revoked server-side)",
                "responses": {"204": {"description": "logged out"}, "default": default},
            }
        },
        "/api/v1/auth/me": {
            "get": {
                "summary": "The authenticated user (lets a client check its session)",
                "responses": {"200": user, "default": default},
            }
        },
    }


_OPERATION_IDS = {
    ("get", "/api/v1/projects"): "listProjects",
    ("post", "/api/v1/projects"): "createProject",
    ("get", "/api/v1/projects/{project_id}"): "getProject",
    ("patch", "/api/v1/projects/{project_id}"): "updateProject",
    ("delete", "/api/v1/projects/{project_id}"): "deleteProject",
    ("get", "/api/v1/projects/{project_id}/usage"): "getProjectUsage",
    ("get", "/api/v1/projects/{project_id}/threads"): "listThreads",
    ("post", "/api/v1/projects/{project_id}/threads"): "createThread",
    ("get", "/api/v1/threads/{thread_id}"): "getThread",
    ("patch", "/api/v1/threads/{thread_id}"): "updateThread",
    ("delete", "/api/v1/threads/{thread_id}"): "deleteThread",
    ("get", "/api/v1/threads/{thread_id}/messages"): "listMessages",
    ("post", "/api/v1/threads/{thread_id}/messages"): "sendMessage",
    ("get", "/api/v1/messages/{message_id}"): "getMessage",
    ("patch", "/api/v1/messages/{message_id}"): "editMessage",
    ("delete", "/api/v1/messages/{message_id}"): "deleteMessage",
    ("get", "/api/v1/messages/{message_id}/history"): "getMessageHistory",
    ("post", "/api/v1/auth/register"): "register",
    ("post", "/api/v1/auth/login"): "login",
    ("post", "/api/v1/auth/logout"): "logout",
    ("get", "/api/v1/auth/me"): "me",
}


# OpenAPI links: how a response leads to the next operations (clients and stateful fuzzers use
# them): operationId -> status -> {link name: (target operationId, parameters[, request body])}.
_BY_ID = "$response.body#/id"
_VERSION = '"{$response.body#/version}"'  # an If-Match value: the version as an entity tag
# Edits and deletes carry the version twice: in If-Match and as the body's expected_version.
# Either one is enough (the header wins); a client (or fuzzer) that drops the optional header
# still sends the version it read, instead of none (422) or a guessed one (409).
_AT_VERSION = {"expected_version": "$response.body#/version"}
_EDIT = ("editMessage", {"message_id": _BY_ID, "header.If-Match": _VERSION}, _AT_VERSION)
_DELETE = ("deleteMessage", {"message_id": _BY_ID, "header.If-Match": _VERSION}, _AT_VERSION)
_Link = tuple[str, dict[str, str]] | tuple[str, dict[str, str], dict[str, str]]
_LINKS: dict[str, dict[str, dict[str, _Link]]] = {
    "createProject": {
        "201": {
            "GetProject": ("getProject", {"project_id": _BY_ID}),
            "UpdateProject": ("updateProject", {"project_id": _BY_ID}),
            "DeleteProject": ("deleteProject", {"project_id": _BY_ID}),
            "GetProjectUsage": ("getProjectUsage", {"project_id": _BY_ID}),
            "ListThreads": ("listThreads", {"project_id": _BY_ID}),
            "CreateThread": ("createThread", {"project_id": _BY_ID}),
        }
    },
    "createThread": {
        "201": {
            "GetThread": ("getThread", {"thread_id": _BY_ID}),
            "UpdateThread": ("updateThread", {"thread_id": _BY_ID}),
            "DeleteThread": ("deleteThread", {"thread_id": _BY_ID}),
            "ListMessages": ("listMessages", {"thread_id": _BY_ID}),
            "SendMessage": ("sendMessage", {"thread_id": _BY_ID}),
        }
    },
    "sendMessage": {
        status: {
            "GetMessage": ("getMessage", {"message_id": _BY_ID}),
            "EditMessage": _EDIT,
            "DeleteMessage": _DELETE,
            "GetMessageHistory": ("getMessageHistory", {"message_id": _BY_ID}),
        }
        for status in ("201", "200")
    },
    "editMessage": {
        "200": {
            "GetMessageHistory": ("getMessageHistory", {"message_id": _BY_ID}),
            "EditMessage": _EDIT,
            "DeleteMessage": _DELETE,
        }
    },
}


def _link_operations(paths: dict[str, Any]) -> None:
    for item in paths.values():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, links in _LINKS.get(op["operationId"], {}).items():
                # A copy: operations share response objects (every 200 with a message is one
                # dict), and links set on a shared one would end up on all of them.
                op["responses"][status] = {
                    **op["responses"][status],
                    "links": {name: _link(*link) for name, link in links.items()},
                }


def _link(
    target: str, params: dict[str, str], body: dict[str, str] | None = None
) -> dict[str, Any]:
    link: dict[str, Any] = {"operationId": target, "parameters": dict(params)}
    if body is not None:
        link["requestBody"] = dict(body)
    return link


def _name_operations(paths: dict[str, Any]) -> None:
    """Give every operation its operationId and a tag (the path's first segment)."""
    for path, item in paths.items():
        tag = path.removeprefix("/api/v1/").split("/")[0]
        for method, op in item.items():
            if method == "parameters":
                continue
            op["operationId"] = _OPERATION_IDS[(method, path)]
            op["tags"] = [tag]


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once; it depends only on code)."""
    doc = _Doc()
    paths = _paths(doc)
    paths.update(_auth_paths(doc))
    _name_operations(paths)
    _link_operations(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Threadline API",
            "version": "1",
            "description": (
                "REST resources of Threadline. Lists are keyset-paginated with an opaque cursor; "
                "errors share one envelope. See docs/api.md."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": doc.schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "cookieAuth": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "tl_session",
                    "description": "unsafe methods also need X-CSRF-Token = the tl_csrf cookie",
                },
            },
        },
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
    }


@blueprint.get("/api/v1/openapi.json")
async def openapi_json() -> Response:
    """The OpenAPI document (public: it holds no data)."""
    return jsonify(openapi_document())
