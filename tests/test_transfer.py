"""End to end: transfers with pjsua2 phones. A blind transfer (REFER) by the
callee sends the caller to a third extension, which the caller hears ring
and then talks to; the transferor sees NOTIFY 200 and is released. A busy
target's calls go where its busy routing says. An attended transfer (REFER
with Replaces) joins the held caller to the target. The API transfers too.
The call's CDR rows share a linked_id, and its recording goes on in one file.
An INVITE with Replaces takes a leg's place; a trunk's caller transfers
inside, never out again."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import uuid
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from pbx.media.codecs import decode_to_pcm16
from tests.support.audio import dominant_frequency
from tests.support.phone import Phone, exchange_tones
from tests.support.raw_sip import Dialog, open_caller
from tests.support.server import PASSWORDS, Server, start_server

SOUNDS = Path(__file__).resolve().parent.parent / "config" / "sounds"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1003"]["voicemail"] = {"pin": "4321"}
    extensions["1001"]["record"] = True
    srv = await start_server(
        tmp_path / "pbx", sip={"ring_timeout": 4}, extensions=extensions, sounds={"dir": str(SOUNDS)},
        voicemail={"max_seconds": 20, "min_seconds": 1}, recording={"stereo": True},
        groups={"sales": {"members": ["1003"], "strategy": "ringall", "ring_timeout": 5}},
    )  # fmt: skip
    yield srv
    assert await srv.stop() == 0
    assert [line for line in srv.log if "kind=rtp_stranger" in line] == []  # a party moved in is no stranger: fail2ban reads these


@asynccontextmanager
async def registered(server: Server) -> AsyncIterator[dict[str, Phone]]:
    phones = await asyncio.gather(*(Phone.start(name=f"p{ext}") for ext in PASSWORDS))
    try:
        await asyncio.gather(*(p.register(server.sip, ext, PASSWORDS[ext]) for ext, p in zip(PASSWORDS, phones, strict=True)))
        yield dict(zip(PASSWORDS, phones, strict=True))
    finally:
        await asyncio.gather(*(p.close() for p in phones))


async def connect(caller: Phone, callee: Phone, number: str) -> tuple[int, int]:
    a = await caller.call(f"sip:{number}@pbx.local")
    b = (await callee.wait_event("incoming"))["call"]
    await callee.answer(b)
    await caller.wait_event("media", call=a, active=True)
    await callee.wait_event("media", call=b, active=True)
    return a, b


def cdr(server: Server) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from cdr where ended is not null order by started")]


async def rows_when_ended(server: Server, count: int) -> list[dict[str, Any]]:
    """The CDR rows once ``count`` pieces have ended (the last one is written right after its end is logged)."""
    for _ in range(50):
        rows = cdr(server)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} ended rows, got {cdr(server)}")


async def heard(phone: Phone, call: int, path: Path) -> float:
    """The dominant frequency ``phone`` hears on ``call`` for a second."""
    await phone.record(call, path)
    await asyncio.sleep(1.2)  # the recording's length, not synchronisation
    await phone.stop_record(call)
    return dominant_frequency(path)


async def test_callee_blind_transfers_the_caller_to_a_third_extension(server: Server, tmp_path: Path) -> None:
    async with registered(server) as p:
        a, b = await connect(p["1001"], p["1002"], "1002")
        await p["1002"].xfer(b, "sip:1003@pbx.local")
        c = (await p["1003"].wait_event("incoming"))["call"]
        ringback = await heard(p["1001"], a, tmp_path / "ringback.wav")
        assert ringback == pytest.approx(440, abs=15) or ringback == pytest.approx(480, abs=15)
        await p["1003"].answer(c)
        status = await p["1002"].wait_event("xfer_status", call=b, final=True)
        assert status["code"] == 200
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        await p["1003"].wait_event("media", call=c, active=True)
        heard_by_caller, heard_by_target = await exchange_tones(tmp_path, p["1001"], a, p["1003"], c)
        assert heard_by_caller == pytest.approx(1000, abs=15)
        assert heard_by_target == pytest.approx(440, abs=15)
        await p["1001"].hangup(a)
        await p["1003"].wait_event("call_state", call=c, state="disconnected")
        first, second = await rows_when_ended(server, 2)
    assert (first["from_number"], first["to_number"], first["disposition"]) == ("1001", "1002", "answered")
    assert (first["transfer_to"], first["reason"], first["hangup"]) == ("1003", "transfer", "callee")
    assert (second["from_number"], second["to_number"], second["disposition"]) == ("1001", "1003", "answered")
    assert second["transferred_by"] == "1002" and second["answered"] is not None
    assert first["linked_id"] == second["linked_id"] == first["call_id"] != second["call_id"]


async def test_a_blind_transfer_to_a_busy_target_follows_its_busy_routing(server: Server, tmp_path: Path) -> None:
    async with registered(server) as p:
        a, b = await connect(p["1001"], p["1002"], "1002")
        await p["1002"].xfer(b, "sip:1003@pbx.local")
        c = (await p["1003"].wait_event("incoming"))["call"]
        await p["1003"].reject(c, 486)
        # 1003's mailbox takes the call: for the transferor that is a success.
        status = await p["1002"].wait_event("xfer_status", call=b, final=True)
        assert status["code"] == 200
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        await server.wait_log(r"event=voicemail mailbox=1003")
        await p["1001"].hangup(a)
        _, second = await rows_when_ended(server, 2)
    assert (second["to_number"], second["transferred_by"], second["disposition"]) == ("1003", "1002", "voicemail")


async def test_the_caller_can_transfer_and_a_refused_number_is_refused(server: Server, tmp_path: Path) -> None:
    async with registered(server) as p:
        a, b = await connect(p["1001"], p["1002"], "1002")
        await p["1001"].xfer(a, "sip:5551234@pbx.local")  # no outbound rule lets 1001 dial it
        status = await p["1001"].wait_event("xfer_status", call=a, final=True)
        assert status["code"] == 403
        await p["1001"].xfer(a, "sip:1003@pbx.local")
        c = (await p["1003"].wait_event("incoming"))["call"]
        await p["1003"].answer(c)
        await p["1001"].wait_event("call_state", call=a, state="disconnected")
        await p["1003"].wait_event("media", call=c, active=True)
        heard_by_callee, heard_by_target = await exchange_tones(tmp_path, p["1002"], b, p["1003"], c)
        assert (heard_by_callee, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))


async def test_attended_transfer_joins_the_held_caller_to_the_target(server: Server, tmp_path: Path) -> None:
    async with registered(server) as p:
        a, b = await connect(p["1001"], p["1002"], "1002")
        await p["1002"].hold(b)
        await p["1002"].wait_event("media", call=b, status="local_hold")
        consult = await p["1002"].call("sip:1003@pbx.local")
        c = (await p["1003"].wait_event("incoming"))["call"]
        await p["1003"].answer(c)
        await p["1002"].wait_event("media", call=consult, active=True)
        await p["1002"].xfer_replaces(b, consult)
        status = await p["1002"].wait_event("xfer_status", call=b, final=True)
        assert status["code"] == 200
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        await p["1002"].wait_event("call_state", call=consult, state="disconnected")
        heard_by_caller, heard_by_target = await exchange_tones(tmp_path, p["1001"], a, p["1003"], c)
        assert heard_by_caller == pytest.approx(1000, abs=15)
        assert heard_by_target == pytest.approx(440, abs=15)
        await p["1003"].hangup(c)
        await p["1001"].wait_event("call_state", call=a, state="disconnected")
        rows = await rows_when_ended(server, 3)
    by_id = {row["call_id"]: row for row in rows}
    first = next(row for row in rows if row["from_number"] == "1001" and row["to_number"] == "1002")
    piece = next(row for row in rows if row["transferred_by"] == "1002")
    assert (piece["from_number"], piece["to_number"], piece["linked_id"]) == ("1001", "1003", first["call_id"])
    assert first["transfer_to"] == "1003" and len(by_id) == 3


def peak(samples: npt.NDArray[np.float64], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * np.hanning(samples.size)))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / samples.size)


async def test_the_api_transfers_a_call_to_a_group_and_the_recording_goes_on_in_one_file(server: Server, tmp_path: Path) -> None:
    async with registered(server) as p, aiohttp.ClientSession(headers={"Authorization": "Bearer test-token"}) as http:
        a, b = await connect(p["1001"], p["1002"], "1002")
        base = f"http://127.0.0.1:{server.http_port}/api/calls"
        async with http.get(base) as resp:
            [call] = (await resp.json())["items"]
        assert call["recording"]["state"] == "recording"
        await p["1001"].play_tone(a, 440)
        await p["1002"].play_tone(b, 700)
        await asyncio.sleep(1.2)  # what the recording holds of 1002, not synchronisation
        async with http.post(f"{base}/{call['id']}/transfer", json={"to": "nowhere:1"}) as resp:
            assert resp.status == 422
        async with http.post(f"{base}/{call['id']}/transfer", json={"to": "group:sales"}) as resp:
            assert resp.status == 200, await resp.text()
            piece = await resp.json()
        assert (piece["from"], piece["to"], piece["linked_id"], piece["transferred_by"]) == ("1001", "sales", call["id"], "1002")
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        c = (await p["1003"].wait_event("incoming"))["call"]
        await p["1003"].answer(c)
        await p["1003"].wait_event("media", call=c, active=True)
        await p["1003"].play_tone(c, 1300)
        await asyncio.sleep(1.2)  # what the recording holds of 1003
        await p["1001"].hangup(a)
        await p["1003"].wait_event("call_state", call=c, state="disconnected")
        await rows_when_ended(server, 2)
        recordings: list[dict[str, Any]] = []
        for _ in range(50):
            async with http.get(f"http://127.0.0.1:{server.http_port}/api/recordings") as resp:
                recordings = (await resp.json())["items"]
            if recordings:
                break
            await asyncio.sleep(0.1)
    [recording] = recordings
    assert recording["call_id"] == call["id"] and recording["channels"] == 2
    [path] = list(server.folder.glob("recordings/**/*.wav"))
    with wave.open(str(path)) as wav:
        rate = wav.getframerate()
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    left, right = frames[0::2], frames[1::2]
    second = rate
    assert peak(left[-second:], rate) == pytest.approx(440, abs=15)  # the caller, all along
    assert peak(right[int(0.2 * rate) : int(0.2 * rate) + second], rate) == pytest.approx(700, abs=15)  # 1002 first
    assert peak(right[-second:], rate) == pytest.approx(1300, abs=15)  # then 1003, in the same file


async def test_an_agent_transfers_a_queue_call_which_counts_once_and_the_agent_wraps_up(tmp_path: Path) -> None:
    queue = {"agents": ["1002"], "strategy": "linear", "ring_timeout": 5, "wrapup": 30, "callback": {"enabled": False}}
    server = await start_server(
        tmp_path / "pbx", sounds={"dir": str(SOUNDS)}, inbound={"7000": "queue:support"}, queues={"support": queue},
    )  # fmt: skip
    try:
        async with registered(server) as p, aiohttp.ClientSession(headers={"Authorization": "Bearer test-token"}) as http:
            a, b = await connect(p["1001"], p["1002"], "7000")
            await p["1002"].xfer(b, "sip:1003@pbx.local")
            c = (await p["1003"].wait_event("incoming"))["call"]
            await p["1003"].answer(c)
            await p["1002"].wait_event("call_state", call=b, state="disconnected")
            await server.wait_log(r"queue support: 1002 done with")
            async with http.get(f"http://127.0.0.1:{server.http_port}/api/queues/support") as resp:
                support = await resp.json()
            assert [(a["extension"], a["state"]) for a in support["agents"]] == [("1002", "wrapup")]
            assert (support["stats"]["offered"], support["stats"]["answered"]) == (1, 1)
            await p["1001"].hangup(a)
            await p["1003"].wait_event("call_state", call=c, state="disconnected")
            first, second = await rows_when_ended(server, 2)
        assert (first["queue"], first["agent"], first["transfer_to"]) == ("support", "1002", "1003")
        assert (second["queue"], second["transferred_by"], second["linked_id"]) == (None, "1002", first["call_id"])
    finally:
        assert await server.stop() == 0


async def test_an_invite_with_replaces_takes_the_place_of_a_leg(tmp_path: Path) -> None:
    provider = "127.0.0.2"
    server = await start_server(
        tmp_path / "pbx", trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{provider}/32"]}},
        inbound={"5000": "extension:1002"},
    )  # fmt: skip
    raw = await open_caller(("127.0.0.1", server.sip_port), host=provider)
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind((provider, 0))
    media.setblocking(False)
    try:
        async with registered(server) as p:
            raw.invite("5000", call_id="first", caller="0611", from_tag="t1", media_port=media.getsockname()[1] + 2)
            b = (await p["1002"].wait_event("incoming"))["call"]
            await p["1002"].answer(b)
            ok = await raw.final("first", "t1")
            raw.ack(ok, "5000")
            assert ok.to_addr is not None
            await p["1002"].play_tone(b, 1000)
            replaces = f"Replaces: first;to-tag={ok.to_addr.tag};from-tag=t1\n"
            raw.invite("5000", call_id="second", caller="0611", from_tag="t2", media_port=media.getsockname()[1], extra=replaces)
            assert (await raw.final("second", "t2")).status_code == 200
            await server.wait_log(r"event=replaced")
            payload = b""
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(5):
                while len(payload) < 8000:  # a second of PCMU from the relay's side b: what 1002 says
                    payload += (await loop.sock_recv(media, 2048))[12:]
            samples = decode_to_pcm16("PCMU", payload[-6000:]).astype(np.float64)
            assert peak(samples, 8000) == pytest.approx(1000, abs=15)
            await p["1002"].hangup(b)
            first, second = await rows_when_ended(server, 2)
        assert (first["from_number"], first["transfer_to"], first["reason"]) == ("0611", "0611", "transfer")
        assert (second["linked_id"], second["transferred_by"], second["disposition"]) == (first["call_id"], "0611", "answered")
    finally:
        raw.close()
        media.close()
        assert await server.stop() == 0


async def test_a_trunk_caller_transfers_inside_but_not_out_again(tmp_path: Path) -> None:
    provider = "127.0.0.2"
    server = await start_server(
        tmp_path / "pbx", trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{provider}/32"]}},
        inbound={"5000": "extension:1002"}, outbound=[{"match": "^00", "trunk": "carrier"}],  # the server's own calls may go out
    )  # fmt: skip
    raw = await open_caller(("127.0.0.1", server.sip_port), host=provider)

    async def refer(dialog: Dialog, target: str) -> int:
        dialog.cseq += 1
        host, port = raw.address
        raw.send(
            f"REFER sip:5000@127.0.0.1:{server.sip_port} SIP/2.0\nVia: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\n"
            f"From: {dialog.from_header}\nTo: {dialog.to_header}\nCall-ID: {dialog.call_id}\nCSeq: {dialog.cseq} REFER\n"
            f"Contact: <sip:0611@{host}:{port}>\nRefer-To: <sip:{target}@pbx.local>\nMax-Forwards: 70\nContent-Length: 0\n\n",
            raw.server,
        )
        return (await raw.final(dialog.call_id, "t1")).status_code

    try:
        async with registered(server) as p:
            raw.invite("5000", call_id="trunk", caller="0611", from_tag="t1", media_port=40000)
            b = (await p["1002"].wait_event("incoming"))["call"]
            await p["1002"].answer(b)
            dialog = raw.ack(await raw.final("trunk", "t1"), "5000")
            assert await refer(dialog, "0044123456") == 403  # toll fraud through a transfer: refused
            assert await refer(dialog, "1003") == 202
            c = (await p["1003"].wait_event("incoming"))["call"]
            await p["1003"].answer(c)
            await p["1003"].wait_event("media", call=c, active=True)
            heard_by_callee, heard_by_target = await exchange_tones(tmp_path, p["1002"], b, p["1003"], c)
            assert (heard_by_callee, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
            await p["1002"].hangup(b)
            first, second = await rows_when_ended(server, 2)
        assert (first["direction"], first["transferred_by"], first["transfer_to"]) == ("inbound", None, "1003")
        assert (second["from_number"], second["to_number"], second["transferred_by"]) == ("1002", "1003", "0611")
    finally:
        raw.close()
        assert await server.stop() == 0
