"""``/api/ivr``: the IVR flows, running and as their files validate now,
and the reload that swaps a valid pbx.yaml and flow set in."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from pbx.config.model import ConfigError
from pbx.errors import PbxError
from pbx.http.openapi import PAGINATION, Operation, Reply, page_reply
from pbx.http.requests import paged
from pbx.http.schemas import ref
from pbx.http.services import SERVICES
from pbx.ivr.flows import flow_files, load_flows


async def list_flows(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    cfg = services.config()
    # Validation reads files: off the event loop.
    (found, issues), files = await asyncio.gather(
        asyncio.to_thread(load_flows, cfg.ivr.dir, cfg, services.prompts().exists),
        asyncio.to_thread(flow_files, cfg.ivr.dir),
    )
    running = services.flows()
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
    return paged(request, items)


async def reload_flows(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    issues = await services.reload()
    if issues:
        message = f"{len(issues)} problem(s) found; the running configuration and flows stay"
        raise PbxError(message, code=ConfigError.code, status=ConfigError.status, errors=[str(issue) for issue in issues])
    return web.json_response({"status": "reloaded", "flows": sorted(services.flows())})


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/ivr", "listFlows", "IVR flows: running, and whether their files validate now", list_flows,
        {200: page_reply("Flow")}, "ivr", parameters=PAGINATION,
    ),
    Operation(
        "POST", "/api/ivr/reload", "reload", "Validate pbx.yaml and every flow, and swap them in", reload_flows,
        {200: Reply("reloaded", ref("Reloaded"))}, "ivr", errors=(422,),
        description="On any problem nothing changes: 422 with `errors`, each `FILE:LINE: message`.",
    ),
)  # fmt: skip
