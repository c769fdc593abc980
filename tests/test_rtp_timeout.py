"""Calls never hang: a leg that sends no RTP for rtp.timeout seconds ends its
call (rtp.hold_timeout while on hold), and no call outlives
sip.max_call_seconds. The caller is a bare-socket phone through a trunk
network, so the test decides exactly what it sends: nothing (a phone that
vanished), RTP every 100 ms, or a hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bare_phone import NUMBER, answered_call, ivr_server

TIMEOUT = 2  # rtp.timeout for these tests


async def test_a_phone_that_sends_no_rtp_is_hung_up_after_rtp_timeout(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, rtp={"timeout": TIMEOUT})
    try:
        async with answered_call(server) as call:
            assert not await call.hung_up(within=TIMEOUT - 0.5)  # not before its time
            assert await call.hung_up(within=3)
        row = await server.cdr_row()
        assert (row["disposition"], row["hangup"], row["reason"]) == ("answered", "pbx", "rtp-timeout")
        await server.wait_log(r"event=ended .*hangup=pbx reason=rtp-timeout")
    finally:
        await server.stop()


async def test_a_phone_that_keeps_sending_stays_up_and_then_hangs_up_itself(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, rtp={"timeout": TIMEOUT})
    try:
        async with answered_call(server) as call:
            for _ in range(20):  # twice rtp.timeout, a packet every 100 ms
                call.send_rtp()
                assert not await call.hung_up(within=0.1)
            call.caller.bye(call.dialog, NUMBER)
        row = await server.cdr_row()
        assert (row["hangup"], row["reason"]) == ("caller", None)
    finally:
        await server.stop()


async def test_on_hold_silence_waits_for_hold_timeout_and_resuming_brings_rtp_timeout_back(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, rtp={"timeout": TIMEOUT, "hold_timeout": 60})
    try:
        async with answered_call(server) as call:
            media_port = call.rtp.getsockname()[1]
            held = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=media_port, direction="sendonly")
            assert held.status_code == 200
            assert not await call.hung_up(within=2 * TIMEOUT)  # silent, but on hold
            resumed = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=media_port, direction="sendrecv")
            assert resumed.status_code == 200
            assert await call.hung_up(within=TIMEOUT + 2)
        assert (await server.cdr_row())["reason"] == "rtp-timeout"
    finally:
        await server.stop()


async def test_no_call_outlives_max_call_seconds(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, sip={"max_call_seconds": 2}, rtp={"timeout": 60})
    try:
        async with answered_call(server) as call:
            # A live phone: RTP every 100 ms until the cap ends the call, 2 s
            # in plus up to one look of the watchdog; 6 s leaves room for a busy machine.
            for _ in range(60):
                call.send_rtp()
                if await call.hung_up(within=0.1):
                    break
            else:
                pytest.fail("the call outlived sip.max_call_seconds")
        row = await server.cdr_row()
        assert (row["hangup"], row["reason"]) == ("pbx", "max-call-seconds")
    finally:
        await server.stop()
