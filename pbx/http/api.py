"""The admin HTTP API of CONTRACT §4: the one table of its routes, gathered
from each feature's ``http`` module (calls and click-to-call, registrations,
queues and callbacks, voicemail, recordings, CDR, IVR flows).

:data:`OPERATIONS` is that table: :func:`add_api` registers its handlers and
``GET /api/openapi.json`` serves the document built from it
(pbx.http.openapi), whose request body schemas are also what the handlers
validate against. Handlers reach the services through
pbx.http.services.AdminServices and refuse with a pbx.errors.PbxError, which
the error middleware of pbx.http.server renders.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pbx import __version__
from pbx.calls import cdr_http, extensions_http
from pbx.calls import http as calls_http
from pbx.http.openapi import Operation, Reply, document
from pbx.http.schemas import ref
from pbx.http.server import OPEN_PATHS
from pbx.http.services import SERVICES, AdminServices
from pbx.ivr import http as ivr_http
from pbx.live import http as live_http
from pbx.live import wallboard
from pbx.queues import http as queues_http
from pbx.queues import survey_http
from pbx.recordings import http as recordings_http
from pbx.sip import http as sip_http
from pbx.voicemail import http as voicemail_http

DOCUMENT: web.AppKey[dict[str, Any]] = web.AppKey("openapi")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


# /healthz and /metrics are served by pbx.http.server: listed for the document only.
_OPERATIONS: tuple[Operation, ...] = (
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
)  # fmt: skip

OPERATIONS: tuple[Operation, ...] = (
    *_OPERATIONS,
    *calls_http.OPERATIONS,
    *sip_http.OPERATIONS,
    *extensions_http.OPERATIONS,
    *queues_http.OPERATIONS,
    *survey_http.OPERATIONS,
    *voicemail_http.OPERATIONS,
    *recordings_http.OPERATIONS,
    *cdr_http.OPERATIONS,
    *ivr_http.OPERATIONS,
    *live_http.OPERATIONS,
    *wallboard.OPERATIONS,
)


def add_api(app: web.Application, services: AdminServices) -> None:
    """Serve the admin API over ``services`` on ``app`` (made by make_http_app)."""
    app[SERVICES] = services
    app[DOCUMENT] = document(OPERATIONS, __version__)
    app[OPEN_PATHS] = frozenset(op.path for op in OPERATIONS if not op.auth)  # as the document says: no token
    live_http.serve_sockets(app)
    for op in OPERATIONS:
        if op.handler is not None:
            app.router.add_route(op.method, op.path, op.handler)
