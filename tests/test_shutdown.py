"""End to end: SIGTERM to `pbx serve` during three calls (two between
extensions, one recorded queue call). New INVITEs get 503 with Retry-After
while REGISTER and OPTIONS are still answered; the calls finish (hung up by
the phones, or by the server at sip.drain_timeout, or at once on a second
signal) with their CDR rows and a complete, indexed recording; the process
exits 0."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import uuid
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosipua import SipResponse

from tests.support.phone import Phone, phones_for
from tests.support.server import Server, queue_settings, start_server
from tests.test_hostile_input import RawUdp, options, raw_udp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
QUEUE = "7000"
EXTENSIONS = {"1001": "secret-1001", "1002": "secret-1002", "1003": "secret-1003", "1004": "secret-1004"}


async def shutdown_server(folder: Path, drain_timeout: int) -> Server:
    """Queue `support` at 7000 with agent 1003, recorded; 1001-1004 are phones."""
    return await start_server(
        folder,
        sip={"drain_timeout": drain_timeout},
        sounds={"dir": str(SOUNDS)},
        extensions={ext: {"name": f"User {ext}", "password": pw} for ext, pw in EXTENSIONS.items()},
        inbound={QUEUE: "queue:support"},
        queues={"support": queue_settings(["1003"], record=True)},
        recording={"stereo": True},
        log_level="INFO",
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(EXTENSIONS) as started:
        yield started


@dataclass
class Leg:
    phone: Phone
    call: int


@dataclass
class Call:
    """One call through the server as the test sees it: its id and both phones' ends."""

    id: str
    caller: Leg
    callee: Leg


async def call_id(server: Server, mark: int, to: str) -> str:
    line = await server.wait_log(rf"call=\S+ event=started .*\bto={to}\b", start=mark)
    match = re.search(r"call=(\S+)", line)
    assert match is not None
    return match[1]


async def place(server: Server, caller: Phone, callee: Phone, number: str) -> Call:
    """``caller`` dials ``number``; ``callee`` (the extension, or the queue's agent) answers."""
    mark = len(server.log)
    a = await caller.call(f"sip:{number}@pbx.local")
    cid = await call_id(server, mark, number)
    incoming = await callee.wait_event("incoming", timeout=15)
    await caller.play_tone(a, 440)
    await callee.play_tone(incoming["call"], 1000)
    await callee.answer(incoming["call"])
    await server.wait_log(rf"call={re.escape(cid)} event=answered\b")
    await caller.wait_event("media", call=a, active=True)
    await callee.wait_event("media", call=incoming["call"], active=True)
    return Call(cid, Leg(caller, a), Leg(callee, incoming["call"]))


async def three_calls(server: Server, phones: dict[str, Phone]) -> list[Call]:
    """1001 calls 1002 twice; 1004 calls the queue, where agent 1003 answers (recorded)."""
    await asyncio.gather(*(phones[ext].register(server.sip, ext, pw) for ext, pw in EXTENSIONS.items()))
    calls = [
        await place(server, phones["1001"], phones["1002"], "1002"),
        await place(server, phones["1001"], phones["1002"], "1002"),
        await place(server, phones["1004"], phones["1003"], QUEUE),
    ]
    assert await server.metric("pbx_active_calls") == 3
    return calls


async def sigterm(server: Server, calls: int, limit: int) -> int:
    mark = len(server.log)
    server.proc.send_signal(signal.SIGTERM)
    await server.wait_log(rf"draining: {calls} calls in progress, up to {limit} s", start=mark)
    return mark


async def refused_while_draining(server: Server, phone: Phone) -> None:
    """A phone's new call gets 503; a raw INVITE's 503 carries Retry-After;
    REGISTER (a phone that starts now) and OPTIONS are still answered."""
    call = await phone.call("sip:1002@pbx.local")
    assert (await phone.wait_event("call_state", call=call, state="disconnected"))["code"] == 503
    async with await Phone.start(name="late") as late:
        assert await late.register(server.sip, "1001", EXTENSIONS["1001"]) == 200

    transport, peer = await raw_udp("127.0.0.1", server)
    ip, port = transport.get_extra_info("sockname")
    try:
        transport.sendto(invite(ip, port))
        reply = await final_reply(peer, "INVITE")
        assert reply.status_code == 503
        assert int(reply.headers.get_first("retry-after") or "0") >= 1
        transport.sendto(options(ip, port))
        assert (await final_reply(peer, "OPTIONS")).status_code == 200
    finally:
        transport.close()


async def final_reply(peer: RawUdp, method: str) -> SipResponse:
    """The next final response to a ``method`` request (100 Trying and
    retransmissions of other answers are skipped)."""
    while True:
        reply = await peer.reply()
        cseq = reply.cseq
        if reply.status_code >= 200 and cseq is not None and cseq.method.upper() == method:
            return reply


def invite(ip: str, port: int) -> bytes:
    return (
        "INVITE sip:1002@pbx.local SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@pbx.local>;tag=late\r\nTo: <sip:1002@pbx.local>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 INVITE\r\nContact: <sip:1001@{ip}:{port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def exits_cleanly(server: Server, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        await server.proc.wait()
    assert await server.stop() == 0  # collects the rest of the log


def rows(server: Server, table: str) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"select * from {table}")]  # a table name of ours, not input


def check_records(server: Server, calls: list[Call], hangup: str, others: tuple[str, ...] = ()) -> None:
    """One answered CDR row per call, ended by ``hangup``, and rows for the
    ``others`` only; the queue call's recording complete, indexed and as
    long as the time the agent talked."""
    cdr = {r["call_id"]: r for r in rows(server, "cdr")}
    assert sorted(cdr) == sorted([*(c.id for c in calls), *others])  # the refused INVITEs are no calls
    for call in calls:
        row = cdr[call.id]
        assert row["disposition"] == "answered" and row["billsec"] > 0
        assert any(re.search(rf"call={re.escape(call.id)} event=ended disposition=answered .*\bhangup={hangup}\b", line) for line in server.log)
    queued = cdr[calls[2].id]
    assert (queued["queue"], queued["agent"]) == ("support", "1003") and queued["wait"] > 0

    [recording] = rows(server, "recordings")
    assert recording["call_id"] == calls[2].id and recording["agent"] == "1003"
    path = server.folder / recording["path"]
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 2
        seconds = wav.getnframes() / wav.getframerate()
    assert recording["bytes"] == path.stat().st_size
    assert seconds == pytest.approx(recording["seconds"], abs=0.05)
    # Recorded from the agent's answer to the end: the caller's billed time less the queue wait.
    assert seconds == pytest.approx(queued["billsec"] - queued["wait"], abs=0.5)
    assert not list((server.folder / "recordings").rglob("*.part"))


async def test_calls_in_progress_finish_while_new_ones_get_503_then_the_server_exits_0(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await shutdown_server(tmp_path / "pbx", drain_timeout=30)
    try:
        calls = await three_calls(server, phones)
        mark = await sigterm(server, 3, 30)
        await refused_while_draining(server, phones["1001"])
        assert server.proc.returncode is None  # still draining: the calls go on

        for call in calls:
            await call.caller.phone.hangup(call.caller.call)
            await call.callee.phone.wait_event("call_state", call=call.callee.call, state="disconnected")
        await server.wait_log(r"draining: every call has finished", start=mark)
        await exits_cleanly(server)
        check_records(server, calls, hangup="caller")
    finally:
        await server.stop()


async def test_calls_still_up_at_the_drain_limit_are_hung_up_and_recorded(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await shutdown_server(tmp_path / "pbx", drain_timeout=2)
    try:
        calls = await three_calls(server, phones)
        # A fourth caller waits in the queue: its only agent is busy.
        mark = len(server.log)
        waiting = await phones["1004"].call(f"sip:{QUEUE}@pbx.local")
        waiting_id = await call_id(server, mark, QUEUE)
        await server.wait_log(rf"call={re.escape(waiting_id)} event=queued\b")

        mark = await sigterm(server, 4, 2)
        await refused_while_draining(server, phones["1001"])
        await server.wait_log(r"draining: 4 calls still in progress after 2 s; hanging them up", start=mark)
        for call in calls:
            for leg in (call.caller, call.callee):
                await leg.phone.wait_event("call_state", call=leg.call, state="disconnected")
        await phones["1004"].wait_event("call_state", call=waiting, state="disconnected")
        await exits_cleanly(server)

        check_records(server, calls, hangup="pbx", others=(waiting_id,))
        [queued] = [r for r in rows(server, "cdr") if r["call_id"] == waiting_id]
        assert (queued["disposition"], queued["queue"], queued["agent"]) == ("unavailable", "support", None)
        assert queued["wait"] > 1.5
    finally:
        await server.stop()


async def test_a_second_signal_during_the_drain_hangs_up_at_once(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await shutdown_server(tmp_path / "pbx", drain_timeout=60)
    try:
        calls = await three_calls(server, phones)
        mark = await sigterm(server, 3, 60)
        server.proc.send_signal(signal.SIGINT)
        await server.wait_log(r"draining interrupted: hanging up 3 calls now", start=mark)
        for call in calls:
            for leg in (call.caller, call.callee):
                await leg.phone.wait_event("call_state", call=leg.call, state="disconnected")
        await exits_cleanly(server)
        check_records(server, calls, hangup="pbx")
    finally:
        await server.stop()
