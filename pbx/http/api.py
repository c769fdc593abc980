"""The admin HTTP API of CONTRACT §4: calls, click-to-call, registrations,
queues and agents, callbacks, voicemail, recordings, CDR and IVR flows.

:data:`OPERATIONS` is the one table of routes: :func:`add_api` registers
its handlers and ``GET /api/openapi.json`` serves the document built from
it (pbx.http.openapi), whose request body schemas are also what the
handlers validate against.

Choices the document states too: lists answer a page
``{"items", "total", "limit", "offset"}`` (``?limit=`` default 100, at most
1000; ``?offset=``), a CDR export in CSV carries the total in
``X-Total-Count`` and neutralises cells a spreadsheet would run as formulas
(:func:`csv_cell`); request bodies must be declared ``application/json``
(415). ``POST /api/calls`` answers 202 at once with the id the
call keeps: the call goes on in the background, ringing ``from`` first
(state ``originating``), then ``to`` once ``from`` answers.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo

from aiohttp import web

from pbx import __version__
from pbx.config import Config, Destination
from pbx.http.openapi import (
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    PAGE_OFFSET_MAX,
    PAGINATION,
    TIME_RANGE,
    Operation,
    Reply,
    Schema,
    document,
    page_of,
    query,
    ref,
    validate_body,
)
from pbx.http.server import JSON_TYPE, not_json
from pbx.ivr.schema import flow_files, load_flows
from pbx.recordings import Recording
from pbx.sip.b2bua import Call, CallConflict, CallService, Unreachable
from pbx.sip.routing import DialRefused
from pbx.store.db import SCHEMA, Store, iso_time
from pbx.tasks import Background

if TYPE_CHECKING:
    from pbx.app import Pbx

logger = logging.getLogger(__name__)

CLICK_TO_CALL = "click-to-call"  # the direction of such calls (CDR, metrics)
CSV_TYPE = "text/csv"


# --- errors ---

_STATUS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    415: web.HTTPUnsupportedMediaType,
    422: web.HTTPUnprocessableEntity,
    503: web.HTTPServiceUnavailable,
}


def fail(status: int, error: str, message: str, *, fields: dict[str, str] | None = None, errors: list[str] | None = None) -> NoReturn:
    """Answer ``{"error": error, "message": message}`` (and ``fields`` or ``errors``) with ``status``."""
    body: dict[str, Any] = {"error": error, "message": message}
    if fields:
        body["fields"] = fields
    if errors is not None:
        body["errors"] = errors
    raise _STATUS[status](text=json.dumps(body), content_type="application/json")


# --- click-to-call ---


@dataclass
class Placing:
    """A click-to-call whose ``from`` extension is still ringing."""

    id: str
    from_ext: str
    to: str
    destination: Destination
    started: float


class ClickToCalls:
    """Click-to-call requests until their ``from`` extension answers; from
    then on the call is in CallService.calls under the same id."""

    def __init__(self, calls: CallService, config: Callable[[], Config]) -> None:
        self.calls = calls
        self.config = config
        self.placing: dict[str, Placing] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background = Background("click-to-call")

    def start(self, from_ext: str, to: str, destination: Destination) -> Placing:
        placing = Placing(f"c2c-{uuid.uuid4().hex[:16]}", from_ext, to, destination, time.time())
        self.placing[placing.id] = placing
        self._tasks[placing.id] = self._background.spawn(self._originate(placing))
        logger.info("click-to-call %s: ringing %s to connect it to %s", placing.id, from_ext, destination)
        return placing

    async def _originate(self, placing: Placing) -> None:
        try:
            result = await self.calls.originate(
                placing.from_ext,
                placing.destination,
                caller_id=placing.destination.target or placing.to,
                timeout=self.config().sip.ring_timeout,
                direction=CLICK_TO_CALL,
                call_id=placing.id,
                party=placing.from_ext,  # a number outside is dialed for `from`, by its class of service
            )
        finally:
            self.placing.pop(placing.id, None)
            self._tasks.pop(placing.id, None)
        if isinstance(result, Unreachable):
            logger.info("click-to-call %s: %s was not reached (%s)", placing.id, placing.from_ext, result.disposition)

    async def cancel(self, placing_id: str) -> bool:
        """Stop ringing the ``from`` extension of a click-to-call, and return
        once that is done (its CDR row on its way); False when there is no such one."""
        task = self._tasks.get(placing_id)
        if task is None:
            return False
        self.placing.pop(placing_id, None)
        task.cancel()
        await asyncio.wait([task])
        return True

    async def close(self) -> None:
        await self._background.close()


# --- wiring ---

PBX: web.AppKey[Pbx] = web.AppKey("pbx")
CLICKS = web.AppKey("click_to_calls", ClickToCalls)
DOCUMENT: web.AppKey[dict[str, Any]] = web.AppKey("openapi")


def add_api(app: web.Application, pbx: Pbx) -> None:
    """Serve the admin API of ``pbx`` on ``app`` (made by make_http_app)."""
    app[PBX] = pbx
    app[CLICKS] = ClickToCalls(pbx.calls, lambda: pbx.config)
    app[DOCUMENT] = document(OPERATIONS, __version__)
    for op in OPERATIONS:
        if op.handler is not None:
            app.router.add_route(op.method, op.path, op.handler)
    app.on_shutdown.append(_shutdown)


async def _shutdown(app: web.Application) -> None:
    await app[CLICKS].close()


# --- request helpers ---


class _Query:
    """Query parameters, with every problem collected for one 422."""

    def __init__(self, request: web.Request) -> None:
        self.values = request.query
        self.problems: dict[str, str] = {}

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        text = self.values.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            self.problems[name] = f"must be an integer from {low} to {high}"
            return default
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.values.get(name, default)
        if value not in choices:
            self.problems[name] = f"must be one of {', '.join(choices)}"
            return default
        return value

    def text(self, name: str) -> str | None:
        return self.values.get(name)

    def instant(self, name: str, timezone: str) -> str | None:
        """An ISO-8601 date or date-time as the stored times are written (UTC, milliseconds)."""
        text = self.values.get(name)
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
            if value.tzinfo is None:
                value = value.replace(tzinfo=ZoneInfo(timezone))
            return value.astimezone(UTC).isoformat(timespec="milliseconds")
        except (ValueError, OverflowError):
            self.problems[name] = "must be an ISO-8601 date or date-time, e.g. 2026-03-01 or 2026-03-01T09:30:00+01:00"
            return None

    def page(self) -> tuple[int, int]:
        return self.integer("limit", PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX), self.integer("offset", 0, 0, PAGE_OFFSET_MAX)

    def check(self) -> None:
        if self.problems:
            fail(422, "invalid-query", "invalid query parameters", fields=self.problems)


async def _body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The JSON body, valid by ``schema`` (415 when it is not declared
    application/json, 400 when it is no JSON, 422 with field errors)."""
    if request.content_type != JSON_TYPE:
        fail(415, "unsupported-media-type", not_json(request))
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        fail(400, "invalid-json", "the body must be JSON")
    problems = validate_body(schema, body)
    if problems:
        fail(422, "invalid-body", "the body has invalid fields", fields=problems)
    assert isinstance(body, dict)
    return body


def _page(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> web.Response:
    return web.json_response({"items": items, "total": total, "limit": limit, "offset": offset})


def _paged(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """One page of a list held in memory."""
    q = _Query(request)
    limit, offset = q.page()
    q.check()
    return _page(items[offset : offset + limit], len(items), limit, offset)


async def _select(
    store: Store, table: str, where: str, args: list[Any], order: str, limit: int, offset: int, columns: str = "*"
) -> tuple[list[dict[str, Any]], int]:
    """A page of ``table``'s rows matching ``where`` and how many match in all."""

    def run() -> tuple[list[dict[str, Any]], int]:
        rows = store.db.table(table)
        page = rows.rows_where(where or None, args, order_by=order, select=columns, limit=limit, offset=offset)
        return list(page), rows.count_where(where or None, args)

    result: tuple[list[dict[str, Any]], int] = await store.run(run)
    return result


async def _audio(data_dir: Path, relative: str | None, what: str) -> web.FileResponse:
    """A stored WAV file (a path relative to ``data_dir`` that stays inside it)."""
    path = PurePosixPath(relative or "")
    if not path.parts or path.is_absolute() or ".." in path.parts:
        fail(404, "no-audio", f"{what} has no audio file")
    full = data_dir / path
    if not await asyncio.to_thread(full.is_file):
        fail(404, "no-audio", f"the audio file of {what} is gone")
    return web.FileResponse(full, headers={"Content-Type": "audio/wav"})


# --- /api/openapi.json ---


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


# --- calls ---


def _recording_json(recording: Recording, stopped: bool = False) -> dict[str, Any]:
    state = "failed" if recording.failed else "stopped" if stopped else "paused" if recording.paused else "recording"
    return {"id": recording.id, "state": state}


def _call_json(call: Call) -> dict[str, Any]:
    return {
        "id": call.id,
        "from": call.caller,
        "to": call.callee,
        "direction": call.direction,
        "state": call.state.value,
        "started": iso_time(call.started),
        "answered": iso_time(call.answered_at) if call.answered_at else None,
        "queue": call.queue,
        "agent": call.agent,
        "recording": _recording_json(call.recording) if call.recording is not None else None,
    }


def _placing_json(placing: Placing) -> dict[str, Any]:
    return {
        "id": placing.id,
        "from": placing.from_ext,
        "to": placing.destination.target,  # as the call and its CDR row will have it
        "direction": CLICK_TO_CALL,
        "state": "originating",
        "started": iso_time(placing.started),
        "answered": None,
        "queue": None,
        "agent": None,
        "recording": None,
    }


def _call(request: web.Request) -> Call:
    call_id = request.match_info["id"]
    call = request.app[PBX].calls.calls.get(call_id)
    if call is None:
        fail(404, "no-such-call", f"there is no call {call_id}")
    return call


async def list_calls(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    items = [_placing_json(p) for p in request.app[CLICKS].placing.values()]
    items += [_call_json(call) for call in pbx.calls.calls.values()]
    items.sort(key=lambda item: (item["started"], item["id"]))
    return _paged(request, items)


async def place_call(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    body = await _body(request, ref("ClickToCall"))
    from_ext, to = body["from"], body["to"]
    problems: dict[str, str] = {}
    refused: DialRefused | None = None
    if from_ext not in pbx.config.extensions:
        problems["from"] = f"there is no extension {from_ext}"
    try:
        destination = pbx.calls.destination_for(to, from_ext, src=request.remote or "-")
    except ValueError as exc:
        problems["to"] = str(exc)
    except DialRefused as exc:
        refused = exc
    else:
        if destination.kind == "extension" and destination.target == from_ext:
            problems["to"] = "is the `from` extension itself"
    _refuse(problems, refused, "to")
    if pbx.calls.draining:
        fail(503, "stopping", "the server is stopping and takes no new calls")
    if not pbx.registrar.contacts(from_ext):
        fail(409, "extension-unavailable", f"extension {from_ext} has no registered phone")
    clicks = request.app[CLICKS]
    if pbx.calls.extension_busy(from_ext) or any(p.from_ext == from_ext for p in clicks.placing.values()):
        fail(409, "extension-busy", f"extension {from_ext} is on a call")
    placing = clicks.start(from_ext, to, destination)
    return web.json_response(_placing_json(placing), status=202)


def _refuse(problems: dict[str, str], refused: DialRefused | None, field: str) -> None:
    """Answer the body's problems (422 invalid-body), else a number the
    server will not dial: 422 number-not-allowed (no outbound rule lets
    the party dial it), 409 call-limit (its trunk has max_calls calls up)."""
    if problems:
        if refused is not None:
            problems[field] = str(refused)
        fail(422, "invalid-body", "the body has invalid fields", fields=problems)
    if refused is not None:
        fail(409 if refused.error == "call-limit" else 422, refused.error, str(refused), fields={field: str(refused)})


async def hang_up_call(request: web.Request) -> web.Response:
    call_id = request.match_info["id"]
    call = request.app[PBX].calls.calls.get(call_id)
    if call is not None:
        logger.info("call %s: hung up through the API", call_id)
        request.app[PBX].calls.hang_up(call)
    elif not await request.app[CLICKS].cancel(call_id):
        fail(404, "no-such-call", f"there is no call {call_id}")
    return web.Response(status=204)


async def recording_action(request: web.Request) -> web.Response:
    call = _call(request)
    body = await _body(request, ref("RecordingAction"))
    try:
        recording = await request.app[PBX].calls.recording_action(call, body["action"])
    except CallConflict as exc:
        fail(409, exc.error, str(exc))
    return web.json_response({"call": call.id, "recording": _recording_json(recording, stopped=body["action"] == "stop")})


# --- registrations ---


async def list_registrations(request: web.Request) -> web.Response:
    now = time.time()
    items = [
        {
            "extension": b.extension,
            "contact": b.contact,
            "source": f"[{b.source[0]}]:{b.source[1]}" if ":" in b.source[0] else f"{b.source[0]}:{b.source[1]}",
            "transport": b.transport,
            "expires": iso_time(b.expires_at),
            "expires_in": max(0, int(b.expires_at - now)),
            "user_agent": b.user_agent,
        }
        for b in request.app[PBX].registrar.all_bindings()
    ]
    items.sort(key=lambda item: (item["extension"], item["contact"]))
    return _paged(request, items)


# --- queues ---


def _queue_json(pbx: Pbx, name: str) -> dict[str, Any]:
    queue = pbx.config.queues[name]
    states = pbx.queues.agent_states(name)  # also brings the lines up to date with the config
    line = pbx.queues.lines[name]
    snapshot = pbx.queues.queue_snapshot(line)
    stats = snapshot.stats
    now = time.time()
    return {
        "name": name,
        "strategy": queue.strategy,
        "callers": [
            {"position": i, "id": e.id, "caller": e.number, "wait": round(now - e.entered, 3), "callback": e.callback}
            for i, e in enumerate(line.entries, start=1)
        ],
        "agents": [{"extension": ext, "state": state} for ext, state in states.items()],
        "stats": {
            "day": stats.day,
            "offered": stats.offered,
            "answered": stats.answered,
            "abandoned": stats.abandoned,
            "timeouts": stats.timeouts,
            "callbacks": {
                "requested": stats.callbacks_requested,
                "completed": stats.callbacks_completed,
                "failed": stats.callbacks_failed,
            },
            "service_level": stats.service_level,
            "average_speed_of_answer": stats.average_speed_of_answer,
            "longest_wait": round(max(stats.longest_wait, snapshot.longest_wait), 3),
        },
    }


def _queue_name(request: web.Request) -> str:
    name = request.match_info["queue"]
    if name not in request.app[PBX].config.queues:
        fail(404, "no-such-queue", f"there is no queue {name}")
    return name


async def list_queues(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    return _paged(request, [_queue_json(pbx, name) for name in pbx.config.queues])


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(_queue_json(request.app[PBX], _queue_name(request)))


async def set_agent(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    name = _queue_name(request)
    extension = request.match_info["ext"]
    if extension not in pbx.queues.agent_states(name):
        fail(404, "no-such-agent", f"{extension} is no agent of queue {name}")
    body = await _body(request, ref("AgentAction"))
    pbx.queues.set_agent(name, extension, body["action"])
    return web.json_response({"queue": name, "extension": extension, "state": pbx.queues.agent_states(name)[extension]})


# --- callbacks ---

CALLBACK_STATUSES = ("pending", "completed", "failed", "cancelled")


def _positions(pbx: Pbx) -> dict[str, int]:
    return {e.id: line.position(e) for line in pbx.queues.lines.values() for e in line.entries if e.callback}


def _callback_json(row: dict[str, Any], positions: dict[str, int]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "queue": row["queue"],
        "number": row["number"],
        "requested": row["requested"],
        "status": row["status"],
        "attempts": row["attempts"] or 0,
        "position": positions.get(row["id"]) if row["status"] == "pending" else None,
    }


async def list_callbacks(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    q = _Query(request)
    status = q.choice("status", CALLBACK_STATUSES, "pending")
    queue = q.text("queue")
    limit, offset = q.page()
    q.check()
    where, args = "status = ?", [status]
    if queue is not None:
        where += " and queue = ?"
        args.append(queue)
    rows, total = await _select(pbx.store, "callbacks", where, args, "entered, id", limit, offset)
    positions = _positions(pbx)
    return _page([_callback_json(row, positions) for row in rows], total, limit, offset)


async def request_callback(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    body = await _body(request, ref("CallbackRequest"))
    cfg = pbx.config
    name, number = body["queue"], body["number"]
    problems: dict[str, str] = {}
    refused: DialRefused | None = None
    if name not in cfg.queues:
        problems["queue"] = f"there is no queue {name}"
    try:
        pbx.queues.check_callback_number(number, src=request.remote or "-")
    except DialRefused as exc:
        refused = exc
    _refuse(problems, refused, "number")
    if not cfg.queues[name].callback.enabled:
        fail(409, "callbacks-disabled", f"queue {name} does not take callbacks")
    try:
        entry = await pbx.queues.request_callback(name, number)
    except DialRefused as exc:  # the rules changed since the check above (a reload)
        fail(422, exc.error, str(exc), fields={"number": str(exc)})
    except ValueError as exc:
        fail(409, "callback-exists", str(exc))
    row = {"id": entry.id, "queue": name, "number": number, "requested": iso_time(entry.entered), "status": "pending", "attempts": 0}
    return web.json_response(_callback_json(row, _positions(pbx)), status=201)


async def cancel_callback(request: web.Request) -> web.Response:
    callback_id = request.match_info["id"]
    try:
        await request.app[PBX].queues.cancel_callback(callback_id)
    except KeyError:
        fail(404, "no-such-callback", f"there is no callback {callback_id}")
    except ValueError as exc:
        fail(409, "callback-not-pending", str(exc))
    return web.Response(status=204)


# --- voicemail ---


def _mailbox(request: web.Request) -> str:
    box = request.match_info["box"]
    if not request.app[PBX].voicemail.exists(box):
        fail(404, "no-such-mailbox", f"there is no mailbox {box}")
    return box


async def _message(request: web.Request) -> dict[str, Any]:
    box = _mailbox(request)
    message_id = request.match_info["id"]
    rows = await request.app[PBX].store.rows("voicemail", "mailbox = ? and id = ?", [box, message_id])
    if not rows:
        fail(404, "no-such-message", f"mailbox {box} has no message {message_id}")
    return rows[0]


def _message_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "mailbox": row["mailbox"],
        "caller": row["caller"],
        "received": row["received"],
        "seconds": row["seconds"],
        "heard": bool(row["heard"]),
    }


async def list_messages(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    box = _mailbox(request)
    q = _Query(request)
    limit, offset = q.page()
    q.check()
    rows, total = await _select(pbx.store, "voicemail", "mailbox = ?", [box], "received desc, id", limit, offset)
    return _page([_message_json(row) for row in rows], total, limit, offset)


async def message_audio(request: web.Request) -> web.FileResponse:
    row = await _message(request)
    return await _audio(request.app[PBX].config.storage.data_dir, row["path"], f"message {row['id']}")


async def change_message(request: web.Request) -> web.Response:
    row = await _message(request)
    body = await _body(request, ref("VoicemailChange"))
    await request.app[PBX].voicemail.mark_heard(row, body["heard"])
    return web.json_response(_message_json({**row, "heard": body["heard"]}))


async def delete_message(request: web.Request) -> web.Response:
    row = await _message(request)
    await request.app[PBX].voicemail.delete(row)
    return web.Response(status=204)


# --- recordings ---

_RECORDING_FIELDS = ("id", "call_id", "queue", "agent", "caller", "callee", "started", "seconds", "channels", "bytes")


async def list_recordings(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    q = _Query(request)
    start, end = q.instant("from", pbx.config.timezone), q.instant("to", pbx.config.timezone)
    queue, extension = q.text("queue"), q.text("extension")
    limit, offset = q.page()
    q.check()
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (("started >= ?", start), ("started < ?", end), ("queue = ?", queue)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    if extension is not None:
        clauses.append("(agent = ? or caller = ? or callee = ?)")
        args += [extension] * 3
    rows, total = await _select(pbx.store, "recordings", " and ".join(clauses), args, "started desc, id", limit, offset)
    return _page([{name: row[name] for name in _RECORDING_FIELDS} for row in rows], total, limit, offset)


async def _recording_row(request: web.Request) -> dict[str, Any]:
    recording_id = request.match_info["id"]
    rows = await request.app[PBX].store.rows("recordings", "id = ?", [recording_id])
    if not rows:
        fail(404, "no-such-recording", f"there is no recording {recording_id}")
    return rows[0]


async def recording_audio(request: web.Request) -> web.FileResponse:
    row = await _recording_row(request)
    return await _audio(request.app[PBX].config.storage.data_dir, row["path"], f"recording {row['id']}")


async def delete_recording(request: web.Request) -> web.Response:
    row = await _recording_row(request)
    if not await request.app[PBX].recorder.delete(row):
        fail(409, "file-not-deleted", f"the file of recording {row['id']} could not be deleted; it stays listed")
    return web.Response(status=204)


# --- call detail records ---


# A cell a spreadsheet would evaluate: a formula (= + - @) or one behind a
# tab or carriage return (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def csv_cell(value: Any) -> Any:
    """A CDR value as a CSV cell a spreadsheet shows as text, never runs.

    Caller ids and numbers come from outside (a SIP From header): text
    starting like a formula gets a leading ``'`` (OWASP), so
    ``=HYPERLINK(...)`` shows as written. A plain number such as
    ``+15551234567`` or ``-3`` is left alone: it can only ever be a number,
    and a quote would change the phone numbers of every exported call.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def cdr_columns(store: Store) -> list[str]:
    """The cdr table's columns: the schema's in its order, then any the table has besides."""
    actual = [column.name for column in store.db["cdr"].columns]
    known = [name for name in SCHEMA["cdr"][0] if name in actual]
    return known + [name for name in actual if name not in known]


async def list_cdr(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    q = _Query(request)
    start, end = q.instant("from", pbx.config.timezone), q.instant("to", pbx.config.timezone)
    form = q.choice("format", ("json", "csv"), "json")
    limit, offset = q.page()
    q.check()
    clauses, args = [], []
    for clause, value in (("started >= ?", start), ("started < ?", end)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    columns = await pbx.store.run(cdr_columns, pbx.store)
    selected = ", ".join(f"[{name}]" for name in columns)
    rows, total = await _select(pbx.store, "cdr", " and ".join(clauses), args, "started, call_id", limit, offset, selected)
    if form == "json":
        return _page(rows, total, limit, offset)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows([[csv_cell(row[name]) for name in columns] for row in rows])
    return web.Response(text=out.getvalue(), content_type=CSV_TYPE, charset="utf-8", headers={"X-Total-Count": str(total)})


# --- IVR flows ---


async def list_flows(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    cfg = pbx.config
    # Validation reads files: off the event loop.
    (found, issues), files = await asyncio.gather(
        asyncio.to_thread(load_flows, cfg.ivr.dir, cfg, pbx.prompts.exists), asyncio.to_thread(flow_files, cfg.ivr.dir)
    )
    running = pbx.flows
    by_file: dict[str, list[str]] = {}
    for issue in issues:
        by_file.setdefault(str(issue.file), []).append(str(issue))
    items: list[dict[str, Any]] = [
        {
            "name": path.stem,
            "file": str(path),
            "loaded": path.stem in running,
            "valid": path.stem in found and not by_file.get(str(path)),
            "errors": by_file.get(str(path), []),
        }
        for path in files
    ]
    listed = {path.stem for path in files}
    items += [{"name": name, "file": None, "loaded": True, "valid": False, "errors": []} for name in running if name not in listed]
    items.sort(key=lambda item: item["name"])
    return _paged(request, items)


async def reload_flows(request: web.Request) -> web.Response:
    pbx = request.app[PBX]
    issues = await pbx.reload()
    if issues:
        fail(
            422,
            "invalid-config",
            f"{len(issues)} problem(s) found; the running configuration and flows stay",
            errors=[str(issue) for issue in issues],
        )
    return web.json_response({"status": "reloaded", "flows": sorted(pbx.flows)})


# --- the route table ---

_OK = "done"
_NO_CONTENT = Reply("done; no content")


def _page_reply(name: str) -> Reply:
    return Reply("one page of the list", page_of(name))


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/healthz", "health", "Whether SIP and storage work", None,
        {200: Reply("working", ref("Health")), 503: Reply("failing", ref("Health"))}, "operations", auth=False,
    ),
    Operation(
        "GET", "/metrics", "metrics", "Prometheus metrics (CONTRACT §5)", None,
        {200: Reply("Prometheus text format", content={"text/plain": {"type": "string"}})}, "operations",
    ),
    Operation(
        "GET", "/api/openapi.json", "openapi", "This document", openapi,
        {200: Reply("the OpenAPI 3 document", {"type": "object"})}, "operations",
    ),
    Operation(
        "GET", "/api/calls", "listCalls", "Active calls, oldest first", list_calls,
        {200: _page_reply("Call")}, "calls", parameters=PAGINATION,
    ),
    Operation(
        "POST", "/api/calls", "clickToCall", "Click-to-call: ring `from`, then connect it to `to`", place_call,
        {202: Reply("accepted: `from` rings now (state originating); the call keeps this id", ref("Call"))},
        "calls", body=ref("ClickToCall"), errors=(409, 503),
        description="Answers at once. Once `from` answers, the call rings `to` for it; if `from` does not answer "
        "within sip.ring_timeout the call disappears from GET /api/calls with a CDR row. "
        "409: `from` has no registered phone or is on a call (`extension-busy`), or the trunk `to` needs has its "
        "max_calls calls up (`call-limit`); 422 `number-not-allowed`: no outbound rule lets `from` dial `to`; "
        "503: the server is stopping.",
    ),
    Operation(
        "DELETE", "/api/calls/{id}", "hangUpCall", "Hang up a call (or stop ringing a click-to-call's `from`)",
        hang_up_call, {204: _NO_CONTENT}, "calls",
    ),
    Operation(
        "POST", "/api/calls/{id}/recording", "recordCall", "Start, stop, pause or resume recording a bridged call",
        recording_action, {200: Reply(_OK, ref("RecordingActionResult"))}, "calls", body=ref("RecordingAction"),
        errors=(409,),
        description="pause records silence (card numbers) until resume; stop finishes and indexes the file. "
        "409 when the call is not bridged or the action does not fit the recording's state.",
    ),
    Operation(
        "GET", "/api/registrations", "listRegistrations", "Registered contacts", list_registrations,
        {200: _page_reply("Registration")}, "registrations", parameters=PAGINATION,
    ),
    Operation(
        "GET", "/api/queues", "listQueues", "Every queue: callers, agents, today's figures", list_queues,
        {200: _page_reply("Queue")}, "queues", parameters=PAGINATION,
    ),
    Operation(
        "GET", "/api/queues/{queue}", "getQueue", "One queue: callers, agents, today's figures", get_queue,
        {200: Reply("the queue", ref("Queue"))}, "queues",
    ),
    Operation(
        "POST", "/api/queues/{queue}/agents/{ext}", "setAgent", "Log an agent in or out, pause or unpause", set_agent,
        {200: Reply("the agent's state now", ref("AgentState"))}, "queues", body=ref("AgentAction"),
    ),
    Operation(
        "GET", "/api/callbacks", "listCallbacks", "Callbacks, pending ones by default, in line order", list_callbacks,
        {200: _page_reply("Callback")}, "callbacks",
        parameters=(
            query("status", {"type": "string", "enum": list(CALLBACK_STATUSES), "default": "pending"}, "callbacks in this status"),
            query("queue", {"type": "string"}, "only this queue's"),
            *PAGINATION,
        ),
    ),
    Operation(
        "POST", "/api/callbacks", "requestCallback", "Ask a queue to call a number back", request_callback,
        {201: Reply("the callback, pending in the queue's line", ref("Callback"))}, "callbacks",
        body=ref("CallbackRequest"), errors=(409,),
        description="Joins the end of the queue's line like a caller who pressed the callback digit: a free "
        "agent's phone rings first, then the number. 409: the queue takes no callbacks, or the number has one pending; "
        "422 `number-not-allowed`: the number is no extension and no outbound rule without an `extensions` list "
        "matches it (a callback is the server's own call).",
    ),
    Operation(
        "DELETE", "/api/callbacks/{id}", "cancelCallback", "Cancel a pending callback", cancel_callback,
        {204: _NO_CONTENT}, "callbacks", errors=(409,),
        description="409 when it is no longer pending or being dialed right now.",
    ),
    Operation(
        "GET", "/api/voicemail/{box}", "listMessages", "A mailbox's messages, newest first", list_messages,
        {200: _page_reply("VoicemailMessage")}, "voicemail", parameters=PAGINATION,
    ),
    Operation(
        "GET", "/api/voicemail/{box}/{id}/audio", "messageAudio", "A message's audio", message_audio,
        {200: Reply("WAV audio", content={"audio/wav": {"type": "string", "format": "binary"}})}, "voicemail",
    ),
    Operation(
        "PATCH", "/api/voicemail/{box}/{id}", "changeMessage", "Mark a message heard or new", change_message,
        {200: Reply("the message", ref("VoicemailMessage"))}, "voicemail", body=ref("VoicemailChange"),
        description="Updates the mailbox's counts and the phones' message-waiting lamps.",
    ),
    Operation(
        "DELETE", "/api/voicemail/{box}/{id}", "deleteMessage", "Delete a message", delete_message,
        {204: _NO_CONTENT}, "voicemail",
    ),
    Operation(
        "GET", "/api/recordings", "listRecordings", "Call recordings, newest first", list_recordings,
        {200: _page_reply("Recording")}, "recordings",
        parameters=(
            *TIME_RANGE,
            query("queue", {"type": "string"}, "only this queue's"),
            query("extension", {"type": "string"}, "only those with this extension as agent, caller or callee"),
            *PAGINATION,
        ),
    ),
    Operation(
        "GET", "/api/recordings/{id}/audio", "recordingAudio", "A recording's audio", recording_audio,
        {200: Reply("WAV audio", content={"audio/wav": {"type": "string", "format": "binary"}})}, "recordings",
    ),
    Operation(
        "DELETE", "/api/recordings/{id}", "deleteRecording", "Delete a recording: its file, then its row",
        delete_recording, {204: _NO_CONTENT}, "recordings", errors=(409,),
        description="409 when the file cannot be deleted; the recording stays listed.",
    ),
    Operation(
        "GET", "/api/cdr", "listCdr", "Call detail records, oldest first", list_cdr,
        {
            200: Reply(
                "a page of records (JSON), or the same page as CSV with a header row of the cdr table's columns; "
                "in CSV a text cell starting with = + - @, a tab or a carriage return (not a plain number) gets a "
                "leading ' so that no spreadsheet runs it as a formula",
                content={"application/json": page_of("CallRecord"), CSV_TYPE: {"type": "string"}},
                headers={"X-Total-Count": {"type": "integer"}},
            )
        },
        "cdr",
        parameters=(
            *TIME_RANGE,
            query("format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "json or csv"),
            *PAGINATION,
        ),
    ),
    Operation(
        "GET", "/api/ivr", "listFlows", "IVR flows: running, and whether their files validate now", list_flows,
        {200: _page_reply("Flow")}, "ivr", parameters=PAGINATION,
    ),
    Operation(
        "POST", "/api/ivr/reload", "reload", "Validate pbx.yaml and every flow, and swap them in", reload_flows,
        {200: Reply("reloaded", ref("Reloaded"))}, "ivr", errors=(422,),
        description="On any problem nothing changes: 422 with `errors`, each `FILE:LINE: message`.",
    ),
)  # fmt: skip
