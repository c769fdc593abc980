"""``GET /api/events`` (a WebSocket of the event feed, pbx.live.feed) and
``POST /api/tickets`` (what a browser opens it with, pbx.http.tickets).

A client asks for the types it wants with ``?types=call.ended,queue.joined``
(all of :data:`pbx.events.EVENT_TYPES` by default). The type
``wallboard`` is asked for by name only: a ``{"type": "wallboard", "now",
"queues"}`` message, each queue as ``GET /api/queues/{queue}`` answers it,
sent at once, within :data:`BOARD_DELAY` of each event, and every
:data:`BOARD_REFRESH` seconds. A client that falls :data:`BACKLOG` events
behind is closed (1013, try again later) rather than let memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from pbx.errors import BadRequest
from pbx.http.openapi import Operation, Reply, query
from pbx.http.requests import Query
from pbx.http.schemas import ref
from pbx.http.server import TICKETS
from pbx.http.services import SERVICES, AdminServices
from pbx.events import EVENT_TYPES
from pbx.live.feed import Event
from pbx.queues.http import queue_json
from pbx.store.db import iso_time

WALLBOARD = "wallboard"
BACKLOG = 10_000  # events queued for one client before it counts as gone
BOARD_DELAY = 0.1  # seconds: events in a burst make one board
BOARD_REFRESH = 5.0  # seconds: a board with no event since, for the clocks on the page to stay true
HEARTBEAT = 30.0  # seconds between pings: a client gone without a close is noticed
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("event_sockets")


def serve_sockets(app: web.Application) -> None:
    """Keep account of ``app``'s event sockets, so that stopping the server
    closes them (1001, going away) instead of waiting for the clients to."""
    app[SOCKETS] = set()
    app.on_shutdown.append(_close_sockets)


async def _close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")


async def create_ticket(request: web.Request) -> web.Response:
    ticket, expires = request.app[TICKETS].issue()
    return web.json_response({"ticket": ticket, "expires": iso_time(expires)}, status=201)


def board(services: AdminServices) -> dict[str, Any]:
    """The wallboard's message: every queue as the API shows it."""
    return {"type": WALLBOARD, "now": iso_time(time.time()), "queues": [queue_json(services, name) for name in services.config().queues]}


def _types(request: web.Request) -> frozenset[str]:
    q = Query(request)
    asked = q.text("types")
    q.check()
    if asked is None:
        return frozenset(EVENT_TYPES)
    types = frozenset(t.strip() for t in asked.split(",") if t.strip())
    unknown = sorted(types - {*EVENT_TYPES, WALLBOARD})
    if unknown or not types:
        raise BadRequest(
            f"unknown event types: {', '.join(unknown) or '(none given)'}", code="invalid-query", status=422,
            fields={"types": f"a comma-separated list of {', '.join((*EVENT_TYPES, WALLBOARD))}"},
        )  # fmt: skip
    return types


async def events_socket(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    types = _types(request)
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT)
    if not ws.can_prepare(request).ok:
        raise BadRequest("GET /api/events is a WebSocket: send the upgrade headers", code="websocket-required")
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    backlog = Backlog()
    changed = asyncio.Event()

    def take(event: Event) -> None:
        changed.set()
        if event["type"] in types and not backlog.add(event):
            stop()

    stop = services.feed.listen(take)
    senders = [asyncio.create_task(_send_events(ws, backlog))]
    if WALLBOARD in types:
        senders.append(asyncio.create_task(_send_boards(ws, services, changed)))
    try:
        async for message in ws:  # a client says nothing; this ends when it goes
            if message.type == WSMsgType.ERROR:
                break
    finally:
        request.app[SOCKETS].discard(ws)
        with contextlib.suppress(ValueError):
            stop()
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    return ws


class Backlog:
    """The events one client has yet to be sent, up to :data:`BACKLOG`."""

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.overflowed = False
        self.ready = asyncio.Event()

    def add(self, event: Event) -> bool:
        """Queue ``event``; False once the client is too far behind (it gets nothing more)."""
        if len(self.events) >= BACKLOG:
            self.overflowed = True
            self.events.clear()
        else:
            self.events.append(event)
        self.ready.set()
        return not self.overflowed


async def _send_events(ws: web.WebSocketResponse, backlog: Backlog) -> None:
    while not backlog.overflowed:
        await backlog.ready.wait()
        backlog.ready.clear()
        while backlog.events:
            await ws.send_json(backlog.events.popleft())
    await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too far behind")


async def _send_boards(ws: web.WebSocketResponse, services: AdminServices, changed: asyncio.Event) -> None:
    while True:
        changed.clear()
        await ws.send_json(board(services))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), BOARD_REFRESH)
            await asyncio.sleep(BOARD_DELAY)  # the rest of the burst joins this board


_EVENTS_DESCRIPTION = (
    "A WebSocket (send the upgrade headers): one JSON text message per event, `{type, id, time, ...}`, `id` rising "
    "by one per event of the server (a gap: events this client did not ask for or missed). Types: "
    + ", ".join(f"`{t}`" for t in EVENT_TYPES)
    + ". `call.ended` carries the CDR row as `cdr`. Authenticate with the bearer token, or with `?ticket=` from "
    "POST /api/tickets (browsers cannot set headers on a WebSocket). `?types=wallboard` adds a message of type "
    "`wallboard`, `{now, queues}` (each queue as GET /api/queues/{queue}), at once, after events, and every 5 s. "
    "A client that falls 10,000 events behind is closed with 1013. "
    "The same events are POSTed to the URLs of `webhooks` (pbx.yaml) that list their type, as this JSON, with "
    "headers `X-Pbx-Event` (the type), `X-Pbx-Delivery` (the id), `X-Pbx-Timestamp` (Unix seconds) and "
    "`X-Pbx-Signature: sha256=HEX`, the HMAC-SHA256 under the webhook's `secret` of `TIMESTAMP.BODY`: check it in "
    "constant time and refuse old timestamps. A 2xx answer delivers; anything else is retried after 1, 2, 4 ... "
    "60 s, 8 attempts in all, and counted in pbx_webhook_failures_total."
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", "/api/tickets", "createTicket", "A single-use ticket to open the event WebSocket from a browser",
        create_ticket, {201: Reply("good once, for 30 s", ref("Ticket"))}, "events",
    ),
    Operation(
        "GET", "/api/events", "events", "The event feed, over a WebSocket", events_socket,
        {101: Reply("switching to the WebSocket; then one message per event", ref("Event"))}, "events",
        parameters=(
            query("types", {"type": "string"}, "comma-separated event types (default: all but wallboard)"),
            query("ticket", {"type": "string"}, "a ticket from POST /api/tickets, instead of the bearer token"),
        ),
        errors=(400,), description=_EVENTS_DESCRIPTION,
    ),
)  # fmt: skip
