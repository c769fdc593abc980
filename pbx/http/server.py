"""The HTTP side: /healthz and /metrics now, the admin API of CONTRACT §4 later.

Every route but /healthz needs ``Authorization: Bearer <http.token>``; with an
empty token (allowed on loopback only) the token check is off.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from pbx.metrics import Metrics

Health = Callable[[], Awaitable[bool]]
METRICS = web.AppKey("metrics", Metrics)
HEALTH: web.AppKey[Health] = web.AppKey("health")

OPEN_PATHS = frozenset({"/healthz"})


def make_http_app(token: str, metrics: Metrics, health: Health) -> web.Application:
    app = web.Application(middlewares=[_error_middleware, _token_middleware(token)])
    app[METRICS] = metrics
    app[HEALTH] = health
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


def json_error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


def _token_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return json_error(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    return check


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason.lower().replace(" ", "-"), exc.text or exc.reason)


async def _healthz(request: web.Request) -> web.Response:
    if await request.app[HEALTH]():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "failing"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
