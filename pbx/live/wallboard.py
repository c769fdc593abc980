"""``GET /wallboard``: the supervisors' live page, and its stylesheet and script.

The page is three static files shipped in the package (``static/``: HTML,
CSS, a little plain JavaScript; no build step, nothing from another host).
They hold no data, so they are served without the token (their operations
say ``auth=False``, which pbx.http.server's token check goes by). The script asks for the admin token, trades
it for a single-use ticket (``POST /api/tickets``) and follows the queues
over ``GET /api/events?types=wallboard,...`` (pbx.live.http); a TV handed
``/wallboard#ticket=...`` skips the form for its first connection.

Every answer forbids framing (clickjacking a supervisor's page) and, by its
Content-Security-Policy, any script, style or connection but the server's own:
the page renders what callers send (caller ids) as text only, and a
policy that refuses inline script keeps it so.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web

from pbx.http.openapi import Operation, Reply

PAGE_PATH = "/wallboard"
STYLE_PATH = "/wallboard.css"
SCRIPT_PATH = "/wallboard.js"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"  # the script sends the form: never the browser, token in the URL
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated: an upgraded server's page is picked up at the next load
}


@cache
def _asset(name: str) -> bytes:
    """One file of ``static/``, read once."""
    return files("pbx.live").joinpath("static", name).read_bytes()


def _serve(name: str, content_type: str) -> web.Response:
    return web.Response(body=_asset(name), content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS)


async def page(request: web.Request) -> web.Response:
    return _serve("wallboard.html", "text/html")


async def style(request: web.Request) -> web.Response:
    return _serve("wallboard.css", "text/css")


async def script(request: web.Request) -> web.Response:
    return _serve("wallboard.js", "text/javascript")


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", PAGE_PATH, "wallboard", "The live wallboard page (no token: it holds no data)", page,
        {200: Reply("the page", content={"text/html": {"type": "string"}})}, "events", auth=False,
        description="Asks for the admin token (kept in the tab's sessionStorage), trades it for a ticket "
        "(POST /api/tickets) and follows GET /api/events?types=wallboard,agent.state,queue.joined,queue.left. "
        "`/wallboard#ticket=TICKET` opens the first connection with that ticket, without the form.",
    ),
    Operation(
        "GET", STYLE_PATH, "wallboardStyle", "The wallboard's stylesheet", style,
        {200: Reply("CSS", content={"text/css": {"type": "string"}})}, "events", auth=False,
    ),
    Operation(
        "GET", SCRIPT_PATH, "wallboardScript", "The wallboard's script", script,
        {200: Reply("JavaScript", content={"text/javascript": {"type": "string"}})}, "events", auth=False,
    ),
)  # fmt: skip
