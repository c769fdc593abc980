"""A crash between a file's rename and its row loses nothing: complete WAVs
that no row points at, as a SIGKILL in that window leaves them, are indexed
when `pbx serve` starts, listed and served by the API like any other, and
only once. A mailbox's greeting is no message, and a file under a final name
that is no WAV is left alone, unlisted."""

from __future__ import annotations

import os
import sqlite3
import time
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from pbx.store.db import Store, iso_time
from tests.support.server import PASSWORDS, Server, restart_server, start_server

CALL = "0123456789abcdef"  # a call with a cdr row, recorded twice (the second file is <call>-2)
LONE = "fedcba9876543210"  # a recording whose call has no row
MESSAGE = "a1b2c3d4e5f60718"
MAILBOX = "1001"


def write_wav(path: Path, seconds: float, freqs: list[float], modified: int) -> bytes:
    """A 16-bit 8 kHz WAV of one tone per channel, last written at ``modified``; its bytes."""
    t = np.arange(int(seconds * 8000)) / 8000
    channels = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(freqs))
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes((channels * 32767).astype("<i2").tobytes())
    os.utime(path, (modified, modified))
    return path.read_bytes()


async def get(server: Server, path: str) -> Any:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.http_port}{path}"
        async with http.get(url, headers={"Authorization": "Bearer test-token"}) as reply:
            assert reply.status == 200, (path, reply.status, await reply.text())
            return await reply.json() if reply.content_type == "application/json" else await reply.read()


async def test_complete_files_without_rows_are_indexed_once_at_start(tmp_path: Path) -> None:
    ended = int(time.time()) - 86400  # yesterday: well inside recording retention
    day = time.strftime("%Y/%m/%d", time.gmtime(ended))
    call_started = iso_time(ended - 60)
    store = Store(tmp_path / "pbx.db")
    await store.open()
    await store.insert(
        "cdr",
        {"call_id": CALL, "direction": "inbound", "from_number": "+15550001", "to_number": "7000",
         "started": call_started, "answered": iso_time(ended - 30), "ended": iso_time(ended),
         "disposition": "answered", "duration": 60.0, "billsec": 30.0, "queue": "support", "agent": "1002"},
    )  # fmt: skip
    await store.close()
    recordings = tmp_path / "recordings" / day
    audio = {
        CALL: write_wav(recordings / f"{CALL}.wav", 2.0, [440, 1000], ended - 20),
        f"{CALL}-2": write_wav(recordings / f"{CALL}-2.wav", 1.5, [700, 1300], ended),
        LONE: write_wav(recordings / f"{LONE}.wav", 3.0, [500], ended),
    }
    message = write_wav(tmp_path / "voicemail" / MAILBOX / f"{MESSAGE}.wav", 2.5, [600], ended)
    greeting = write_wav(tmp_path / "voicemail" / MAILBOX / "greeting.wav", 1.0, [900], ended)
    broken = recordings / "broken.wav"
    broken.write_bytes(b"RIFF")  # no WAV: not from a crash, not ours to remove

    extensions: dict[str, dict[str, Any]] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions[MAILBOX]["voicemail"] = {"pin": "4321"}
    server = await start_server(tmp_path, extensions=extensions, log_level="INFO")
    try:
        assert any("indexed 3 recordings files that an earlier run left without a row" in line for line in server.log), server.log
        assert any("indexed 1 voicemail files that an earlier run left without a row" in line for line in server.log), server.log
        assert any("broken.wav has no row and is not a complete WAV" in line for line in server.log), server.log

        listed = await get(server, "/api/recordings")
        rows = {row["id"]: row for row in listed["items"]}
        assert listed["total"] == 3 and set(rows) == set(audio), listed
        from_cdr = {"call_id": CALL, "queue": "support", "agent": "1002", "caller": "+15550001", "callee": "7000", "started": call_started}
        assert rows[CALL] == {"id": CALL, **from_cdr, "seconds": 2.0, "channels": 2, "bytes": len(audio[CALL])}
        assert rows[f"{CALL}-2"] == {"id": f"{CALL}-2", **from_cdr, "seconds": 1.5, "channels": 2, "bytes": len(audio[f"{CALL}-2"])}
        assert rows[LONE] == {
            "id": LONE, "call_id": LONE, "queue": None, "agent": None, "caller": None, "callee": None,
            "started": iso_time(ended - 3), "seconds": 3.0, "channels": 1, "bytes": len(audio[LONE]),
        }  # fmt: skip
        for recording_id, data in audio.items():
            assert await get(server, f"/api/recordings/{recording_id}/audio") == data

        messages = await get(server, f"/api/voicemail/{MAILBOX}")
        assert messages["items"] == [
            {"id": MESSAGE, "mailbox": MAILBOX, "caller": "unknown", "received": iso_time(ended), "seconds": 2.5, "heard": False}
        ]
        assert await get(server, f"/api/voicemail/{MAILBOX}/{MESSAGE}/audio") == message
        assert await server.metric("pbx_voicemail_messages", mailbox=MAILBOX, folder="new") == 1
    finally:
        await server.stop()

    server = await restart_server(server, log_level="INFO")
    try:
        assert not any("indexed" in line for line in server.log), server.log
        assert (await get(server, "/api/recordings"))["total"] == 3
        assert (await get(server, f"/api/voicemail/{MAILBOX}"))["total"] == 1
    finally:
        await server.stop()

    with sqlite3.connect(tmp_path / "pbx.db") as db:
        assert db.execute("select email from voicemail").fetchall() == [("",)]  # not mailed
        assert db.execute("select count(*) from recordings").fetchone() == (3,)
    assert (tmp_path / "voicemail" / MAILBOX / "greeting.wav").read_bytes() == greeting
    assert broken.read_bytes() == b"RIFF"
