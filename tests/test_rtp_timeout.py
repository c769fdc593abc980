"""Calls never hang: a leg that sends no RTP for rtp.timeout seconds ends its
call (rtp.hold_timeout while on hold), and no call outlives
sip.max_call_seconds. The caller is a bare-socket phone through a trunk
network, so the test decides exactly what it sends: nothing (a phone that
vanished), RTP every 100 ms, or a hold."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiosipua import SipRequest

from tests.support.audio import write_tone
from tests.support.raw_sip import Dialog, RawCaller, open_caller
from tests.support.server import Server, start_server

PROVIDER = "127.0.0.6"  # the trunk's network: its INVITEs need no password
NUMBER = "8000"
TIMEOUT = 2  # rtp.timeout for these tests
MAIN = """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 30, retries: 0, on_fail: hangup}
"""


async def timeout_server(tmp_path: Path, **overrides: Any) -> Server:
    folder = tmp_path / "pbx"
    sounds, flows = folder / "sounds", folder / "ivr_flows"
    sounds.mkdir(parents=True)
    flows.mkdir()
    write_tone(sounds / "tone.wav", 600, 1.0)
    (flows / "main.yaml").write_text(MAIN)
    return await start_server(
        folder,
        ivr={"dir": str(flows)},
        sounds={"dir": str(sounds)},
        inbound={NUMBER: "ivr:main"},
        trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{PROVIDER}/32"]}},
        **overrides,
    )


class Call:
    """An answered IVR call from the bare-socket caller, with its RTP socket."""

    def __init__(self, caller: RawCaller, dialog: Dialog, rtp: socket.socket, server_rtp: tuple[str, int], tag: str) -> None:
        self.caller, self.dialog, self.rtp, self.server_rtp, self.tag = caller, dialog, rtp, server_rtp, tag
        self.seq = 0

    def send_rtp(self) -> None:
        self.seq += 1
        header = struct.pack("!BBHII", 0x80, 0, self.seq, self.seq * 160, 0x1234)
        self.rtp.sendto(header + b"\xff" * 160, self.server_rtp)

    async def hung_up(self, within: float) -> bool:
        """Whether the server sends BYE within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message, _ = await self.caller.inbox.get()
                    if isinstance(message, SipRequest) and message.method == "BYE":
                        return True
        except TimeoutError:
            return False


@asynccontextmanager
async def answered_call(server: Server) -> AsyncIterator[Call]:
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((PROVIDER, 0))
    caller = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    try:
        call_id, tag = f"{uuid.uuid4().hex}@timeout", uuid.uuid4().hex[:8]
        caller.invite(NUMBER, call_id=call_id, caller="+15550001", from_tag=tag, media_port=rtp.getsockname()[1])
        answer = await caller.final(call_id, tag)
        assert answer.status_code == 200
        port = next(int(line.split()[1]) for line in answer.text.splitlines() if line.startswith("m=audio"))
        yield Call(caller, caller.ack(answer, NUMBER), rtp, ("127.0.0.1", port), tag)
    finally:
        caller.close()
        rtp.close()


async def cdr_row(server: Server) -> dict[str, Any]:
    for _ in range(50):  # the row is stored right after the call ends
        status, body = await server.http("/api/cdr")
        assert status == 200
        rows = json.loads(body)["items"]
        if rows:
            (row,) = rows
            return dict(row)
        await asyncio.sleep(0.1)
    raise AssertionError("no CDR row")


async def test_a_phone_that_sends_no_rtp_is_hung_up_after_rtp_timeout(tmp_path: Path) -> None:
    server = await timeout_server(tmp_path, rtp={"timeout": TIMEOUT})
    try:
        async with answered_call(server) as call:
            assert not await call.hung_up(within=TIMEOUT - 0.5)  # not before its time
            assert await call.hung_up(within=3)
        row = await cdr_row(server)
        assert (row["disposition"], row["hangup"], row["reason"]) == ("answered", "pbx", "rtp-timeout")
        await server.wait_log(r"event=ended .*hangup=pbx reason=rtp-timeout")
    finally:
        await server.stop()


async def test_a_phone_that_keeps_sending_stays_up_and_then_hangs_up_itself(tmp_path: Path) -> None:
    server = await timeout_server(tmp_path, rtp={"timeout": TIMEOUT})
    try:
        async with answered_call(server) as call:
            for _ in range(20):  # twice rtp.timeout, a packet every 100 ms
                call.send_rtp()
                assert not await call.hung_up(within=0.1)
            call.caller.bye(call.dialog, NUMBER)
        row = await cdr_row(server)
        assert (row["hangup"], row["reason"]) == ("caller", None)
    finally:
        await server.stop()


async def test_on_hold_silence_waits_for_hold_timeout_and_resuming_brings_rtp_timeout_back(tmp_path: Path) -> None:
    server = await timeout_server(tmp_path, rtp={"timeout": TIMEOUT, "hold_timeout": 60})
    try:
        async with answered_call(server) as call:
            media_port = call.rtp.getsockname()[1]
            held = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=media_port, direction="sendonly")
            assert held.status_code == 200
            assert not await call.hung_up(within=2 * TIMEOUT)  # silent, but on hold
            resumed = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=media_port, direction="sendrecv")
            assert resumed.status_code == 200
            assert await call.hung_up(within=TIMEOUT + 2)
        assert (await cdr_row(server))["reason"] == "rtp-timeout"
    finally:
        await server.stop()


async def test_no_call_outlives_max_call_seconds(tmp_path: Path) -> None:
    server = await timeout_server(tmp_path, sip={"max_call_seconds": 2}, rtp={"timeout": 60})
    try:
        async with answered_call(server) as call:
            for _ in range(10):  # a live phone: RTP every 100 ms until the cap
                call.send_rtp()
                if await call.hung_up(within=0.1):
                    break
            else:
                assert await call.hung_up(within=2)
        row = await cdr_row(server)
        assert (row["hangup"], row["reason"]) == ("pbx", "max-call-seconds")
    finally:
        await server.stop()
