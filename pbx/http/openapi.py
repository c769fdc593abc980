"""The admin API's OpenAPI 3 document, built from the same operation table
that registers the routes (pbx.http.api.OPERATIONS, gathered from each
feature's ``http`` module), so the two cannot drift.

An :class:`Operation` names its method, path, handler and request body
schema; the body schema also drives the request validation
(:func:`validate_body`), so what the document promises is what the server
checks. Error responses every operation shares (401, 400 for unreadable
JSON, 415 for a body that is not declared application/json, 404 for unknown
ids, 422 for bad input) are added here from what the operation has: auth, a
body, path or query parameters.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pbx.http.schemas import SCHEMAS, Schema, ref

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPENAPI_VERSION = "3.0.3"
PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1000
PAGE_OFFSET_MAX = 1_000_000_000  # SQLite takes 64-bit integers only
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def page_of(name: str) -> Schema:
    """A page of a list: the items, and where they sit in the whole."""
    return {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {"type": "array", "items": ref(name)},
            "total": {"type": "integer", "minimum": 0, "description": "items in the whole list"},
            "limit": {"type": "integer", "minimum": 1},
            "offset": {"type": "integer", "minimum": 0},
        },
    }


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PAGINATION = (
    query("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": PAGE_LIMIT_DEFAULT}, "items per page"),
    query("offset", {"type": "integer", "minimum": 0, "maximum": PAGE_OFFSET_MAX, "default": 0}, "items to skip"),
)
TIME_RANGE = (
    query("from", {"type": "string"}, "ISO-8601 date or date-time, inclusive; without an offset it is in the server's `timezone`"),
    query("to", {"type": "string"}, "ISO-8601 date or date-time, exclusive; without an offset it is in the server's `timezone`"),
)

@dataclass(frozen=True)
class Reply:
    """One documented response: a JSON schema, or other content types."""

    description: str
    schema: Schema | None = None
    content: Mapping[str, Schema] | None = None  # media type -> schema, for non-JSON bodies
    headers: Mapping[str, Schema] | None = None


NO_CONTENT = Reply("done; no content")
WAV_AUDIO = Reply("WAV audio", content={"audio/wav": {"type": "string", "format": "binary"}})


def page_reply(name: str) -> Reply:
    """What a list answers: one page of ``name`` items."""
    return Reply("one page of the list", page_of(name))


@dataclass(frozen=True)
class Operation:
    """One route: what registers it (``handler``; None for a route served
    elsewhere) and what documents it."""

    method: str
    path: str
    operation_id: str
    summary: str
    handler: Handler | None
    replies: Mapping[int, Reply]
    tag: str
    body: Schema | None = None  # the JSON request body, a schema or a $ref
    parameters: tuple[Schema, ...] = ()
    auth: bool = True
    errors: tuple[int, ...] = ()  # further error statuses besides the automatic ones
    description: str = ""

    @property
    def path_parameters(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)


ERROR_TEXT = {
    400: "the body is not JSON",
    401: "no valid bearer token",
    404: "no such resource",
    409: "the request does not fit the current state",
    415: "the body is not declared `Content-Type: application/json`",
    422: "invalid input; `fields` says what is wrong with each field",
    503: "the server is stopping",
}


def document(operations: tuple[Operation, ...], version: str) -> dict[str, Any]:
    """The OpenAPI document of ``operations``."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pbx admin API",
            "version": version,
            "description": (
                "Every endpoint but /healthz needs `Authorization: Bearer TOKEN`. Request bodies are JSON, "
                "sent as `Content-Type: application/json` (anything else: 415). Errors are JSON "
                '`{"error": ID, "message": TEXT}`. Lists answer a page, `{"items", "total", "limit", "offset"}`, '
                f"chosen with `?limit=` (default {PAGE_LIMIT_DEFAULT}, at most {PAGE_LIMIT_MAX}) and `?offset=`; "
                "CSV answers carry the total in the X-Total-Count header. Times are ISO-8601 in UTC."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _operation(op: Operation) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in op.path_parameters
    ] + list(op.parameters)
    responses: dict[str, Any] = {str(status): _reply(reply) for status, reply in op.replies.items()}
    errors = set(op.errors)
    if op.auth:
        errors.add(401)
    if op.body is not None:
        errors |= {400, 415, 422}
    if op.path_parameters:
        errors.add(404)
    if op.parameters:
        errors.add(422)
    for status in sorted(errors):
        responses.setdefault(str(status), _reply(Reply(ERROR_TEXT[status], ref("Error"))))
    spec: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag], "responses": responses}
    if op.description:
        spec["description"] = op.description
    if parameters:
        spec["parameters"] = parameters
    if op.body is not None:
        spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.body}}}
    if not op.auth:
        spec["security"] = []
    return spec


def _reply(reply: Reply) -> dict[str, Any]:
    spec: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        spec["content"] = {"application/json": {"schema": reply.schema}}
    elif reply.content is not None:
        spec["content"] = {media: {"schema": schema} for media, schema in reply.content.items()}
    if reply.headers:
        spec["headers"] = {name: {"schema": schema} for name, schema in reply.headers.items()}
    return spec


# --- request bodies, checked against the same schemas ---


def resolve(schema: Schema) -> Schema:
    if "$ref" in schema:
        return SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def validate_body(schema: Schema, body: Any) -> dict[str, str]:
    """What is wrong with ``body`` by ``schema`` (the subset of JSON Schema the
    request bodies use: an object of strings and booleans), by field; empty when fine."""
    schema = resolve(schema)
    if not isinstance(body, dict):
        return {"(body)": "must be a JSON object"}
    problems: dict[str, str] = {}
    properties: dict[str, Schema] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in body:
            problems[name] = "is required"
    for name, value in body.items():
        prop = properties.get(name)
        if prop is None:
            if schema.get("additionalProperties", True) is False:
                problems[name] = f"is not a field here (fields: {', '.join(properties)})"
            continue
        problem = _check(prop, value)
        if problem:
            problems[name] = problem
    return problems


def _check(schema: Schema, value: Any) -> str | None:
    kind = schema.get("type")
    if kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "string":
        if not isinstance(value, str):
            return "must be a string"
        if "enum" in schema and value not in schema["enum"]:
            return f"must be one of {', '.join(schema['enum'])}"
        if len(value) < schema.get("minLength", 0):
            return "must not be empty"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"must match {schema['pattern']}"
        return None
    raise AssertionError(f"request body schemas use strings and booleans, not {kind}")
