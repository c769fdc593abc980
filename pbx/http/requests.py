"""What the admin API's handlers share: reading a request's query and JSON
body, each refused with every problem at once (a BadRequest the error
middleware renders), and answering one page of a list or a stored audio file.

Lists answer ``{"items", "total", "limit", "offset"}``: ``?limit=`` (default
100, at most 1000) and ``?offset=`` choose the page.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from pbx.errors import BadRequest, NotFound, PbxError
from pbx.http.openapi import (
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    PAGE_OFFSET_MAX,
    validate_body,
)
from pbx.http.schemas import Schema
from pbx.http.server import JSON_TYPE, not_json


class Query:
    """Query parameters, with every problem collected for one 422 ``invalid-query``."""

    def __init__(self, request: web.Request) -> None:
        self.values = request.query
        self.problems: dict[str, str] = {}

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        text = self.values.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            self.problems[name] = f"must be an integer from {low} to {high}"
            return default
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.values.get(name, default)
        if value not in choices:
            self.problems[name] = f"must be one of {', '.join(choices)}"
            return default
        return value

    def text(self, name: str) -> str | None:
        return self.values.get(name)

    def instant(self, name: str, timezone: str) -> str | None:
        """An ISO-8601 date or date-time as the stored times are written (UTC, milliseconds)."""
        text = self.values.get(name)
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
            if value.tzinfo is None:
                value = value.replace(tzinfo=ZoneInfo(timezone))
            return value.astimezone(UTC).isoformat(timespec="milliseconds")
        except (ValueError, OverflowError):
            self.problems[name] = "must be an ISO-8601 date or date-time, e.g. 2026-03-01 or 2026-03-01T09:30:00+01:00"
            return None

    def page(self) -> tuple[int, int]:
        """``?limit=`` and ``?offset=``."""
        return self.integer("limit", PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX), self.integer("offset", 0, 0, PAGE_OFFSET_MAX)

    def check(self) -> None:
        """BadRequest (422 ``invalid-query``) naming every parameter read so far that was wrong."""
        if self.problems:
            raise BadRequest("invalid query parameters", code="invalid-query", status=422, fields=self.problems)


async def read_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The JSON body, valid by ``schema``: BadRequest 415 when it is not
    declared application/json, 400 when it is no JSON, 422 with field errors."""
    if request.content_type != JSON_TYPE:
        raise BadRequest(not_json(request), code="unsupported-media-type", status=415)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be JSON", code="invalid-json") from None
    problems = validate_body(schema, body)
    if problems:
        raise invalid_body(problems)
    assert isinstance(body, dict)
    return body


def invalid_body(problems: dict[str, str]) -> BadRequest:
    """The 422 ``invalid-body`` naming what is wrong with each field."""
    return BadRequest("the body has invalid fields", code="invalid-body", status=422, fields=problems)


def about_field(error: PbxError, field: str) -> PbxError:
    """``error``, answered as it is (status and code) but naming the body field it refuses."""
    return PbxError(error.message, code=error.code, status=error.status, fields={field: error.message})


def page(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> web.Response:
    return web.json_response({"items": items, "total": total, "limit": limit, "offset": offset})


def paged(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """One page of a list held in memory."""
    query = Query(request)
    limit, offset = query.page()
    query.check()
    return page(items[offset : offset + limit], len(items), limit, offset)


async def audio_file(data_dir: Path, relative: str | None, what: str) -> web.FileResponse:
    """A stored WAV file (a path relative to ``data_dir`` that stays inside
    it); NotFound (``no-audio``) when there is none."""
    path = PurePosixPath(relative or "")
    if not path.parts or path.is_absolute() or ".." in path.parts:
        raise NotFound(f"{what} has no audio file", code="no-audio")
    full = data_dir / path
    if not await asyncio.to_thread(full.is_file):
        raise NotFound(f"the audio file of {what} is gone", code="no-audio")
    return web.FileResponse(full, headers={"Content-Type": "audio/wav"})
