"""``GET /api/registrations``: the contacts the registrar holds, and
whether each answers its OPTIONS (pbx.sip.qualify)."""

from __future__ import annotations

import time

from aiohttp import web

from pbx.http.openapi import PAGINATION, Operation, page_reply
from pbx.http.requests import paged
from pbx.http.services import SERVICES
from pbx.store.db import iso_time


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
            "reachable": b.reachable,
            "rtt_ms": b.rtt_ms,
        }
        for b in request.app[SERVICES].registrar.all_bindings()
    ]
    items.sort(key=lambda item: (item["extension"], item["contact"]))
    return paged(request, items)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/registrations", "listRegistrations", "Registered contacts", list_registrations,
        {200: page_reply("Registration")}, "registrations", parameters=PAGINATION,
    ),
)  # fmt: skip
