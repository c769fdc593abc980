"""The JSON schemas of the admin API's bodies (``#/components/schemas``),
which pbx.http.openapi puts in the OpenAPI document and validates request
bodies against."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if "$ref" in schema:  # OpenAPI 3.0 ignores whatever stands beside a $ref
        return {"nullable": True, "allOf": [schema]}
    return {**schema, "nullable": True}



_TEXT = {"type": "string"}
_NUMBER = {"type": "string", "pattern": r"^\+?[0-9]{2,15}$"}
_TIME = {"type": "string", "format": "date-time"}
_AGENT_STATE = {"type": "string", "enum": ["logged_out", "available", "ringing", "busy", "wrapup", "paused", "dnd"]}

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
    "Ticket": {
        "type": "object",
        "required": ["ticket", "expires"],
        "properties": {"ticket": {"type": "string", "description": "pass as ?ticket= to GET /api/events, once"}, "expires": _TIME},
    },
    "Event": {
        "type": "object",
        "required": ["type", "id", "time"],
        "additionalProperties": True,
        "description": "One event of the feed; the fields beyond these depend on the type.",
        "properties": {
            "type": {"type": "string", "description": "call.started, call.ended, queue.joined, ... (see GET /api/events)"},
            "id": {"type": "integer", "description": "rises by one per event of the server since it started"},
            "time": _TIME,
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
            "direction": {"type": "string", "description": "internal, inbound, outbound, callback, click-to-call or monitor"},
            "state": {
                "type": "string",
                "enum": ["originating", "ringing", "ivr", "queued", "answered", "parked", "ended"],
                "description": "originating: a click-to-call still ringing its `from` extension; parked: waiting in a park slot",
            },
            "started": _TIME,
            "answered": nullable(_TIME),
            "queue": nullable(_TEXT),
            "agent": nullable(_TEXT),
            "recording": nullable(ref("ActiveRecording")),
            "linked_id": {"type": "string", "description": "the id every piece of a transferred call shares: the first piece's"},
            "transferred_by": {**nullable(_TEXT), "description": "who transferred the caller into this piece"},
        },
    },
    "CallTransfer": {
        "type": "object", "required": ["to"], "additionalProperties": False,
        "properties": {
            "to": {"type": "string", "minLength": 1, "description": "as ClickToCall's `to` (also group:NAME), for the leaving party"},
            "leaving": {"type": "string", "enum": ["callee", "caller"], "default": "callee", "description": "the party that leaves"},
        },
    },  # fmt: skip
    "CallMonitor": {
        "type": "object", "required": ["extension", "mode"], "additionalProperties": False,
        "properties": {
            "extension": {"type": "string", "minLength": 1, "description": "the supervisor's extension, rung for it"},
            "mode": {
                "type": "string", "enum": ["listen", "whisper", "barge"],
                "description": "listen: hears both parties; whisper: the agent hears the supervisor too; barge: both parties do",
            },
        },
    },  # fmt: skip
    "CallMonitorStarted": {
        "type": "object",
        "required": ["monitor", "call", "extension", "mode"],
        "properties": {
            "monitor": {"type": "string", "description": "the id of the call placed to the supervisor (direction monitor)"},
            "call": {"type": "string", "description": "the call listened in on"},
            "extension": _TEXT,
            "mode": {"type": "string", "enum": ["listen", "whisper", "barge"]},
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
    "Extension": {
        "type": "object",
        "required": ["number", "name", "dnd", "forward"],
        "properties": {
            "number": _TEXT,
            "name": _TEXT,
            "dnd": {"type": "boolean", "description": "do-not-disturb (*78 on, *79 off): calls go where busy ones go"},
            "forward": {
                "type": "object",
                "required": ["always", "busy", "no_answer"],
                "properties": {key: nullable(_TEXT) for key in ("always", "busy", "no_answer")},
                "description": "where calls go now, as destinations (extension:1002, external:+15551234, voicemail:1001), "
                "null for none: `always` pbx.yaml's or the phone's (*72NUMBER, *73 off); `busy` when busy or in do-not-disturb, "
                "`no_answer` after sip.ring_timeout or unregistered, both the mailbox by default",
            },
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
        "required": ["extension", "state", "since"],
        "properties": {
            "extension": _TEXT,
            "state": _AGENT_STATE,
            "since": nullable({**_TIME, "description": "when the agent's present state began (null: not seen yet)"}),
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
            "service_level_seconds",
            "average_speed_of_answer",
            "longest_wait",
            "surveys",
            "csat",
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
            "service_level_seconds": {"type": "integer", "description": "the queue's target: answered within this many seconds"},
            "average_speed_of_answer": nullable({"type": "number", "description": "seconds"}),
            "longest_wait": {"type": "number", "description": "seconds: the longest wait today, callers still waiting included"},
            "surveys": {"type": "integer", "description": "scores callers gave in the queue's survey today"},
            "csat": nullable({"type": "number", "description": "today's average survey score (1-5 with the default rate node); null before the first"}),
        },
    },
    "Queue": {
        "type": "object",
        "required": ["name", "strategy", "callers", "agents", "voicemail_pending", "voicemail_overdue", "stats"],
        "properties": {
            "name": _TEXT,
            "strategy": _TEXT,
            "callers": {"type": "array", "items": ref("QueueCaller")},
            "agents": {"type": "array", "items": ref("QueueAgent")},
            "voicemail_pending": {"type": "integer", "description": "voicemail messages of the queue's mailboxes waiting to be called back"},
            "voicemail_overdue": {"type": "integer", "description": "of those, the ones older than their mailbox's respond_within"},
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
                "description": "why the server hung up: rtp-timeout (no media for rtp.timeout seconds), max-call-seconds, "
                "transfer (its caller went on in another piece), pickup (its caller picked up a call ringing elsewhere or parked)",
            },
            "linked_id": {**nullable(_TEXT), "description": "the call_id of the first piece of a transferred call, shared by every piece"},
            "transferred_by": {**nullable(_TEXT), "description": "the extension (or number) that transferred this piece's caller here"},
            "transfer_to": {**nullable(_TEXT), "description": "where this piece's caller was transferred when the piece ended"},
            "picked_up_by": {**nullable(_TEXT), "description": "the extension that answered the call by pickup, or took it from its park slot"},
        },
        "additionalProperties": True,
    },
    "Survey": {
        "type": "object",
        "required": ["id", "call_id", "queue", "agent", "score", "time"],
        "properties": {
            "id": {"type": "integer"},
            "call_id": {"type": "string", "description": "the call's id (the CDR row's call_id)"},
            "queue": {**nullable(_TEXT), "description": "the queue the call waited in; null for a call that met none"},
            "agent": {**nullable(_TEXT), "description": "the agent who took it"},
            "score": {"type": "integer", "description": "the key the caller pressed in a rate node"},
            "time": _TIME,
        },
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
