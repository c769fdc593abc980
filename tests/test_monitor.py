"""End to end: a supervisor listens in on a bridged call, whispers to the
agent, or barges in (``POST /api/calls/{id}/monitor``), with three pjsua2
phones against `pbx serve`. The caller (1001) plays 440 Hz, the agent (1002)
1000 Hz, the supervisor (1003) 2200 Hz, and each phone's recording of what it
hears is checked by FFT for which of the three tones are in it."""

from __future__ import annotations

import asyncio
import sqlite3
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from pbx.media.audio_taps import listen, unlisten
from pbx.media.codecs import G722, PCMA, PCMU, Codec, Decoder, Encoder
from pbx.media.mixer import FRAME, LIMIT, MixInput
from pbx.media.relay_side import RelaySide
from tests.support.audio import read_samples
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, start_server

CALLER, AGENT, SUPERVISOR = 440, 1000, 2200  # the tone each plays
TONES = (CALLER, AGENT, SUPERVISOR)
HEARD = 0.1  # a tone's peak at least this share of the loudest one's: heard
UNHEARD = 0.01  # at most this (-40 dB): not heard


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["record"] = True  # a recording taps the same sides as the supervisor
    srv = await start_server(tmp_path / "pbx", sip={"ring_timeout": 10}, extensions=extensions, recording={"stereo": True})
    yield srv
    assert await srv.stop() == 0


@asynccontextmanager
async def session(server: Server) -> AsyncIterator[tuple[dict[str, Phone], aiohttp.ClientSession]]:
    phones = await asyncio.gather(*(Phone.start(name=f"p{ext}") for ext in PASSWORDS))
    try:
        await asyncio.gather(*(p.register(server.sip, ext, PASSWORDS[ext]) for ext, p in zip(PASSWORDS, phones, strict=True)))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}", headers={"Authorization": "Bearer test-token"}) as http:
            yield dict(zip(PASSWORDS, phones, strict=True)), http
    finally:
        await asyncio.gather(*(p.close() for p in phones))


async def bridged_call(p: dict[str, Phone], http: aiohttp.ClientSession) -> tuple[int, int, str]:
    """1001 calls 1002, which answers; both play their tones. Their pjsua call handles and the server's call id."""
    a = await p["1001"].call("sip:1002@pbx.local")
    b = (await p["1002"].wait_event("incoming"))["call"]
    await p["1002"].answer(b)
    await p["1001"].wait_event("media", call=a, active=True)
    await p["1002"].wait_event("media", call=b, active=True)
    await p["1001"].play_tone(a, CALLER)
    await p["1002"].play_tone(b, AGENT)
    async with http.get("/api/calls") as resp:
        [call] = (await resp.json())["items"]
    return a, b, call["id"]


async def monitor(server: Server, p: dict[str, Phone], http: aiohttp.ClientSession, call_id: str, mode: str) -> tuple[int, str]:
    """Ask for ``mode``; 1003 sees who rings, plays its tone and answers. Its call handle and the monitor's call id."""
    async with http.post(f"/api/calls/{call_id}/monitor", json={"extension": "1003", "mode": mode}) as resp:
        assert resp.status == 202, await resp.text()
        started = await resp.json()
    assert (started["call"], started["extension"], started["mode"]) == (call_id, "1003", mode)
    incoming = await p["1003"].wait_event("incoming")
    assert f"monitor-{call_id}@" in incoming["from"]
    s = incoming["call"]
    await p["1003"].play_tone(s, SUPERVISOR)
    await p["1003"].answer(s)
    await p["1003"].wait_event("media", call=s, active=True)
    await server.wait_log(rf"call={call_id} event=monitored monitor={started['monitor']} extension=1003 mode={mode}")
    return s, started["monitor"]


def levels(path: Path) -> dict[int, float]:
    """Each tone's spectral peak (within 15 Hz) as a share of the loudest peak of the recording."""
    samples, rate = read_samples(path)
    samples = samples[int(0.3 * rate) :]
    spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * np.hanning(samples.size)))
    spectrum[0] = 0.0
    hz = np.fft.rfftfreq(samples.size, 1 / rate)
    loudest = float(spectrum.max()) or 1.0
    return {tone: float(spectrum[np.abs(hz - tone) <= 15].max()) / loudest for tone in TONES}


async def hear(tmp_path: Path, name: str, calls: dict[str, tuple[Phone, int]]) -> dict[str, dict[int, float]]:
    """What each phone hears on its call over the same 1.5 s: each tone's level."""
    paths = {who: tmp_path / f"{name}-{who}.wav" for who in calls}
    await asyncio.gather(*(phone.record(call, paths[who]) for who, (phone, call) in calls.items()))
    await asyncio.sleep(1.5)  # the recordings' length, not synchronisation
    await asyncio.gather(*(phone.stop_record(call) for phone, call in calls.values()))
    return {who: levels(path) for who, path in paths.items()}


def heard(level: dict[int, float]) -> set[int]:
    """The tones heard; a tone neither clearly heard nor clearly absent fails the test."""
    unclear = {tone: share for tone, share in level.items() if UNHEARD < share < HEARD}
    assert not unclear, f"neither heard nor silent: {level}"
    return {tone for tone, share in level.items() if share >= HEARD}


def cdr(server: Server, call_id: str) -> dict[str, Any]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("select * from cdr where call_id = ?", [call_id]).fetchone()
    return dict(row) if row is not None else {}


async def row_when_ended(server: Server, call_id: str) -> dict[str, Any]:
    """The CDR row of ``call_id`` once it is written at the call's end."""
    async with asyncio.timeout(10):
        while not (row := cdr(server, call_id)).get("ended"):
            await asyncio.sleep(0.1)  # the row is written right after the call ends, on the server's own time
    return row


async def test_a_supervisor_listens_to_both_parties_who_do_not_hear_it_and_leaves_the_call_as_it_was(server: Server, tmp_path: Path) -> None:
    async with session(server) as (p, http):
        a, b, call_id = await bridged_call(p, http)
        s, monitor_id = await monitor(server, p, http, call_id, "listen")
        async with http.get("/api/calls") as resp:
            calls = {c["id"]: c for c in (await resp.json())["items"]}
        assert (calls[monitor_id]["direction"], calls[monitor_id]["from"], calls[monitor_id]["to"]) == ("monitor", "1003", call_id)
        assert calls[monitor_id]["state"] == "answered"
        async with http.post(f"/api/calls/{call_id}/monitor", json={"extension": "1003", "mode": "listen"}) as resp:
            assert (resp.status, (await resp.json())["error"]) == (409, "already-monitored")

        levels_of = await hear(tmp_path, "listen", {"caller": (p["1001"], a), "agent": (p["1002"], b), "supervisor": (p["1003"], s)})
        assert heard(levels_of["supervisor"]) == {CALLER, AGENT}
        assert heard(levels_of["caller"]) == {AGENT}
        assert heard(levels_of["agent"]) == {CALLER}

        await p["1003"].hangup(s)  # the supervisor leaves: its call alone ends
        row = await row_when_ended(server, monitor_id)
        assert (row["direction"], row["from_number"], row["to_number"], row["disposition"]) == ("monitor", "1003", call_id, "answered")
        levels_of = await hear(tmp_path, "after", {"caller": (p["1001"], a), "agent": (p["1002"], b)})
        assert heard(levels_of["caller"]) == {AGENT} and heard(levels_of["agent"]) == {CALLER}
        await p["1001"].hangup(a)
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        assert (await row_when_ended(server, call_id))["disposition"] == "answered"
    [recording] = list(server.folder.glob("recordings/**/*.wav"))  # the recording heard the call beside the supervisor
    with wave.open(str(recording)) as wav:
        rate = wav.getframerate()
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    left = frames[0::2][-rate:]
    assert np.argmax(np.abs(np.fft.rfft(left * np.hanning(left.size)))) * rate / left.size == pytest.approx(CALLER, abs=15)


async def test_a_whisper_reaches_the_agent_only_and_the_call_ending_hangs_the_supervisor_up(server: Server, tmp_path: Path) -> None:
    async with session(server) as (p, http):
        a, b, call_id = await bridged_call(p, http)
        s, monitor_id = await monitor(server, p, http, call_id, "whisper")
        levels_of = await hear(tmp_path, "whisper", {"caller": (p["1001"], a), "agent": (p["1002"], b), "supervisor": (p["1003"], s)})
        assert heard(levels_of["supervisor"]) == {CALLER, AGENT}
        assert heard(levels_of["agent"]) == {CALLER, SUPERVISOR}
        assert heard(levels_of["caller"]) == {AGENT}

        await p["1001"].hangup(a)
        await p["1003"].wait_event("call_state", call=s, state="disconnected")
        await p["1002"].wait_event("call_state", call=b, state="disconnected")
        assert (await row_when_ended(server, monitor_id))["hangup"] == "pbx"


async def test_a_barging_supervisor_is_heard_by_both_until_it_hangs_up(server: Server, tmp_path: Path) -> None:
    async with session(server) as (p, http):
        a, b, call_id = await bridged_call(p, http)
        s, _ = await monitor(server, p, http, call_id, "barge")
        levels_of = await hear(tmp_path, "barge", {"caller": (p["1001"], a), "agent": (p["1002"], b), "supervisor": (p["1003"], s)})
        assert heard(levels_of["supervisor"]) == {CALLER, AGENT}
        assert heard(levels_of["agent"]) == {CALLER, SUPERVISOR}
        assert heard(levels_of["caller"]) == {AGENT, SUPERVISOR}

        await p["1003"].hangup(s)
        await server.wait_log(rf"call={call_id} event=unmonitored")
        levels_of = await hear(tmp_path, "after", {"caller": (p["1001"], a), "agent": (p["1002"], b)})
        assert heard(levels_of["caller"]) == {AGENT} and heard(levels_of["agent"]) == {CALLER}


async def test_a_supervisor_still_ringing_when_the_call_ends_stops_ringing(server: Server) -> None:
    async with session(server) as (p, http):
        a, b, call_id = await bridged_call(p, http)
        async with http.post(f"/api/calls/{call_id}/monitor", json={"extension": "1003", "mode": "whisper"}) as resp:
            monitor_id = (await resp.json())["monitor"]
        s = (await p["1003"].wait_event("incoming"))["call"]
        await p["1001"].hangup(a)
        await p["1003"].wait_event("call_state", call=s, state="disconnected")
        row = await row_when_ended(server, monitor_id)
        assert (row["direction"], row["to_number"], row["disposition"]) == ("monitor", call_id, "cancelled")


async def test_monitor_requests_are_refused_for_what_cannot_be_listened_to(server: Server) -> None:
    async with session(server) as (p, http):
        async with http.post("/api/calls/nosuchcall/monitor", json={"extension": "1003", "mode": "listen"}) as resp:
            assert (resp.status, (await resp.json())["error"]) == (404, "no-such-call")
        a = await p["1001"].call("sip:1002@pbx.local")
        await p["1002"].wait_event("incoming")  # it rings: nothing to listen to yet
        async with http.get("/api/calls") as resp:
            [call] = (await resp.json())["items"]
        path = f"/api/calls/{call['id']}/monitor"
        async with http.post(path, json={"extension": "1003", "mode": "listen"}) as resp:
            assert (resp.status, (await resp.json())["error"]) == (409, "not-bridged")
        async with http.post(path, json={"extension": "1003", "mode": "shout"}) as resp:
            assert (resp.status, list((await resp.json())["fields"])) == (422, ["mode"])
        async with http.post(path, json={"extension": "1009", "mode": "listen"}) as resp:
            assert (resp.status, list((await resp.json())["fields"])) == (422, ["extension"])
        await p["1001"].hangup(a)


# --- the pieces, without a server ---


def tone_frames(freq: float, count: int) -> list[npt.NDArray[np.int16]]:
    t = np.arange(count * FRAME) / 8000
    samples = np.round(8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return [samples[i * FRAME : (i + 1) * FRAME] for i in range(count)]


def test_a_side_heard_by_a_recording_and_a_supervisor_tells_both_until_each_leaves() -> None:
    side = RelaySide("a")
    recording: list[bytes] = []
    supervisor: list[bytes] = []

    def record(payload: bytes, pt: int) -> None:
        recording.append(payload)

    def listen_in(payload: bytes, pt: int) -> None:
        supervisor.append(payload)

    listen(side, record)
    listen(side, listen_in)
    assert side.on_audio is not None
    side.on_audio(b"1", 0)
    unlisten(side, record)
    side.on_audio(b"2", 0)
    unlisten(side, listen_in)
    assert (recording, supervisor, side.on_audio) == ([b"1"], [b"1", b"2"], None)


@pytest.mark.parametrize("codec", [PCMU, PCMA, G722])
def test_mixed_audio_encoded_frame_by_frame_decodes_as_the_tone_it_was(codec: Codec) -> None:
    encode, decode = Encoder(codec.name), Decoder(codec.name)
    decoded = np.concatenate([decode(encode(frame)) for frame in tone_frames(1000, 25)])[2 * FRAME :].astype(np.float64)
    power = np.abs(np.fft.rfft(decoded * np.hanning(decoded.size))) ** 2
    hz = np.fft.rfftfreq(decoded.size, 1 / 8000)
    # G.722 encoded afresh each frame (its state lost) leaves a third of the power elsewhere.
    assert power[np.abs(hz - 1000) <= 40].sum() / power.sum() > 0.99


def test_an_input_gives_frames_once_two_are_queued_and_keeps_six_at_most() -> None:
    side = RelaySide("a")
    side.codec = PCMU
    mixed = MixInput(side)
    encode = Encoder("PCMU")
    frames = [encode(frame) for frame in tone_frames(440, 10)]
    mixed.hear(frames[0], PCMU.payload_type)
    assert mixed.take() is None  # one frame of jitter to absorb first
    mixed.hear(frames[1], PCMU.payload_type)
    mixed.hear(b"\x00" * 160, 13)  # comfort noise: not audio in the side's codec
    assert [mixed.take() is not None for _ in range(3)] == [True, True, False]
    for frame in frames:
        mixed.hear(frame, PCMU.payload_type)
    taken = [mixed.take() for _ in range(LIMIT + 1)]
    assert sum(frame is not None for frame in taken) == LIMIT  # the oldest went: the delay stays bounded
