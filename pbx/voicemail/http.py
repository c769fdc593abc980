"""``/api/voicemail/{box}``: a mailbox's messages, their audio, marking
them heard or new (which updates the phones' message-waiting lamps), and
deleting them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pbx.errors import NotFound
from pbx.http.openapi import (
    NO_CONTENT,
    PAGINATION,
    WAV_AUDIO,
    Operation,
    Reply,
    page_reply,
)
from pbx.http.requests import Query, audio_file, page, read_body
from pbx.http.schemas import ref
from pbx.http.services import SERVICES
from pbx.store.queries import message_page, message_row


def _mailbox(request: web.Request) -> str:
    box = request.match_info["box"]
    if not request.app[SERVICES].voicemail.exists(box):
        raise NotFound(f"there is no mailbox {box}", code="no-such-mailbox")
    return box


async def _message(request: web.Request) -> dict[str, Any]:
    box = _mailbox(request)
    message_id = request.match_info["id"]
    row = await message_row(request.app[SERVICES].store, box, message_id)
    if row is None:
        raise NotFound(f"mailbox {box} has no message {message_id}", code="no-such-message")
    return row


def _message_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "mailbox": row["mailbox"],
        "caller": row["caller"],
        "received": row["received"],
        "seconds": row["seconds"],
        "heard": bool(row["heard"]),
    }


async def list_messages(request: web.Request) -> web.Response:
    box = _mailbox(request)
    q = Query(request)
    limit, offset = q.page()
    q.check()
    rows, total = await message_page(request.app[SERVICES].store, box, limit=limit, offset=offset)
    return page([_message_json(row) for row in rows], total, limit, offset)


async def message_audio(request: web.Request) -> web.FileResponse:
    row = await _message(request)
    return await audio_file(request.app[SERVICES].config().storage.data_dir, row["path"], f"message {row['id']}")


async def change_message(request: web.Request) -> web.Response:
    row = await _message(request)
    body = await read_body(request, ref("VoicemailChange"))
    await request.app[SERVICES].voicemail.mark_heard(row, body["heard"])
    return web.json_response(_message_json({**row, "heard": body["heard"]}))


async def delete_message(request: web.Request) -> web.Response:
    row = await _message(request)
    await request.app[SERVICES].voicemail.delete(row)
    return web.Response(status=204)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/voicemail/{box}", "listMessages", "A mailbox's messages, newest first", list_messages,
        {200: page_reply("VoicemailMessage")}, "voicemail", parameters=PAGINATION,
    ),
    Operation(
        "GET", "/api/voicemail/{box}/{id}/audio", "messageAudio", "A message's audio", message_audio,
        {200: WAV_AUDIO}, "voicemail",
    ),
    Operation(
        "PATCH", "/api/voicemail/{box}/{id}", "changeMessage", "Mark a message heard or new", change_message,
        {200: Reply("the message", ref("VoicemailMessage"))}, "voicemail", body=ref("VoicemailChange"),
        description="Updates the mailbox's counts and the phones' message-waiting lamps.",
    ),
    Operation(
        "DELETE", "/api/voicemail/{box}/{id}", "deleteMessage", "Delete a message", delete_message,
        {204: NO_CONTENT}, "voicemail",
    ),
)  # fmt: skip
