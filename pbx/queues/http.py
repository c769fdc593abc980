"""``/api/queues`` and ``/api/callbacks``: each queue's callers, agents and
today's figures; logging agents in and out; callbacks asked for, listed and
cancelled."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pbx.calls.routing import DialRefused
from pbx.errors import NotFound, QueueError
from pbx.http.openapi import NO_CONTENT, PAGINATION, Operation, Reply, page_reply, query
from pbx.http.requests import Query, about_field, invalid_body, page, paged, read_body
from pbx.http.schemas import ref
from pbx.http.services import SERVICES, AdminServices
from pbx.store.db import iso_time
from pbx.store.queries import callback_page

CALLBACK_STATUSES = ("pending", "completed", "failed", "cancelled")


def queue_json(services: AdminServices, name: str) -> dict[str, Any]:
    """One queue as the API and the wallboard show it: the same figures in both."""
    queues = services.queues
    queue = services.config().queues[name]
    states = queues.agent_states(name)  # also brings the lines up to date with the config
    line = queues.lines[name]
    snapshot = queues.queue_snapshot(line)
    stats = snapshot.stats
    now = time.time()
    return {
        "name": name,
        "strategy": queue.strategy,
        "callers": [
            {"position": i, "id": e.id, "caller": e.number, "wait": round(now - e.entered, 3), "callback": e.callback}
            for i, e in enumerate(line.entries, start=1)
        ],
        "agents": [{"extension": ext, "state": state, "since": _since(queues.agent_since(name, ext))} for ext, state in states.items()],
        "voicemail_pending": snapshot.voicemail_pending,
        "voicemail_overdue": snapshot.voicemail_overdue,
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
            "service_level_seconds": queue.service_level,
            "average_speed_of_answer": stats.average_speed_of_answer,
            "longest_wait": round(max(stats.longest_wait, snapshot.longest_wait), 3),
            "surveys": stats.surveys,
            "csat": round(stats.csat, 3) if stats.csat is not None else None,
        },
    }


def _since(moment: float | None) -> str | None:
    return iso_time(moment) if moment is not None else None


def _queue_name(request: web.Request) -> str:
    name = request.match_info["queue"]
    if name not in request.app[SERVICES].config().queues:
        raise NotFound(f"there is no queue {name}", code="no-such-queue")
    return name


async def list_queues(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return paged(request, [queue_json(services, name) for name in services.config().queues])


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(queue_json(request.app[SERVICES], _queue_name(request)))


async def set_agent(request: web.Request) -> web.Response:
    queues = request.app[SERVICES].queues
    name = _queue_name(request)
    extension = request.match_info["ext"]
    if extension not in queues.agent_states(name):  # before the body: an unknown agent is 404 whatever it asks
        raise NotFound(f"{extension} is no agent of queue {name}", code="no-such-agent")
    body = await read_body(request, ref("AgentAction"))
    await queues.set_agent(name, extension, body["action"])
    return web.json_response({"queue": name, "extension": extension, "state": queues.agent_states(name)[extension]})


def _positions(services: AdminServices) -> dict[str, int]:
    return {e.id: line.position(e) for line in services.queues.lines.values() for e in line.entries if e.callback}


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
    services = request.app[SERVICES]
    q = Query(request)
    status = q.choice("status", CALLBACK_STATUSES, "pending")
    queue = q.text("queue")
    limit, offset = q.page()
    q.check()
    rows, total = await callback_page(services.store, status=status, queue=queue, limit=limit, offset=offset)
    positions = _positions(services)
    return page([_callback_json(row, positions) for row in rows], total, limit, offset)


async def request_callback(request: web.Request) -> web.Response:
    """422 ``invalid-body`` names every field that is wrong; a number only
    refused by the outbound rules keeps its own code (``number-not-allowed``)."""
    services = request.app[SERVICES]
    body = await read_body(request, ref("CallbackRequest"))
    cfg = services.config()
    name, number = body["queue"], body["number"]
    problems: dict[str, str] = {}
    if name not in cfg.queues:
        problems["queue"] = f"there is no queue {name}"
    try:
        services.queues.check_callback_number(number, src=request.remote or "-")
    except DialRefused as exc:
        if not problems:
            raise about_field(exc, "number") from exc
        problems["number"] = exc.message
    if problems:
        raise invalid_body(problems)
    if not cfg.queues[name].callback.enabled:
        raise QueueError(f"queue {name} does not take callbacks", code="callbacks-disabled")
    try:
        entry = await services.queues.request_callback(name, number)
    except DialRefused as exc:  # the rules changed since the check above (a reload)
        raise about_field(exc, "number") from exc
    row = {"id": entry.id, "queue": name, "number": number, "requested": iso_time(entry.entered), "status": "pending", "attempts": 0}
    return web.json_response(_callback_json(row, _positions(services)), status=201)


async def cancel_callback(request: web.Request) -> web.Response:
    await request.app[SERVICES].queues.cancel_callback(request.match_info["id"])
    return web.Response(status=204)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/queues", "listQueues", "Every queue: callers, agents, today's figures", list_queues,
        {200: page_reply("Queue")}, "queues", parameters=PAGINATION,
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
        {200: page_reply("Callback")}, "callbacks",
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
        {204: NO_CONTENT}, "callbacks", errors=(409,),
        description="409 when it is no longer pending or being dialed right now.",
    ),
)  # fmt: skip
