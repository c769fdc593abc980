"""Hold with music: a bridged party's hold re-INVITE is answered by the
server, the other party hears the call's music-on-hold class (a queue's own,
when a queue's agent took the call) instead of the holder, in the stream it
was getting, and resuming brings the holder back; a recording has the music
on the holder's channel meanwhile.

First over a real relay with fake phones on loopback, where every packet is
seen; then end to end with pjsua2 phones and `pbx serve`, the music told
apart by its frequency."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import wave
from pathlib import Path

import numpy as np
import pytest
from aiortp import RtpPacket

from pbx.calls.hold import Hold
from pbx.media.clock import MediaClock
from pbx.media.codecs import PCMU
from pbx.media.moh import MusicOnHold
from pbx.media.ports import RtpPortPool
from pbx.media.prompts import SILENCE, PromptLibrary
from pbx.media.relay import RtpRelay
from tests.support.audio import dominant_frequency, write_tone
from tests.support.phone import Phone
from tests.support.rtp_peer import HOST, RtpPhone, open_phone, until
from tests.support.server import PASSWORDS, Server, queue_settings, start_server
from tests.test_media import free_range
from tests.test_moh import ticks

HOLDER_HZ = 440  # the holder's tone (its microphone, still sending on hold)
LISTENER_HZ = 1000  # the other party's tone
DEFAULT_HZ = 700  # the default class's music
QUEUE_HZ = 1500  # the queue's own class's music
QUEUE = "7000"


def write_sounds(folder: Path) -> Path:
    """A sounds folder with two music-on-hold classes, each a plain tone."""
    for moh_class, hz in (("default", DEFAULT_HZ), ("jazz", QUEUE_HZ)):
        (folder / "moh" / moh_class).mkdir(parents=True)
        write_tone(folder / "moh" / moh_class / "tune.wav", hz, 2.0)
    return folder


# --- over a real relay ---

VOICE = b"\x11" * 160  # what the holder's phone sends, on hold as before


async def talk(phone: RtpPhone, port: int, stop: asyncio.Event) -> None:
    """Send VOICE every 20 ms, one stream, until ``stop``."""
    for seq in itertools.count(1):
        if stop.is_set():
            return
        phone.send(port, 0, seq & 0xFFFF, seq * 160, VOICE, ssrc=0xBEEF)
        await asyncio.sleep(0.02)


async def test_the_other_party_hears_music_in_its_own_stream_until_the_holder_resumes(tmp_path: Path, clock: MediaClock) -> None:
    library = PromptLibrary(write_sounds(tmp_path / "sounds"), None, tmp_path / "cache")
    music = set(await library.frames("moh/jazz/tune", "PCMU"))
    low, high = free_range(4)
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), clock)
    holder, listener = await open_phone(), await open_phone()
    relay.a.set_remote(holder.addr, PCMU, 101)
    relay.b.set_remote(listener.addr, PCMU, 101)
    hold, stop = Hold(), asyncio.Event()
    talking = asyncio.create_task(talk(holder, relay.a.port, stop))
    try:
        await until(lambda: relay.a.counters.relayed >= 10)
        hold.offered(relay.a, "sendonly", bridged=True, music=MusicOnHold(clock, lambda: library), moh_class="jazz")
        assert hold.on
        await until(lambda: relay.b.played >= 40, timeout=5)
        hold.offered(relay.a, "sendrecv", bridged=True, music=None, moh_class="jazz")
        assert not hold.on
        resumed = relay.a.counters.relayed
        await until(lambda: relay.a.counters.relayed >= resumed + 10)
        stop.set()
        await talking
        received = await listener.drain()
    finally:
        stop.set()
        hold.end()
        relay.close()
        holder.transport.close()
        listener.transport.close()

    def kind(packet: RtpPacket) -> str:
        if packet.payload == VOICE:
            return "holder"
        if packet.payload == SILENCE["PCMU"]:
            return "silence"
        return "music" if packet.payload in music else "other"

    runs = [name for name, _ in itertools.groupby(kind(p) for p in received)]
    # Silence fills only the ticks before the class is loaded, if any.
    assert runs in (["holder", "music", "holder"], ["holder", "silence", "music", "holder"])
    held_on = next(i for i, p in enumerate(received) if kind(p) != "holder")
    stream = received[held_on:]  # from the hold on, the relay's one stream: music, then the holder relayed in it
    assert {p.ssrc for p in stream} == {stream[0].ssrc} != {0xBEEF}
    first = stream[0].sequence_number
    assert [p.sequence_number for p in stream] == [(first + i) & 0xFFFF for i in range(len(stream))]
    assert stream[0].marker


async def test_a_hold_while_the_server_talks_plays_nothing_and_music_ends_with_the_call(tmp_path: Path, clock: MediaClock) -> None:
    library = PromptLibrary(write_sounds(tmp_path / "sounds"), None, tmp_path / "cache")
    moh = MusicOnHold(clock, lambda: library)
    low, high = free_range(4)
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), clock)
    phone = await open_phone()
    relay.a.set_remote(phone.addr, PCMU, 101)
    relay.b.set_remote(phone.addr, PCMU, 101)
    hold = Hold()
    try:
        hold.offered(relay.a, "inactive", bridged=False, music=moh, moh_class="default")  # the caller, talking to the IVR
        assert hold.on and not relay.b.holds_back and hold.direction(relay.a) == "inactive"
        hold.offered(relay.b, "inactive", bridged=True, music=moh, moh_class="default")
        assert relay.a.holds_back
        await until(lambda: relay.a.played >= 5, timeout=5)
        hold.end()
        assert not relay.a.holds_back
        played = relay.a.played
        await ticks(clock, 5)
        assert relay.a.played == played
    finally:
        relay.close()
        phone.transport.close()


# --- end to end ---


async def phone(server: Server, ext: str) -> Phone:
    started = await Phone.start(name=f"p{ext}")
    await started.register(server.sip, ext, PASSWORDS[ext])
    return started


async def heard(phone: Phone, call: int, path: Path) -> float:
    """The strongest frequency ``phone`` hears on ``call`` over about a second."""
    await phone.record(call, path)
    await asyncio.sleep(1.2)  # the recording's length, not synchronisation
    await phone.stop_record(call)
    return dominant_frequency(path)


async def test_a_held_extension_call_plays_the_default_class_and_resuming_brings_the_holder_back(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", sounds={"dir": str(write_sounds(tmp_path / "sounds"))})
    try:
        async with await phone(server, "1001") as alice, await phone(server, "1002") as bob:
            a = await alice.call("sip:1002@pbx.local")
            b = (await bob.wait_event("incoming"))["call"]
            await alice.play_tone(a, HOLDER_HZ)
            await bob.play_tone(b, LISTENER_HZ)
            await bob.answer(b)
            await bob.wait_event("media", call=b, active=True)
            await alice.wait_event("media", call=a, active=True)
            assert await heard(bob, b, tmp_path / "before.wav") == pytest.approx(HOLDER_HZ, abs=15)

            await alice.hold(a)
            await alice.wait_event("media", call=a, status="local_hold")  # the server's answer
            assert await heard(bob, b, tmp_path / "held.wav") == pytest.approx(DEFAULT_HZ, abs=15)

            await alice.unhold(a)
            await alice.wait_event("media", call=a, status="active")
            assert await heard(bob, b, tmp_path / "resumed.wav") == pytest.approx(HOLDER_HZ, abs=15)
            assert await heard(alice, a, tmp_path / "alice.wav") == pytest.approx(LISTENER_HZ, abs=15)
            with pytest.raises(TimeoutError):  # bob was never re-INVITEd: its media never changed
                await bob.wait_event("media", call=b, timeout=0.2)
    finally:
        assert await server.stop() == 0


def recording(server: Server) -> tuple[np.ndarray, np.ndarray]:
    """The one recording's channels: caller left, agent right."""
    with sqlite3.connect(server.folder / "pbx.db") as db:
        [(path,)] = db.execute("select path from recordings").fetchall()
    with wave.open(str(server.folder / path), "rb") as wav:
        assert wav.getnchannels() == 2
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    return samples[0::2], samples[1::2]


def tones(samples: np.ndarray, candidates: tuple[int, ...], block: int = 1600) -> list[tuple[int, int]]:
    """Runs of 0.2 s blocks by the candidate frequency nearest each block's
    strongest one, quiet blocks left out: [(hz, blocks), ...]."""
    found = []
    for start in range(0, samples.size - block + 1, block):
        chunk = samples[start : start + block]
        if np.sqrt(np.mean(chunk**2)) < 1000:  # well under the tones' level
            continue
        spectrum = np.abs(np.fft.rfft((chunk - chunk.mean()) * np.hanning(block)))
        peak = float(np.argmax(spectrum)) * 8000 / block
        found.append(min(candidates, key=lambda hz: abs(hz - peak)))
    return [(hz, len(list(run))) for hz, run in itertools.groupby(found)]


async def test_an_agent_on_hold_plays_the_caller_the_queues_class_and_the_recording_has_it_on_the_agents_channel(
    tmp_path: Path,
) -> None:
    server = await start_server(
        tmp_path / "pbx",
        sounds={"dir": str(write_sounds(tmp_path / "sounds"))},
        inbound={QUEUE: "queue:support"},
        queues={"support": queue_settings(["1002"], moh="jazz", record=True, announce={"position": False, "wait_time": False})},
        recording={"stereo": True},
    )
    try:
        async with await phone(server, "1001") as caller, await phone(server, "1002") as agent:
            c = await caller.call(f"sip:{QUEUE}@pbx.local")
            await caller.play_tone(c, LISTENER_HZ)
            g = (await agent.wait_event("incoming"))["call"]
            await agent.play_tone(g, HOLDER_HZ)
            await agent.answer(g)
            await agent.wait_event("media", call=g, active=True)
            assert await heard(caller, c, tmp_path / "before.wav") == pytest.approx(HOLDER_HZ, abs=15)

            await agent.hold(g)
            await agent.wait_event("media", call=g, status="local_hold")
            assert await heard(caller, c, tmp_path / "held.wav") == pytest.approx(QUEUE_HZ, abs=15)

            await agent.unhold(g)
            await agent.wait_event("media", call=g, status="active")
            assert await heard(caller, c, tmp_path / "resumed.wav") == pytest.approx(HOLDER_HZ, abs=15)
            await agent.hangup(g)
            await caller.wait_event("call_state", call=c, state="disconnected")
        await server.wait_log(r"recording \S+ saved")
        left, right = recording(server)
    finally:
        assert await server.stop() == 0

    candidates = (HOLDER_HZ, LISTENER_HZ, DEFAULT_HZ, QUEUE_HZ)
    # The caller's channel: its own tone all along, the hold included.
    assert [hz for hz, _ in tones(left, candidates)] == [LISTENER_HZ]
    # The agent's: its tone, the queue's music while it held (about 1.2 s), its tone again.
    agent_runs = tones(right, candidates)
    assert [hz for hz, _ in agent_runs] == [HOLDER_HZ, QUEUE_HZ, HOLDER_HZ]
    assert agent_runs[1][1] >= 5
