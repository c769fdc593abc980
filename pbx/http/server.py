"""The HTTP side: /healthz, /metrics and the admin API of CONTRACT §4 (pbx.http.api), and the
one middleware that renders every error (a pbx.errors.PbxError) as JSON.

Every route but /healthz and the wallboard's static page needs ``Authorization: Bearer <http.token>``, on
loopback too (the config refuses an empty token). The token is read for
each request, so a reload that changes it takes effect at once: the old one
is refused from then on. The event WebSocket (:data:`TICKET_PATHS`) also
takes a single-use ``?ticket=`` from ``POST /api/tickets`` (pbx.http.tickets),
since a browser cannot send it the header. A request that carries a body must say
``Content-Type: application/json``; anything else gets 415 before a handler
reads it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from pbx.errors import PbxError
from pbx.events import EventBus
from pbx.metrics import Metrics
from pbx.http.tickets import Tickets
from pbx.security import security_event

Health = Callable[[], Awaitable[bool]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS = web.AppKey("metrics", Metrics)
HEALTH: web.AppKey[Health] = web.AppKey("health")
TICKETS = web.AppKey("tickets", Tickets)

# The paths served without the token: /healthz, and those the API's operation table marks
# ``auth=False`` (pbx.http.api.add_api: the wallboard's files, which hold no data).
OPEN_PATHS: web.AppKey[frozenset[str]] = web.AppKey("open_paths")
TICKET_PATHS = frozenset({"/api/events"})
JSON_TYPE = "application/json"


def make_http_app(token: Callable[[], str], metrics: Metrics, health: Health, events: EventBus) -> web.Application:
    """The aiohttp application: ``token()`` is the bearer token in force."""
    tickets = Tickets()
    app = web.Application(middlewares=[_error_middleware, _token_middleware(token, tickets, events), _json_body_middleware])
    app[METRICS] = metrics
    app[TICKETS] = tickets
    app[OPEN_PATHS] = frozenset({"/healthz"})
    app[HEALTH] = health
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


def json_error(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers)


def bearer_matches(header: str, token: str) -> bool:
    """Whether an Authorization header carries ``token`` as a bearer token.

    The scheme is case-insensitive (RFC 7235 §2.1); the token is compared in
    constant time, as digests of equal length, so the time of a refusal tells
    nothing about how much of a guess was right, nor the token's length. An
    empty ``token`` matches nothing.
    """
    scheme, _, credentials = header.strip().partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    given = hashlib.sha256(credentials.strip().encode(errors="surrogateescape")).digest()  # undecodable bytes too
    return hmac.compare_digest(given, hashlib.sha256(token.encode()).digest())


def _token_middleware(token: Callable[[], str], tickets: Tickets, events: EventBus) -> Callable[..., Awaitable[web.StreamResponse]]:
    def allowed(request: web.Request) -> bool:
        if request.path in request.app[OPEN_PATHS] or bearer_matches(request.headers.get("Authorization", ""), token()):
            return True
        return request.path in TICKET_PATHS and tickets.redeem(request.query.get("ticket", ""))

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed(request):
            # Counted like a wrong SIP password: a token guesser shows up in the
            # same fail2ban line (RFC 6750 §3: the challenge names the scheme).
            security_event(events, "auth_failure", request.remote or "", service="http")
            challenge = {"WWW-Authenticate": 'Bearer realm="pbx"'}
            return json_error(401, "unauthorized", "a valid bearer token is required", challenge)
        return await handler(request)

    return check


@web.middleware
async def _json_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a body that is not JSON, whatever the route: a form or text/plain
    post is never read as JSON (routes that need a body check the type too, see
    pbx.http.requests.read_body)."""
    if request.body_exists and request.content_type != JSON_TYPE:
        return json_error(415, "unsupported-media-type", not_json(request))
    return await handler(request)


def not_json(request: web.Request) -> str:
    """The message of a 415: what the body was declared as."""
    return f"the body must be {JSON_TYPE}, not {request.headers.get('Content-Type') or 'undeclared'}"


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become answers: a PbxError with its status and
    JSON body, aiohttp's own (no such route, wrong method) as JSON too."""
    try:
        return await handler(request)
    except PbxError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        return json_error(exc.status, exc.reason.lower().replace(" ", "-"), exc.text or exc.reason)


async def _healthz(request: web.Request) -> web.Response:
    if await request.app[HEALTH]():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "failing"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
