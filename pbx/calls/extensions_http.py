"""``GET /api/extensions``: each extension's do-not-disturb and forwarding
as in effect now, pbx.yaml's and what its phone set together
(pbx.calls.forwarding)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pbx.http.openapi import PAGINATION, Operation, page_reply
from pbx.http.requests import paged
from pbx.http.services import SERVICES


async def list_extensions(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    forwarding = services.calls.forwarding
    items: list[dict[str, Any]] = []
    for number, ext in services.config().extensions.items():
        forward = forwarding.effective(number)
        items.append(
            {
                "number": number,
                "name": ext.name,
                "dnd": forwarding.dnd(number),
                "forward": {
                    key: str(destination) if destination is not None else None
                    for key, destination in (("always", forward.always), ("busy", forward.busy), ("no_answer", forward.no_answer))
                },
            }
        )
    return paged(request, items)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/extensions", "listExtensions", "Every extension: do-not-disturb and forwarding in effect", list_extensions,
        {200: page_reply("Extension")}, "extensions", parameters=PAGINATION,
    ),
)  # fmt: skip
