"""End to end: a queue call between a SIPp caller sending G.711 speech from a
pcap and a pjsua2 agent sending a 1 kHz tone is recorded to a stereo WAV,
caller left and agent right; a server killed mid-call leaves nothing indexed
and the next start sweeps its temporary file; an unwritable recordings folder
is reported while the call goes on."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import struct
import wave
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client.parser import text_string_to_metric_families

from pbx.media.codecs import decode_to_pcm16
from tests.support.phone import Phone
from tests.support.server import Server, queue_settings, start_server
from tests.support.sipp import SippProcess, start_sipp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
SIPP = Path(__file__).parent / "sipp"
PCAP = Path("/usr/share/sip-tester/g711a.pcap")
QUEUE = "7000"
AGENT = ("1001", "secret-1001")


async def recording_server(folder: Path) -> Server:
    return await start_server(
        folder,
        sounds={"dir": str(SOUNDS)},
        extensions={AGENT[0]: {"name": "Agent", "password": AGENT[1]}},
        inbound={QUEUE: "queue:support"},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
        queues={"support": queue_settings([AGENT[0]], record=True)},
        recording={"stereo": True},
        log_level="INFO",
    )


async def answered_queue_call(server: Server, agent: Phone, *, seconds: float) -> tuple[SippProcess, int]:
    """A SIPp caller from the carrier sends the pcap for ``seconds`` into the
    queue; the agent answers sending a 1 kHz tone."""
    caller = await start_sipp(
        SIPP / "trunk_inbound.xml",
        server.sip,
        local_ip="127.0.0.2",
        service=QUEUE,
        calls=1,
        timeout=seconds + 30,
        ready_timeout=0,
        extra=("-set", "duration", str(int(seconds * 1000))),
    )
    incoming = await agent.wait_event("incoming", timeout=15)
    await agent.play_tone(incoming["call"], 1000)
    await agent.answer(incoming["call"])
    await agent.wait_event("call_state", call=incoming["call"], state="confirmed")
    return caller, incoming["call"]


def recordings(server: Server) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from recordings")]


def pcap_audio(path: Path) -> npt.NDArray[np.float64]:
    """The G.711 A-law audio of an RTP pcap (Ethernet, IPv4, UDP), as samples."""
    data = path.read_bytes()
    offset, payloads = 24, []
    while offset < len(data):
        length = struct.unpack_from("<I", data, offset + 8)[0]
        packet = data[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ip = packet[14:]
        udp = ip[(ip[0] & 0x0F) * 4 :]
        payloads.append(udp[8 + 12 :])
    return decode_to_pcm16("PCMA", b"".join(payloads)).astype(np.float64)


def spectrum(samples: npt.NDArray[np.float64], size: int = 256) -> npt.NDArray[np.float64]:
    """Average magnitude spectrum over Hann-windowed blocks, normalized."""
    blocks = [samples[i : i + size] for i in range(0, len(samples) - size, size // 2)]
    average = np.mean([np.abs(np.fft.rfft(b * np.hanning(size))) for b in blocks], axis=0)
    average[0] = 0.0
    return average / np.linalg.norm(average)  # type: ignore[no-any-return]


def channels(path: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int]:
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 2 and wav.getsampwidth() == 2
        rate = wav.getframerate()
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    return frames[0::2], frames[1::2], rate


async def test_a_queue_call_is_recorded_in_stereo_caller_left_agent_right(tmp_path: Path) -> None:
    server = await recording_server(tmp_path / "pbx")
    async with await Phone.start(name="agent") as agent:
        try:
            await agent.register(server.sip, *AGENT)
            caller, _ = await answered_queue_call(server, agent, seconds=6)
            assert (await caller.wait(30)).returncode == 0
            saved = await server.wait_log(r"recording \S+ saved: recordings/\d{4}/\d\d/\d\d/\S+\.wav")

            [row] = recordings(server)
            assert row["id"] in saved and row["queue"] == "support" and row["agent"] == AGENT[0]
            assert row["caller"] == "+15557654321" and row["callee"] == QUEUE and row["channels"] == 2
            path = server.folder / row["path"]
            assert row["bytes"] == path.stat().st_size
            left, right, rate = channels(path)
            assert rate == 8000
            assert abs(len(left) / rate - row["seconds"]) < 0.05
            assert 4.5 < row["seconds"] < 6.5

            # Right: the agent's 1 kHz tone. Left: the caller's speech from the
            # pcap, its spectrum (not the tone's) and nothing of the tone.
            freqs = np.fft.rfftfreq(256, 1 / rate)
            assert abs(freqs[np.argmax(spectrum(right))] - 1000) <= rate / 256
            speech = spectrum(pcap_audio(PCAP))
            assert float(np.dot(spectrum(left), speech)) > 0.9
            assert float(np.dot(spectrum(right), speech)) < 0.5
            tone_band = np.abs(freqs - 1000) <= 40
            assert spectrum(left)[tone_band].max() < 0.5 * spectrum(right)[tone_band].max()
            assert await server.metric("pbx_recordings_total") == 1
        finally:
            await server.stop()


async def test_a_server_killed_mid_call_indexes_nothing_and_the_next_start_sweeps_the_partial_file(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "pbx"
    server = await recording_server(folder)
    async with await Phone.start(name="agent") as agent:
        await agent.register(server.sip, *AGENT)
        caller, _ = await answered_queue_call(server, agent, seconds=30)
        try:
            # Wait for audio to reach the temporary file (the writer flushes each second).
            async with asyncio.timeout(10):
                while not (parts := list(folder.glob("recordings/**/.*.part"))) or parts[0].stat().st_size <= 44:
                    await asyncio.sleep(0.2)
            os.kill(server.proc.pid, signal.SIGKILL)
            await server.proc.wait()
        finally:
            await caller.stop(grace=0)
    assert recordings(server) == []
    assert not list(folder.glob("recordings/**/*.wav"))

    server = await recording_server(folder)
    try:
        await server.wait_log(r"removed 1 unfinished recording/voicemail files")
        assert not list(folder.glob("recordings/**/.*.part"))
        assert recordings(server) == []
    finally:
        await server.stop()


async def test_an_unwritable_recordings_folder_is_reported_and_the_call_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "pbx"
    folder.mkdir()
    (folder / "recordings").write_text("a file where the folder should be")
    server = await recording_server(folder)
    async with await Phone.start(name="agent") as agent:
        try:
            await agent.register(server.sip, *AGENT)
            caller, call = await answered_queue_call(server, agent, seconds=4)
            await server.wait_log(r"recording \S+ failed")
            await agent.record(call, tmp_path / "agent-hears.wav")
            result = await caller.wait(30)
            await agent.wait_event("call_state", call=call, state="disconnected")
            assert result.returncode == 0  # the caller finished its call and hung up itself
            await agent.stop_record(call)
            with wave.open(str(tmp_path / "agent-hears.wav"), "rb") as heard:
                samples = np.frombuffer(heard.readframes(heard.getnframes()), dtype="<i2")
            assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300  # the caller's speech got through
            assert recordings(server) == []
            status, text = await server.http("/metrics")
            assert status == 200
            values = {
                s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            }
            assert values["pbx_recording_failures_total"] == 1
            assert values["pbx_recordings_total"] == 0
        finally:
            await server.stop()


async def test_an_extension_with_record_has_its_calls_recorded_caller_left(tmp_path: Path) -> None:
    server = await start_server(
        tmp_path / "pbx",
        extensions={
            "1001": {"name": "Alice", "password": "secret-1001", "record": True},
            "1002": {"name": "Bob", "password": "secret-1002"},
        },
        log_level="INFO",
    )
    async with await Phone.start(name="alice") as alice, await Phone.start(name="bob") as bob:
        try:
            await alice.register(server.sip, "1001", "secret-1001")
            await bob.register(server.sip, "1002", "secret-1002")
            call = await alice.call("sip:1002@pbx.local")
            await alice.play_tone(call, 1000)
            incoming = await bob.wait_event("incoming")
            await bob.play_tone(incoming["call"], 500)
            await bob.answer(incoming["call"])
            await alice.wait_event("call_state", call=call, state="confirmed")
            await asyncio.sleep(3)  # the call's length
            await alice.hangup(call)
            await server.wait_log(r"recording \S+ saved")

            [row] = recordings(server)
            assert (row["caller"], row["callee"], row["queue"], row["agent"]) == ("1001", "1002", None, None)
            left, right, rate = channels(server.folder / row["path"])
            freqs = np.fft.rfftfreq(256, 1 / rate)
            assert abs(freqs[np.argmax(spectrum(left))] - 1000) <= rate / 256
            assert abs(freqs[np.argmax(spectrum(right))] - 500) <= rate / 256
        finally:
            await server.stop()
