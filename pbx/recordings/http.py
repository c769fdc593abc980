"""``/api/recordings``: call recordings, newest first, their audio, and
deleting them (the file first, then the row)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pbx.errors import NotFound, RecordingError
from pbx.http.openapi import (
    NO_CONTENT,
    PAGINATION,
    TIME_RANGE,
    WAV_AUDIO,
    Operation,
    page_reply,
    query,
)
from pbx.http.requests import Query, audio_file, page
from pbx.http.services import SERVICES
from pbx.store.queries import recording_page, recording_row

_FIELDS = ("id", "call_id", "queue", "agent", "caller", "callee", "started", "seconds", "channels", "bytes")


async def list_recordings(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    timezone = services.config().timezone
    q = Query(request)
    start, end = q.instant("from", timezone), q.instant("to", timezone)
    queue, extension = q.text("queue"), q.text("extension")
    limit, offset = q.page()
    q.check()
    rows, total = await recording_page(
        services.store, start=start, end=end, queue=queue, extension=extension, limit=limit, offset=offset
    )
    return page([{name: row[name] for name in _FIELDS} for row in rows], total, limit, offset)


async def _recording(request: web.Request) -> dict[str, Any]:
    recording_id = request.match_info["id"]
    row = await recording_row(request.app[SERVICES].store, recording_id)
    if row is None:
        raise NotFound(f"there is no recording {recording_id}", code="no-such-recording")
    return row


async def recording_audio(request: web.Request) -> web.FileResponse:
    row = await _recording(request)
    return await audio_file(request.app[SERVICES].config().storage.data_dir, row["path"], f"recording {row['id']}")


async def delete_recording(request: web.Request) -> web.Response:
    row = await _recording(request)
    if not await request.app[SERVICES].recorder.delete(row):
        message = f"the file of recording {row['id']} could not be deleted; it stays listed"
        raise RecordingError(message, code="file-not-deleted")
    return web.Response(status=204)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/recordings", "listRecordings", "Call recordings, newest first", list_recordings,
        {200: page_reply("Recording")}, "recordings",
        parameters=(
            *TIME_RANGE,
            query("queue", {"type": "string"}, "only this queue's"),
            query("extension", {"type": "string"}, "only those with this extension as agent, caller or callee"),
            *PAGINATION,
        ),
    ),
    Operation(
        "GET", "/api/recordings/{id}/audio", "recordingAudio", "A recording's audio", recording_audio,
        {200: WAV_AUDIO}, "recordings",
    ),
    Operation(
        "DELETE", "/api/recordings/{id}", "deleteRecording", "Delete a recording: its file, then its row",
        delete_recording, {204: NO_CONTENT}, "recordings", errors=(409,),
        description="409 when the file cannot be deleted; the recording stays listed.",
    ),
)  # fmt: skip
