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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]

OPENAPI_VERSION = "3.0.3"
PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1000
PAGE_OFFSET_MAX = 1_000_000_000  # SQLite takes 64-bit integers only
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if "$ref" in schema:  # OpenAPI 3.0 ignores whatever stands beside a $ref
        return {"nullable": True, "allOf": [schema]}
    return {**schema, "nullable": True}


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

_TEXT = {"type": "string"}
_NUMBER = {"type": "string", "pattern": r"^\+?[0-9]{2,15}$"}
_TIME = {"type": "string", "format": "date-time"}
_AGENT_STATE = {"type": "string", "enum": ["logged_out", "available", "ringing", "busy", "wrapup", "paused"]}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a stable id, e.g. no-such-queue"},
            "message": {"type": "string"},
            "fields": {"type": "object", "additionalProperties": {"type": "string"}, "description": "what is wrong with each field"},
            "errors": {"type": "array", "items": {"type": "string"}, "description": "FILE:LINE: message, for a refused reload"},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok", "failing"]}}},
    "ActiveRecording": {
        "type": "object",
        "required": ["id", "state"],
        "properties": {"id": _TEXT, "state": {"type": "string", "enum": ["recording", "paused", "stopped", "failed"]}},
    },
    "Call": {
        "type": "object",
        "required": ["id", "from", "to", "direction", "state", "started", "answered", "queue", "agent", "recording"],
        "properties": {
            "id": {"type": "string", "description": "made by the server (never the SIP Call-ID); the CDR row's call_id"},
            "from": _TEXT,
            "to": _TEXT,
            "direction": {"type": "string", "description": "internal, inbound, outbound, callback or click-to-call"},
            "state": {
                "type": "string",
                "enum": ["originating", "ringing", "ivr", "queued", "answered", "ended"],
                "description": "originating: a click-to-call still ringing its `from` extension",
            },
            "started": _TIME,
            "answered": nullable(_TIME),
            "queue": nullable(_TEXT),
            "agent": nullable(_TEXT),
            "recording": nullable(ref("ActiveRecording")),
        },
    },
    "ClickToCall": {
        "type": "object",
        "required": ["from", "to"],
        "additionalProperties": False,
        "properties": {
            "from": {"type": "string", "minLength": 1, "description": "the extension rung first"},
            "to": {
                "type": "string",
                "minLength": 1,
                "description": "an extension number, a number the outbound rules allow, or a destination: "
                "queue:NAME, ivr:FLOW, voicemail:BOX, extension:NUM, external:NUMBER[@TRUNK]",
            },
        },
    },
    "RecordingAction": {
        "type": "object",
        "required": ["action"],
        "additionalProperties": False,
        "properties": {"action": {"type": "string", "enum": ["start", "stop", "pause", "resume"]}},
    },
    "RecordingActionResult": {
        "type": "object",
        "required": ["call", "recording"],
        "properties": {"call": _TEXT, "recording": ref("ActiveRecording")},
    },
    "Registration": {
        "type": "object",
        "required": ["extension", "contact", "source", "transport", "expires", "expires_in", "user_agent", "reachable", "rtt_ms"],
        "properties": {
            "extension": _TEXT,
            "contact": _TEXT,
            "source": {"type": "string", "description": "HOST:PORT the REGISTER came from"},
            "transport": {"type": "string", "enum": ["udp", "tcp"]},
            "expires": _TIME,
            "expires_in": {"type": "integer", "minimum": 0, "description": "seconds"},
            "user_agent": _TEXT,
            "reachable": {"type": "boolean", "description": "false once the contact left an OPTIONS unanswered (sip.qualify_seconds): it is not rung until it answers or registers again"},
            "rtt_ms": nullable({"type": "number", "description": "milliseconds its last answered OPTIONS took; null before one and while unreachable"}),
        },
    },
    "QueueCaller": {
        "type": "object",
        "required": ["position", "id", "caller", "wait", "callback"],
        "properties": {
            "position": {"type": "integer", "minimum": 1},
            "id": {"type": "string", "description": "the call's id, or the callback's"},
            "caller": {"type": "string", "description": "caller id, or the number to call back"},
            "wait": {"type": "number", "description": "seconds since the caller joined the line (a callback keeps the caller's place)"},
            "callback": {"type": "boolean"},
        },
    },
    "QueueAgent": {
        "type": "object",
        "required": ["extension", "state"],
        "properties": {
            "extension": _TEXT,
            "state": _AGENT_STATE,
        },
    },
    "QueueStats": {
        "type": "object",
        "required": [
            "day",
            "offered",
            "answered",
            "abandoned",
            "timeouts",
            "callbacks",
            "service_level",
            "average_speed_of_answer",
            "longest_wait",
        ],
        "properties": {
            "day": {"type": "string", "format": "date", "description": "today in the server's timezone"},
            "offered": {"type": "integer"},
            "answered": {"type": "integer"},
            "abandoned": {"type": "integer"},
            "timeouts": {"type": "integer"},
            "callbacks": {
                "type": "object",
                "required": ["requested", "completed", "failed"],
                "properties": {"requested": {"type": "integer"}, "completed": {"type": "integer"}, "failed": {"type": "integer"}},
            },
            "service_level": nullable({"type": "number", "description": "share of answered calls answered within service_level seconds"}),
            "average_speed_of_answer": nullable({"type": "number", "description": "seconds"}),
            "longest_wait": {"type": "number", "description": "seconds: the longest wait today, callers still waiting included"},
        },
    },
    "Queue": {
        "type": "object",
        "required": ["name", "strategy", "callers", "agents", "stats"],
        "properties": {
            "name": _TEXT,
            "strategy": _TEXT,
            "callers": {"type": "array", "items": ref("QueueCaller")},
            "agents": {"type": "array", "items": ref("QueueAgent")},
            "stats": ref("QueueStats"),
        },
    },
    "AgentAction": {
        "type": "object",
        "required": ["action"],
        "additionalProperties": False,
        "properties": {"action": {"type": "string", "enum": ["login", "logout", "pause", "unpause"]}},
    },
    "AgentState": {
        "type": "object",
        "required": ["queue", "extension", "state"],
        "properties": {"queue": _TEXT, "extension": _TEXT, "state": _AGENT_STATE},
    },
    "CallbackRequest": {
        "type": "object",
        "required": ["queue", "number"],
        "additionalProperties": False,
        "properties": {"queue": {"type": "string", "minLength": 1}, "number": _NUMBER},
    },
    "Callback": {
        "type": "object",
        "required": ["id", "queue", "number", "requested", "status", "attempts", "position"],
        "properties": {
            "id": _TEXT,
            "queue": _TEXT,
            "number": _TEXT,
            "requested": _TIME,
            "status": {"type": "string", "enum": ["pending", "completed", "failed", "cancelled"]},
            "attempts": {"type": "integer", "minimum": 0},
            "position": nullable({"type": "integer", "minimum": 1, "description": "place in the queue's line while pending"}),
        },
    },
    "VoicemailMessage": {
        "type": "object",
        "required": ["id", "mailbox", "caller", "received", "seconds", "heard"],
        "properties": {
            "id": _TEXT,
            "mailbox": _TEXT,
            "caller": _TEXT,
            "received": _TIME,
            "seconds": {"type": "number"},
            "heard": {"type": "boolean"},
        },
    },
    "VoicemailChange": {
        "type": "object",
        "required": ["heard"],
        "additionalProperties": False,
        "properties": {"heard": {"type": "boolean"}},
    },
    "Recording": {
        "type": "object",
        "required": ["id", "call_id", "queue", "agent", "caller", "callee", "started", "seconds", "channels", "bytes"],
        "properties": {
            "id": _TEXT,
            "call_id": _TEXT,
            "queue": nullable(_TEXT),
            "agent": nullable(_TEXT),
            "caller": nullable(_TEXT),
            "callee": nullable(_TEXT),
            "started": _TIME,
            "seconds": {"type": "number"},
            "channels": {"type": "integer", "enum": [1, 2]},
            "bytes": {"type": "integer"},
        },
    },
    "CallRecord": {
        "type": "object",
        "description": "one row of the cdr table: these columns and any the table has besides",
        "required": ["call_id", "direction", "from_number", "to_number", "started", "ended", "disposition", "duration", "billsec"],
        "properties": {
            "call_id": {"type": "string", "description": "the call's id, made by the server (as in GET /api/calls)"},
            "sip_call_id": {**nullable(_TEXT), "description": "the SIP Call-ID of the caller's INVITE, to find it in a trace"},
            "direction": _TEXT,
            "from_number": nullable(_TEXT),
            "to_number": nullable(_TEXT),
            "started": _TIME,
            "answered": nullable(_TIME),
            "ended": _TIME,
            "disposition": _TEXT,
            "duration": {"type": "number"},
            "billsec": {"type": "number"},
            "hangup": {**nullable(_TEXT), "description": "who hung up: caller, callee or pbx"},
            "reason": {
                **nullable(_TEXT),
                "description": "why the server hung up: rtp-timeout (no media for rtp.timeout seconds), max-call-seconds",
            },
        },
        "additionalProperties": True,
    },
    "Flow": {
        "type": "object",
        "required": ["name", "file", "loaded", "valid", "errors"],
        "properties": {
            "name": _TEXT,
            "file": nullable({"type": "string", "description": "null: the running flow's file is gone"}),
            "loaded": {"type": "boolean", "description": "a version of the flow is running"},
            "valid": {"type": "boolean", "description": "the file as it is now passes validation"},
            "errors": {"type": "array", "items": {"type": "string"}, "description": "FILE:LINE: message"},
        },
    },
    "Reloaded": {
        "type": "object",
        "required": ["status", "flows"],
        "properties": {"status": {"type": "string", "enum": ["reloaded"]}, "flows": {"type": "array", "items": _TEXT}},
    },
}


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
