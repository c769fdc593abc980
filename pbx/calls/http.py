"""``/api/calls``: the calls in progress, click-to-call, hanging up,
recording, transferring and listening in on a call (pbx.calls.monitor).

``POST /api/calls`` answers 202 with the id the call keeps as soon as the
call's CDR row is stored: the call goes on in the background (pbx.calls.click_to_call), ringing ``from`` first
(state ``originating``), then ``to`` once ``from`` answers.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from pbx.calls.click_to_call import CLICK_TO_CALL, Placing
from pbx.calls.model import Call
from pbx.calls.monitor import Monitor
from pbx.calls.routing import DialRefused
from pbx.errors import BadRequest, CallError, NotFound
from pbx.http.openapi import NO_CONTENT, PAGINATION, Operation, Reply, page_reply
from pbx.http.requests import about_field, invalid_body, paged, read_body
from pbx.http.schemas import ref
from pbx.http.services import SERVICES
from pbx.recordings.recorder import Recording
from pbx.store.db import iso_time

logger = logging.getLogger(__name__)


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
        "linked_id": call.linked_id,
        "transferred_by": call.transferred_by,
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


async def list_calls(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    items = [_placing_json(p) for p in services.click_to_call.placing.values()]
    items += [_call_json(call) for call in services.calls.calls.values()]
    items.sort(key=lambda item: (item["started"], item["id"]))
    return paged(request, items)


async def place_call(request: web.Request) -> web.Response:
    """422 ``invalid-body`` names every field that is wrong; a ``to`` that is
    only refused for ``from`` (no outbound rule, trunk full) keeps its own
    code: ``number-not-allowed`` (422) or ``call-limit`` (409)."""
    services = request.app[SERVICES]
    body = await read_body(request, ref("ClickToCall"))
    from_ext, to = body["from"], body["to"]
    problems: dict[str, str] = {}
    if from_ext not in services.config().extensions:
        problems["from"] = f"there is no extension {from_ext}"
    try:
        destination = services.calls.destination_for(to, from_ext, src=request.remote or "-")
    except BadRequest as exc:
        problems["to"] = exc.message
    except DialRefused as exc:
        if not problems:
            raise about_field(exc, "to") from exc
        problems["to"] = exc.message
    else:
        if destination.kind == "extension" and destination.target == from_ext:
            problems["to"] = "is the `from` extension itself"
    if problems:
        raise invalid_body(problems)
    if services.calls.draining:
        raise CallError("the server is stopping and takes no new calls", code="stopping", status=503)
    if not services.registrar.contacts(from_ext):
        raise CallError(f"extension {from_ext} has no registered phone", code="extension-unavailable")
    if services.calls.extension_busy(from_ext) or services.click_to_call.ringing(from_ext):
        raise CallError(f"extension {from_ext} is on a call", code="extension-busy")
    placing = await services.click_to_call.start(from_ext, to, destination)  # 202 promises the call's row
    return web.json_response(_placing_json(placing), status=202)


def _no_call(call_id: str) -> NotFound:
    return NotFound(f"there is no call {call_id}", code="no-such-call")


async def hang_up_call(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    call_id = request.match_info["id"]
    call = services.calls.calls.get(call_id)
    if call is not None:
        logger.info("call %s: hung up through the API", call_id)
        services.calls.hang_up(call)
    elif not await services.click_to_call.cancel(call_id):
        raise _no_call(call_id)
    await services.calls.journal.stored(call_id)  # 204 promises the call's row
    return web.Response(status=204)


def _call_in(request: web.Request) -> Call:
    """The call in progress the path names; 404 ``no-such-call`` when there is none."""
    call_id = request.match_info["id"]
    call = request.app[SERVICES].calls.calls.get(call_id)
    if call is None:
        raise _no_call(call_id)
    return call


async def recording_action(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    call = _call_in(request)
    body = await read_body(request, ref("RecordingAction"))
    recording = await services.calls.recording.action(call, body["action"])
    return web.json_response({"call": call.id, "recording": _recording_json(recording, stopped=body["action"] == "stop")})


async def transfer_call(request: web.Request) -> web.Response:
    """A blind transfer: the leaving party is released, the other goes on in a new piece of the call (its id in the answer)."""
    services = request.app[SERVICES]
    call = _call_in(request)
    body = await read_body(request, ref("CallTransfer"))
    try:
        piece = services.calls.transfers.transfer(call, body["to"], leaving=body.get("leaving", "callee"), src=request.remote or "-")
    except BadRequest as exc:
        raise invalid_body({"to": exc.message}) from exc
    except DialRefused as exc:
        raise about_field(exc, "to") from exc
    logger.info("call %s: transferred through the API to %s: now call %s", call.id, body["to"], piece.id)
    return web.json_response(_call_json(piece))


async def monitor_call(request: web.Request) -> web.Response:
    """A supervisor listens in (pbx.calls.monitor): its extension rings now."""
    services = request.app[SERVICES]
    call = _call_in(request)
    body = await read_body(request, ref("CallMonitor"))
    extension = body["extension"]
    if extension not in services.config().extensions:
        raise invalid_body({"extension": f"there is no extension {extension}"})
    if services.calls.draining:
        raise CallError("the server is stopping and takes no new calls", code="stopping", status=503)
    services.calls.monitors.check(call)  # the call's own conflicts first
    if not services.registrar.contacts(extension):
        raise CallError(f"extension {extension} has no registered phone", code="extension-unavailable")
    if services.calls.extension_busy(extension):
        raise CallError(f"extension {extension} is on a call", code="extension-busy")
    monitor = services.calls.monitors.start(call, extension, body["mode"])
    return web.json_response(_monitor_json(monitor), status=202)


def _monitor_json(monitor: Monitor) -> dict[str, Any]:
    return {"monitor": monitor.id, "call": monitor.call.id, "extension": monitor.extension, "mode": monitor.mode}


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/calls", "listCalls", "Active calls, oldest first", list_calls,
        {200: page_reply("Call")}, "calls", parameters=PAGINATION,
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
        hang_up_call, {204: NO_CONTENT}, "calls",
    ),
    Operation(
        "POST", "/api/calls/{id}/recording", "recordCall", "Start, stop, pause or resume recording a bridged call",
        recording_action, {200: Reply("done", ref("RecordingActionResult"))}, "calls", body=ref("RecordingAction"),
        errors=(409,),
        description="pause records silence (card numbers) until resume; stop finishes and indexes the file. "
        "409 when the call is not bridged or the action does not fit the recording's state.",
    ),
    Operation(
        "POST", "/api/calls/{id}/transfer", "transferCall", "Blind-transfer a bridged call", transfer_call,
        {200: Reply("the piece of the call the transferred party goes on in", ref("Call"))}, "calls", body=ref("CallTransfer"),
        errors=(404, 409),
        description="The leaving party (by default the callee) is hung up; the other one hears ringback while `to` rings, "
        "and goes where `to` leads as a call to it would, busy and no-answer routing included. The call's CDR row ends "
        "with transfer_to; the new piece has its own id and row, with the same linked_id. 409 `not-bridged`; "
        "422 `invalid-body` when `to` leads nowhere, `number-not-allowed` when the leaving party may not dial it.",
    ),
    Operation(
        "POST", "/api/calls/{id}/monitor", "monitorCall", "Let a supervisor listen, whisper to the agent, or barge in",
        monitor_call, {202: Reply("accepted: the supervisor's extension rings now", ref("CallMonitorStarted"))}, "calls",
        body=ref("CallMonitor"), errors=(404, 409, 503),
        description="The server rings `extension` (caller id `monitor-<call id>`) as a call of its own, direction "
        "`monitor`, with the id `monitor` in the answer. Once answered, the supervisor hears both parties; `whisper`: "
        "the agent (the callee, or the first phone of a call the server placed) hears the supervisor too; `barge`: both "
        "parties do. The supervisor hanging up ends only its call; the call ending hangs the supervisor up. "
        "409 `not-bridged`, `already-monitored`, `extension-unavailable` (no registered phone) or `extension-busy`; "
        "422 `invalid-body` for an unknown extension or mode.",
    ),
)  # fmt: skip
