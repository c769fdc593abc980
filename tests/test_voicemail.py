"""End to end: callers leave messages on `pbx serve` (ended by #, by silence,
too short), the mailbox's phone is told by message-summary NOTIFY, and hears,
deletes and re-greets by phone with *97 and voicemail:main."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.audio import duration, tone_seconds
from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, free_port, start_server
from tests.support.smtp import start_smtp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
DEPOSIT = "8500"  # voicemail:1001
MAIN = "8600"  # voicemail:main
PIN = "4321"


async def voicemail_server(folder: Path, **overrides: Any) -> Server:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["voicemail"] = {"pin": PIN}
    extensions["1004"] = {
        "name": "User 1004",
        "password": "secret-1004",
        "voicemail": {"pin": None, "email": "vm1004@example.org"},
    }
    return await start_server(
        folder,
        sounds={"dir": str(SOUNDS)},
        extensions=extensions,
        inbound={DEPOSIT: "voicemail:1001", MAIN: "voicemail:main"},
        voicemail={"max_seconds": 20, "min_seconds": 1},
        **{"log_level": "INFO", **overrides},
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as started:
        yield started


def messages(server: Server, mailbox: str) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from voicemail where mailbox = ? order by received", [mailbox])]


async def dial(phone: Phone, number: str) -> int:
    """Call ``number`` and wait until the call has audio (DTMF needs it)."""
    call = await phone.call(f"sip:{number}@pbx.local")
    await phone.wait_event("call_state", call=call, state="confirmed")
    await phone.wait_event("media", call=call, active=True)
    return call


async def leave_message(server: Server, caller: Phone, number: str, *, tone: float, end: str) -> int:
    """Call ``number``, wait for the beep, send a 1 kHz tone for ``tone`` seconds,
    then end the message: "#", "silence" (stop the tone) or "hangup"."""
    mark = len(server.log)
    call = await dial(caller, number)
    await server.wait_log(r"voicemail for \d+ from \d+: recording", start=mark, timeout=15)
    await caller.play_tone(call, 1000)
    await asyncio.sleep(tone)  # the message's length, not synchronisation
    if end == "#":
        await caller.dtmf(call, "#")
    elif end == "silence":
        await caller.stop_tone(call)
    else:
        await caller.hangup(call)
    await caller.wait_event("call_state", call=call, state="disconnected", timeout=15)
    return mark


async def test_messages_end_by_pound_or_silence_short_ones_are_dropped_and_the_owner_hears_them_by_phone(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await voicemail_server(tmp_path / "pbx")
    owner, caller = phones["1001"], phones["1002"]
    try:
        await owner.register(server.sip, "1001", PASSWORDS["1001"], mwi=True)
        await caller.register(server.sip, "1002", PASSWORDS["1002"])
        await owner.wait_event("mwi", waiting=False)

        mark = await leave_message(server, caller, DEPOSIT, tone=3.0, end="#")
        await server.wait_log(r"voicemail \w+ for 1001 from 1002: [\d.]+ s, ended by #", start=mark)
        mark = await leave_message(server, caller, DEPOSIT, tone=2.0, end="silence")
        await server.wait_log(r"voicemail \w+ for 1001 from 1002: [\d.]+ s, ended by silence", start=mark)
        mark = await leave_message(server, caller, DEPOSIT, tone=0.3, end="#")
        await server.wait_log(r"voicemail for 1001 from 1002 dropped", start=mark)

        rows = messages(server, "1001")
        assert [r["caller"] for r in rows] == ["1002", "1002"]
        for row, expected in zip(rows, (3.0, 2.0), strict=True):
            wav = server.folder / row["path"]
            assert wav.name == f"{row['id']}.wav" and row["heard"] == 0
            assert abs(duration(wav) - expected) <= 0.5, (row, duration(wav))
            assert abs(row["seconds"] - duration(wav)) < 0.05
            assert tone_seconds(wav, 1000) >= expected - 0.5
        assert not list(server.folder.glob("voicemail/**/*.part"))
        notify = await owner.wait_event("mwi", waiting=True, new=2, old=0)
        assert notify["account"] == "sip:1001@pbx.local"
        assert await server.metric("pbx_voicemail_messages", mailbox="1001", folder="new") == 2

        # *97: PIN, the count, the first message (its audio), delete it.
        call = await dial(owner, "*97")
        await owner.record(call, tmp_path / "main.wav")
        mark = len(server.log)
        await owner.dtmf(call, f"{PIN}#")
        await server.wait_log(r"voicemail: mailbox 1001 signed in", start=mark)
        await owner.dtmf(call, "1")
        played = await server.wait_log(r"voicemail (\w+) of 1001 played", start=mark, timeout=20)
        await owner.wait_event("mwi", waiting=True, new=1, old=1)
        await owner.dtmf(call, "7")
        await server.wait_log(r"voicemail \w+ of 1001 deleted", start=mark)
        await owner.dtmf(call, "#")
        await owner.wait_event("call_state", call=call, state="disconnected", timeout=15)
        await owner.stop_record(call)

        # The count ("You have two new messages") came before the message: 3 s of its tone.
        assert tone_seconds(tmp_path / "main.wav", 1000) >= 2.5
        assert rows[0]["id"] in played
        assert [r["id"] for r in messages(server, "1001")] == [rows[1]["id"]]
        assert not (server.folder / rows[0]["path"]).exists()
        await owner.wait_event("mwi", waiting=True, new=1, old=0)
        assert await server.metric("pbx_voicemail_messages", mailbox="1001", folder="new") == 1
        assert await server.metric("pbx_voicemail_messages", mailbox="1001", folder="old") == 0
    finally:
        await server.stop()


async def test_an_extension_that_does_not_answer_or_is_not_registered_sends_callers_to_its_mailbox(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await voicemail_server(tmp_path / "pbx", sip={"ring_timeout": 2})
    callee, caller = phones["1001"], phones["1002"]
    try:
        await callee.register(server.sip, "1001", PASSWORDS["1001"])
        await caller.register(server.sip, "1002", PASSWORDS["1002"])
        # 1001 rings out, then takes the message.
        mark = await leave_message(server, caller, "1001", tone=1.5, end="hangup")
        await callee.wait_event("incoming")
        await server.wait_log(r"event=forwarded reason=no-answer destination=voicemail:1001\b", start=mark)
        await server.wait_log(r"voicemail \w+ for 1001 from 1002: [\d.]+ s, ended by hang-up", start=mark)
        # 1004 is not registered: straight to its mailbox.
        mark = await leave_message(server, caller, "1004", tone=1.5, end="hangup")
        await server.wait_log(r"event=forwarded reason=unavailable destination=voicemail:1004\b", start=mark)
        await server.wait_log(r"voicemail \w+ for 1004 from 1002: [\d.]+ s, ended by hang-up", start=mark)
        assert len(messages(server, "1001")) == len(messages(server, "1004")) == 1
        # 1003 (not registered either) has no mailbox: its caller just hears it is not there.
        call = await caller.call("sip:1003@pbx.local")
        state = await caller.wait_event("call_state", call=call, state="disconnected")
        assert state["code"] == 480
    finally:
        await server.stop()


async def test_voicemail_main_asks_mailbox_and_pin_and_a_recorded_greeting_replaces_the_default(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await voicemail_server(tmp_path / "pbx")
    caller = phones["1002"]
    try:
        await caller.register(server.sip, "1002", PASSWORDS["1002"])
        # Three wrong PINs: hung up, signed in nowhere.
        mark = len(server.log)
        call = await dial(caller, MAIN)
        for _ in range(3):
            await caller.dtmf(call, "1001#0000#")
            await server.wait_log(r"wrong PIN or mailbox for '1001'", start=mark)
            mark = len(server.log)
        await caller.wait_event("call_state", call=call, state="disconnected", timeout=20)
        assert "signed in" not in "".join(server.log)

        # Mailbox 1004 has no PIN: from outside it cannot be opened at all.
        mark = len(server.log)
        call = await dial(caller, MAIN)
        await caller.dtmf(call, "1004##")
        await server.wait_log(r"wrong PIN or mailbox for '1004'", start=mark)
        await caller.hangup(call)

        # The right mailbox and PIN; 5 records a greeting (a 600 Hz tone, ended by #).
        mark = len(server.log)
        call = await dial(caller, MAIN)
        await caller.dtmf(call, f"1001#{PIN}#")
        await server.wait_log(r"mailbox 1001 signed in", start=mark)
        await caller.dtmf(call, "5")
        await server.wait_log(r"mailbox 1001 is recording its greeting", start=mark, timeout=20)
        await caller.play_tone(call, 600)
        await asyncio.sleep(2)  # the greeting's length
        await caller.dtmf(call, "#")
        await server.wait_log(r"mailbox 1001 recorded a greeting of [\d.]+ s", start=mark)
        await caller.hangup(call)
        greeting = server.folder / "voicemail" / "1001" / "greeting.wav"
        assert abs(duration(greeting) - 2.0) <= 0.5

        # The next caller hears that greeting instead of the default one.
        call = await dial(caller, DEPOSIT)
        await caller.record(call, tmp_path / "greeting-heard.wav")
        mark = len(server.log)
        await server.wait_log(r"voicemail for 1001 from 1002: recording", start=mark)
        await caller.stop_record(call)
        await caller.hangup(call)
        assert tone_seconds(tmp_path / "greeting-heard.wav", 600) >= 1.5
    finally:
        await server.stop()


async def test_a_message_is_mailed_with_its_wav_and_kept_pending_while_the_mail_server_is_down(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    smtp = start_smtp()
    mail = next(smtp)
    try:
        for port, wanted in ((mail.port, "sent"), (free_port(socket.SOCK_STREAM), "pending")):
            smtp_config = {"host": f"127.0.0.1:{port}", "from": "pbx@example.org", "starttls": False}
            server = await voicemail_server(tmp_path / wanted, smtp=smtp_config)
            try:
                await phones["1002"].register(server.sip, "1002", PASSWORDS["1002"])
                mark = await leave_message(server, phones["1002"], "1004", tone=2.0, end="#")
                if wanted == "sent":
                    await server.wait_log(r"voicemail \w+ mailed to vm1004@example.org", start=mark)
                else:
                    await server.wait_log(r"voicemail \w+: mail to vm1004@example.org failed, will retry", start=mark)
                [row] = messages(server, "1004")
                assert row["email"] == wanted
                assert (server.folder / row["path"]).is_file()  # the message stays whatever the mail did
                if wanted == "sent":
                    wav = (server.folder / row["path"]).read_bytes()
            finally:
                await server.stop()
        message = mail.mailbox.only_message()
        assert message["To"] == "vm1004@example.org" and "1002" in message["Subject"]
        [attachment] = list(message.iter_attachments())
        assert attachment.get_content_type() == "audio/wav"
        assert attachment.get_content() == wav
    finally:
        smtp.close()
