"""Voicemail as work: the messages of a queue's mailbox are offered to its
agents like callbacks; the agent hears the message, then the server calls
its caller back (end to end with `pbx serve` and pjsua2 phones), and a
message not handled in time is overdue in the queue's figures and metrics."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pbx.config.load import load_config
from pbx.config.model import ConfigError
from tests.support.audio import tone_seconds
from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import Server, queue_settings, restart_server, start_server

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
EXTENSIONS = {"1001": "secret-1001", "1002": "secret-1002", "1005": "secret-1005"}
MAILBOX = "1005"  # support's mailbox
DEPOSIT = "8505"  # voicemail:1005
MESSAGE_TONE = 600  # Hz: what the caller says, told apart from the prompts and the ringback


async def work_server(folder: Path, **mailbox: Any) -> Server:
    """Queue `support` with agent 1001; mailbox 1005 is its work (``mailbox`` on top)."""
    extensions: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in EXTENSIONS.items()}
    extensions[MAILBOX]["voicemail"] = {"queue": "support", **mailbox}
    return await start_server(
        folder,
        sip={"ring_timeout": 20},
        sounds={"dir": str(SOUNDS)},
        extensions=extensions,
        inbound={DEPOSIT: f"voicemail:{MAILBOX}"},
        voicemail={"max_seconds": 20, "min_seconds": 1},
        queues={"support": queue_settings(["1001"], callback={"enabled": False, "retries": 1, "retry_interval": 10})},
        log_level="INFO",
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(EXTENSIONS) as started:
        yield started


async def leave_message(server: Server, caller: Phone, seconds: float) -> str:
    """Call the queue's mailbox, say ``seconds`` of a tone after the beep, press #; the message's id."""
    mark = len(server.log)
    call = await caller.call(f"sip:{DEPOSIT}@pbx.local")
    await caller.wait_event("call_state", call=call, state="confirmed")
    await caller.wait_event("media", call=call, active=True)
    await server.wait_log(rf"voicemail for {MAILBOX} from \d+: recording", start=mark, timeout=15)
    await caller.play_tone(call, MESSAGE_TONE)
    await asyncio.sleep(seconds)  # the message's length, not synchronisation
    await caller.dtmf(call, "#")
    await caller.wait_event("call_state", call=call, state="disconnected", timeout=15)
    line = await server.wait_log(rf"voicemail (\w+) of {MAILBOX} is work for queue support", start=mark)
    return line.split("voicemail ", 1)[1].split()[0]


async def queue(server: Server) -> dict[str, Any]:
    status, body = await server.http("/api/queues/support")
    assert status == 200, body
    return dict(json.loads(body))


async def until_queue(server: Server, key: str, value: int, timeout: float = 15.0) -> dict[str, Any]:
    """The queue's JSON once its ``key`` is ``value``, polled until ``timeout``."""
    async with asyncio.timeout(timeout):
        while (shown := await queue(server))[key] != value:
            await asyncio.sleep(0.2)
    return shown


def message_row(server: Server, message_id: str) -> dict[str, Any]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("select * from voicemail where id = ?", [message_id]).fetchone())


async def test_an_agent_hears_the_message_then_its_caller_is_called_back_even_after_a_restart(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    agent, caller = phones["1001"], phones["1002"]
    server = await work_server(tmp_path / "pbx", respond_within="4h")
    try:
        await caller.register(server.sip, "1002", EXTENSIONS["1002"])
        message = await leave_message(server, caller, 3.0)
        shown = await until_queue(server, "voicemail_pending", 1)
        assert shown["voicemail_overdue"] == 0
        assert [c["caller"] for c in shown["callers"]] == ["1002"]
    finally:
        await server.stop()

    server = await restart_server(server, log_level="INFO")
    try:
        await server.wait_log("1 pending voicemail callbacks restored")  # and the caller's registration
        await agent.register(server.sip, "1001", EXTENSIONS["1001"])

        # The agent is offered the message, showing its caller, and hears it.
        incoming = await agent.wait_event("incoming", timeout=15)
        assert "sip:1002@" in incoming["from"]
        await agent.answer(incoming["call"])
        agent_call = incoming["call"]
        await agent.wait_event("call_state", call=agent_call, state="confirmed")
        await agent.record(agent_call, tmp_path / "agent.wav")

        # Then the caller's phone rings, showing the agent, and they talk.
        ring = await caller.wait_event("incoming", timeout=20)
        await agent.stop_record(agent_call)
        assert "sip:1001@" in ring["from"]
        heard = tone_seconds(tmp_path / "agent.wav", MESSAGE_TONE)
        assert heard >= 2.5, f"the agent heard {heard} s of the 3 s message"
        await caller.answer(ring["call"])
        await caller.wait_event("call_state", call=ring["call"], state="confirmed")
        heard_by_agent, heard_by_caller = await exchange_tones(tmp_path, agent, agent_call, caller, ring["call"])
        assert abs(heard_by_agent - 1000) < 30 and abs(heard_by_caller - 440) < 30

        await agent.hangup(agent_call)
        await caller.wait_event("call_state", call=ring["call"], state="disconnected")
        await server.wait_log(rf"voicemail {message} of {MAILBOX} handled: 1002 was called back")
        row = message_row(server, message)
        assert row["handled"] and row["heard"] == 1
        shown = await until_queue(server, "voicemail_pending", 0)
        assert shown["stats"]["callbacks"]["completed"] == 1
        assert await server.metric("pbx_callbacks_total", queue="support", outcome="dialed") == 1
        assert await server.metric("pbx_callbacks_total", queue="support", outcome="completed") == 1
    finally:
        await server.stop()


async def test_a_message_not_handled_within_respond_within_is_overdue(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await work_server(tmp_path / "pbx", respond_within=2)  # and no agent registered to take it
    try:
        await phones["1002"].register(server.sip, "1002", EXTENSIONS["1002"])
        assert await server.metric("pbx_voicemail_overdue", mailbox=MAILBOX) == 0
        await leave_message(server, phones["1002"], 1.5)
        shown = await until_queue(server, "voicemail_overdue", 1)
        assert shown["voicemail_pending"] == 1
        assert await server.metric("pbx_voicemail_overdue", mailbox=MAILBOX) == 1
        assert await server.metric("pbx_callbacks_pending", queue="support") == 1
    finally:
        await server.stop()


MAILBOX_CONFIG = """\
extensions:
  "1001": {name: Alice, password: secret-1001}
  "1005":
    name: Support
    password: secret-1005
    voicemail: {queue: %s, respond_within: %s}
queues:
  support: {agents: ["1001"]}
"""


@pytest.mark.parametrize(("written", "seconds"), [("30m", 1800), ("4h", 14400), ("1d", 86400), ("90", 90), ("45s", 45)])
def test_respond_within_takes_a_duration_with_its_unit(tmp_path: Path, written: str, seconds: int) -> None:
    (tmp_path / "pbx.yaml").write_text(MAILBOX_CONFIG % ("support", written))
    box = load_config(tmp_path / "pbx.yaml", env={}).mailbox("1005")
    assert box is not None and (box.queue, box.respond_within) == ("support", seconds)


@pytest.mark.parametrize(
    ("queue", "within", "error"),
    [
        ("nosuch", "4h", ":6: extensions.1005.voicemail.queue: there is no queue 'nosuch'"),
        ("support", "4 hours", ":6: extensions.1005.voicemail.respond_within must be a duration like 30m, 4h, 1d"),
        ("support", "0", ":6: extensions.1005.voicemail.respond_within must be between 1 and"),
        ("null", "4h", ":6: extensions.1005.voicemail.respond_within needs a queue to respond"),
    ],
)
def test_a_bad_queue_or_respond_within_is_refused_at_its_line(tmp_path: Path, queue: str, within: str, error: str) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(MAILBOX_CONFIG % (queue, within))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert [str(issue).startswith(f"{path}{error}") for issue in caught.value.issues] == [True], caught.value.issues
