"""Continuous media on every leg the server answers (issue 13, point 1).

While the server answers a caller itself (IVR, queue, voicemail, feature
codes, the first phone of a callback) the caller gets one RTP packet every
20 ms: our prompt or music when one plays, else silence in its codec; one
SSRC, consecutive sequence numbers, timestamps 160 apart, the marker at the
start of each prompt; and the party bridged in later continues that stream.

The first tests drive a relay side directly (real sockets on loopback, the
real MediaClock); the last two call `pbx serve` from a bare UDP socket whose
kernel stamps each packet as it arrives, so that pauses of the test process
itself do not show as gaps in the server's audio.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
import wave
import warnings
from pathlib import Path

import numpy as np
import pytest
from aiortp import RtpPacket

from pbx.media.clock import MediaClock
from pbx.media.codecs import G722, PCMA, PCMU, Codec
from pbx.media.prompts import SILENCE
from pbx.media.relay import RtpRelay
from tests.support.audio import dominant_frequency, write_tone
from tests.support.bare_phone import NUMBER, PROVIDER, ivr_server
from tests.support.phone import Phone
from tests.support.raw_sip import RawCaller, open_caller
from tests.support.rtp_peer import Arrivals, RtpPhone, assert_one_stream, frames, on_clock, until
from tests.support.server import PASSWORDS, queue_settings, start_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: audioop leaves the stdlib in 3.13
    import audioop

PCMU_SILENCE = b"\xff" * 160
# Two packets of one stream are never further apart than this (kernel
# stamps). Two ticks, plus room for a busy machine: without the silence the
# gaps are the length of each wait for a key, a second and more.
LONGEST_GAP = 0.060


# --- a relay side, driven directly ---


@pytest.mark.parametrize(
    ("codec", "silence"),
    [(PCMU, b"\xff" * 160), (PCMA, b"\xd5" * 160), (G722, SILENCE["G722"])],
    ids=lambda value: value.name if isinstance(value, Codec) else "",
)
async def test_a_side_answered_here_sends_silence_in_its_codec_every_tick(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock, codec: Codec, silence: bytes
) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, codec, 101)
    relay.a.start_filling()
    arrivals = await a.recv_timed(20)
    packets = [p for p, _ in arrivals]
    assert {p.payload for p in packets} == {silence}
    assert_one_stream(packets, codec.payload_type, clock)
    assert 0.3 < arrivals[-1][1] - arrivals[0][1] < 0.8  # 19 intervals of 20 ms, not a burst


async def test_prompts_break_the_silence_with_a_marker_in_one_stream(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock
) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.a.start_filling()
    packets = [await a.recv() for _ in range(3)]
    for count in (5, 3):  # a prompt, silence, a second prompt right after the first
        playback = relay.a.play(frames(count))
        assert await asyncio.wait_for(playback.done, 1.0) is True
    wanted = relay.a.played + 3
    while len(packets) < wanted:
        packets.append(await a.recv())

    kinds = ["S" if p.payload == PCMU_SILENCE else "P" for p in packets]
    first_prompt = kinds.index("P")
    assert kinds[first_prompt : first_prompt + 8] == ["P"] * 8 and kinds[first_prompt + 8 :] == ["S"] * 3
    assert [p.payload[0] for p in packets[first_prompt : first_prompt + 8]] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert_one_stream(packets, PCMU.payload_type, clock, starts=(first_prompt, first_prompt + 5))


async def test_hand_over_stops_the_silence_and_the_other_party_continues_the_stream(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock
) -> None:
    a, b = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 101)
    relay.a.start_filling()
    ours = [await a.recv() for _ in range(3)]
    # While the server answers, what the other side says is held back.
    b.send(relay.b.port, 0, seq=700, ts=3000, payload=b"\x11" * 160)
    await until(lambda: relay.b.counters.dropped == 1)

    relay.a.hand_over()
    assert not on_clock(clock, relay.a)
    ours += await a.drain()  # a frame already on its way
    for i in range(3):
        b.send(relay.b.port, 0, seq=701 + i, ts=3160 + 160 * i, payload=b"\x22" * 160)
    relayed = [await a.recv() for _ in range(3)]

    assert {p.payload for p in ours} == {PCMU_SILENCE}
    assert [p.payload for p in relayed] == [b"\x22" * 160] * 3
    packets = ours + relayed
    assert {p.ssrc for p in packets} == {ours[0].ssrc}
    assert [p.sequence_number for p in packets] == [(ours[0].sequence_number + i) & 0xFFFF for i in range(len(packets))]
    assert [p.marker for p in relayed] == [1, 0, 0]
    assert [(p.timestamp - relayed[0].timestamp) & 0xFFFFFFFF for p in relayed] == [0, 160, 320]
    assert (relayed[0].timestamp - ours[-1].timestamp) & 0xFFFFFFFF in range(160, 160 * 50, 160)


async def test_closing_the_relay_stops_the_silence(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.a.start_filling()
    await a.recv()
    relay.close()
    assert not on_clock(clock, relay.a)
    await a.drain()
    assert await a.quiet(0.1)
    relay.a.start_filling()  # the call is over: nothing starts again
    assert not on_clock(clock, relay.a)


# --- `pbx serve`, called from a bare socket ---


def assert_continuous(audio: Arrivals) -> None:
    """One SSRC and consecutive sequence numbers; no gap over LONGEST_GAP and 50 packets a second."""
    packets, times = audio.packets, audio.times
    assert {p.ssrc for p in packets} == {packets[0].ssrc}
    assert [p.sequence_number for p in packets] == [(packets[0].sequence_number + i) & 0xFFFF for i in range(len(packets))]
    gaps = np.diff(times)
    assert gaps.max() < LONGEST_GAP, f"a {gaps.max() * 1000:.0f} ms gap after packet {int(gaps.argmax())}"
    rate = (len(packets) - 1) / (times[-1] - times[0])
    assert 47 < rate < 53, f"{rate:.1f} packets a second"


async def call(caller: RawCaller, number: str, media_port: int) -> None:
    call_id, tag = f"{uuid.uuid4().hex}@continuous", uuid.uuid4().hex[:8]
    caller.invite(number, call_id=call_id, caller="+15550001", from_tag=tag, media_port=media_port)
    answer = await caller.final(call_id, tag)
    assert answer.status_code == 200
    caller.ack(answer, number)


def frequency(tmp_path: Path, name: str, packets: list[RtpPacket]) -> float:
    """The dominant frequency of PCMU ``packets`` played one after the other."""
    path = tmp_path / f"{name}.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(audioop.ulaw2lin(b"".join(p.payload for p in packets), 2))
    return dominant_frequency(path, skip_seconds=0)


MENU = """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 1, retries: 1, on_fail: hangup}
"""


@pytest.mark.serial
async def test_an_ivr_caller_waiting_for_a_key_hears_silence_between_prompts(tmp_path: Path) -> None:
    # The menu's prompt (0.4 s), a second of waiting for a key, the prompt
    # again, another second, and the server hangs up.
    server = await ivr_server(tmp_path, flow=MENU, prompt_seconds=0.4)
    audio = Arrivals(PROVIDER)
    caller = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    try:
        await call(caller, NUMBER, audio.port)
        await server.wait_log(r"event=ended", timeout=10)
        await asyncio.sleep(0.1)  # the last packets on the wire
    finally:
        caller.close()
        audio.close()
        assert await server.stop() == 0

    packets = audio.packets
    assert_continuous(audio)
    assert [(p.timestamp - packets[0].timestamp) & 0xFFFFFFFF for p in packets] == [160 * i for i in range(len(packets))]
    assert {p.payload_type for p in packets} == {PCMU.payload_type}
    assert len(packets) > 2.5 * 50  # 2.8 s of prompts and waiting
    # The prompt twice, 20 frames each, in silence; a marker where each starts.
    kinds = "".join("S" if p.payload == PCMU_SILENCE else "P" for p in packets)
    runs = [(kind, len(list(run))) for kind, run in itertools.groupby(kinds)]
    prompts = [i for i, (kind, _) in enumerate(runs) if kind == "P"]
    assert len(prompts) == 2 and all(runs[i][1] == 20 for i in prompts), runs
    assert runs[prompts[1] - 1][1] >= 45  # a second of silence between them
    starts = [sum(length for _, length in runs[:i]) for i in prompts]
    assert [i for i, p in enumerate(packets) if p.marker] == sorted({0, *starts})
    assert frequency(tmp_path, "prompt", packets[starts[1] : starts[1] + 20]) == pytest.approx(600, abs=25)


@pytest.mark.serial
async def test_a_queue_caller_hears_silence_music_and_the_agent_in_one_stream(tmp_path: Path) -> None:
    folder = tmp_path / "pbx"
    sounds = folder / "sounds"
    (sounds / "moh" / "default").mkdir(parents=True)
    write_tone(sounds / "moh" / "default" / "music.wav", 400, 1.0)
    server = await start_server(
        folder,
        sounds={"dir": str(sounds)},
        extensions={"1001": {"name": "Agent", "password": PASSWORDS["1001"]}},
        inbound={"7000": "queue:support"},
        trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{PROVIDER}/32"]}},
        queues={"support": queue_settings(["1001"], announce={"position": False, "wait_time": False})},
    )
    audio = Arrivals(PROVIDER)
    caller = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    agent = await Phone.start(name="agent")
    try:
        await call(caller, "7000", audio.port)
        await audio.until(lambda: len(audio.packets) >= 50)  # a second in the queue, nobody to answer
        await agent.register(server.sip, "1001", PASSWORDS["1001"])
        incoming = await agent.wait_event("incoming")
        await agent.answer(incoming["call"])
        await agent.play_tone(incoming["call"], 1000)
        answered = len(audio.packets)
        await audio.until(lambda: sum(frequency_of(p) == 1000 for p in audio.packets[answered:]) >= 25)
        await agent.hangup(incoming["call"])
        await agent.wait_event("call_state", call=incoming["call"], state="disconnected")
    finally:
        await agent.close()
        caller.close()
        audio.close()
        assert await server.stop() == 0

    packets = audio.packets
    assert_continuous(audio)
    # Ours, then the agent's as the stream's: music (after any silence while
    # it loaded), then what the agent sends (its silence, then its tone),
    # never mixed, with a marker only where the stream starts and where the
    # agent's part begins.
    kinds = "".join("S" if p.payload == PCMU_SILENCE else {400: "M", 1000: "T"}.get(frequency_of(p), "?") for p in packets)
    assert "?" not in kinds, kinds
    spoken = kinds.replace("S", "")
    assert spoken == "M" * spoken.count("M") + "T" * spoken.count("T") and spoken.count("M") >= 40, kinds
    markers = [i for i, p in enumerate(packets) if p.marker]
    assert len(markers) == 2 and markers[0] == 0, markers
    switch = markers[1]
    assert "T" not in kinds[:switch] and "M" not in kinds[switch:], (switch, kinds)
    steps = [(later.timestamp - earlier.timestamp) & 0xFFFFFFFF for earlier, later in zip(packets, packets[1:])]
    assert set(steps[: switch - 1]) == {160}  # ours, one per tick
    assert steps[switch - 1] in (160, 320, 480)  # the agent's first packet comes when it comes
    assert set(steps[switch:]) == {160}  # the agent's own spacing


def frequency_of(packet: RtpPacket) -> int:
    """The strongest frequency of one 20 ms PCMU packet, to the nearest 50 Hz."""
    samples = np.frombuffer(audioop.ulaw2lin(packet.payload, 2), dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return int(round(float(np.fft.rfftfreq(len(samples), 1 / 8000)[int(spectrum.argmax())]) / 50) * 50)
