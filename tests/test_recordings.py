"""The call recorder with real peers of its own: Store on disk, EventBus, Metrics,
MediaClock and RelaySides; only the audio is synthetic.

Most tests drive the media clock by hand (``clock.tick``), so every packet's
place in the file is known to the sample and assertions can be exact; one
runs the real clock and the flush timer. ``await recorder.end()`` is the sync
point: it returns once the file is written and its row stored.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import wave
import warnings
import weakref
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from G722 import G722 as G722Codec

from pbx.config.load import load_config
from pbx.config.model import Config, RecordingConfig
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.codecs import G722, PCMA, PCMU, Codec
from pbx.media.relay import RtpRelay
from pbx.media.relay_side import RelaySide
from pbx.metrics import Metrics
from pbx.recordings.recorder import Recorder, Recording
from pbx.store.db import Store

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

Samples = npt.NDArray[np.int16]
FRAME = 160
# What a peer sends during one tick: a packet, several (jitter), or nothing.
Arrivals = bytes | list[bytes] | None
START_TICK = 1000  # not 0, so positions must be relative to the recording's first tick


# --- helpers ---


@dataclass
class Rig:
    config: Config
    store: Store
    events: EventBus
    metrics: Metrics
    clock: MediaClock
    relay: RtpRelay
    recorder: Recorder
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.config.storage.data_dir

    def metric(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value

    def begin(self, call_id: str = "call-1@pbx.local") -> Recording:
        return self.recorder.begin(
            call_id, self.relay.a, self.relay.b, queue="sales", agent_ext="1001", caller_id="+15550100", callee="600"
        )

    def play(self, caller: Sequence[Arrivals], agent: Sequence[Arrivals]) -> None:
        """One clock tick per element: what each side's peer sends during it, then the next tick."""
        for index in range(max(len(caller), len(agent))):
            for side, arrivals in ((self.relay.a, caller), (self.relay.b, agent)):
                packets = arrivals[index] if index < len(arrivals) else None
                for packet in [packets] if isinstance(packets, bytes) else packets or ():
                    send(side, packet)
            self.clock.tick += 1

    async def rows(self) -> list[dict[str, Any]]:
        return await self.store.rows("recordings")


def send(side: RelaySide, payload: bytes, payload_type: int | None = None) -> None:
    assert side.on_audio is not None and side.codec is not None
    side.on_audio(payload, side.codec.payload_type if payload_type is None else payload_type)


def tone(freq: float, frames: int, rate: int = 8000, amplitude: float = 0.3) -> Samples:
    t = np.arange(frames * rate // 50) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def encode(codec: Codec, samples: Samples) -> list[bytes]:
    """20 ms payloads of ``samples`` (8 kHz for G.711, 16 kHz for G.722)."""
    pcm = samples.astype("<i2").tobytes()
    if codec is PCMU:
        data = audioop.lin2ulaw(pcm, 2)
    elif codec is PCMA:
        data = audioop.lin2alaw(pcm, 2)
    else:
        data = bytes(G722Codec(16000, 64000).encode(array("h", pcm)))
    return [data[i : i + FRAME] for i in range(0, len(data), FRAME)]


def decoded(codec: Codec, payloads: Sequence[bytes]) -> Samples:
    """What the recording should hold for G.711 ``payloads``, decoded independently."""
    convert = audioop.ulaw2lin if codec is PCMU else audioop.alaw2lin
    return np.frombuffer(b"".join(convert(p, 2) for p in payloads), dtype="<i2")


def read_wav(path: Path) -> tuple[int, int, list[Samples]]:
    """(channels, rate, samples per channel)."""
    with wave.open(str(path), "rb") as wav:
        assert wav.getsampwidth() == 2
        channels, rate = wav.getnchannels(), wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return channels, rate, [data[c::channels] for c in range(channels)]


def spectrum(samples: Samples, rate: int = 8000) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    values = samples.astype(np.float64)
    magnitude = np.abs(np.fft.rfft((values - values.mean()) * np.hanning(values.size)))
    return np.fft.rfftfreq(values.size, 1 / rate), magnitude


def peak(samples: Samples) -> float:
    freqs, magnitude = spectrum(samples)
    return float(freqs[np.argmax(magnitude)])


def day_folder(data_dir: Path) -> Path:
    return data_dir / "recordings" / datetime.now(UTC).strftime("%Y/%m/%d")


def all_files(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if not p.is_dir())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    # The database outside data/, whose files the tests list.
    (tmp_path / "pbx.yaml").write_text(f"storage: {{data_dir: data, db: {tmp_path / 'pbx.db'}}}\nrecording: {{stereo: true, retention_days: 30}}\n")
    config = load_config(tmp_path / "pbx.yaml", env={})
    store = Store(config.storage.db)
    await store.open()
    events = EventBus()
    metrics = Metrics(events)
    clock = MediaClock()
    clock.tick = START_TICK
    relay = RtpRelay(clock)  # no sockets: the test hands audio to on_audio itself
    relay.a.set_remote(("192.0.2.10", 40000), PCMU, 101)
    relay.b.set_remote(("192.0.2.20", 40002), PCMA, 101)
    holder: list[Rig] = []
    recorder = Recorder(config=lambda: holder[0].config, store=store, events=events, clock=clock)
    rig = Rig(config, store, events, metrics, clock, relay, recorder)
    holder.append(rig)
    for name in ("recording_saved", "recording_failed"):
        events.subscribe(name, lambda name=name, **fields: rig.seen.append((name, fields)))
    yield rig
    await recorder.stop()
    await clock.stop()
    await store.close()


# --- tests ---


async def test_stereo_recording_puts_caller_left_and_agent_right(rig: Rig) -> None:
    caller = encode(PCMU, tone(1000, 100))
    agent = encode(PCMA, tone(400, 100))
    recording = rig.begin()
    rig.play(caller[:50], agent[:50])
    send(rig.relay.a, bytes(160), 13)  # comfort noise: not audio, not recorded
    rig.play(caller[50:], agent[50:])

    row = await rig.recorder.end(recording)

    assert row is not None and not recording.failed
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    assert row["path"] == f"recordings/{day}/call-1@pbx.local.wav"
    assert all_files(rig.data_dir) == [row["path"]]  # renamed, no .part left
    channels, rate, (left, right) = read_wav(rig.data_dir / row["path"])
    assert (channels, rate) == (2, 8000)
    assert left.size == 100 * FRAME  # 2.0 s to the sample: comfort noise added nothing
    assert abs(peak(left) - 1000) < 5 and abs(peak(right) - 400) < 5
    np.testing.assert_array_equal(left, decoded(PCMU, caller))
    np.testing.assert_array_equal(right, decoded(PCMA, agent))
    assert await rig.rows() == [row]
    started = datetime.fromisoformat(row["started"])
    assert abs((datetime.now(UTC) - started).total_seconds()) < 10 and row["started"].endswith(".%03d+00:00" % (started.microsecond // 1000))
    assert row | {"started": None} == {
        "id": "call-1@pbx.local",
        "call_id": "call-1@pbx.local",
        "queue": "sales",
        "agent": "1001",
        "caller": "+15550100",
        "callee": "600",
        "started": None,
        "seconds": 2.0,
        "bytes": (rig.data_dir / row["path"]).stat().st_size,
        "channels": 2,
        "path": row["path"],
    }
    assert [(name, fields["call_id"], fields["seconds"]) for name, fields in rig.seen] == [("recording_saved", "call-1@pbx.local", 2.0)]
    assert rig.metric("pbx_recordings_total") == 1
    assert rig.metric("pbx_recording_failures_total") == 0
    assert rig.relay.a.on_audio is None and rig.relay.b.on_audio is None
    assert await rig.recorder.end(recording) == row  # a second end() gives the same answer


async def test_mono_recording_mixes_both_sides(rig: Rig) -> None:
    rig.config = replace(rig.config, recording=RecordingConfig("wav", stereo=False, retention_days=30))
    caller = encode(PCMU, tone(1000, 100))
    agent = encode(PCMA, tone(400, 100))
    recording = rig.begin()
    rig.play(caller, agent)

    row = await rig.recorder.end(recording)

    assert row is not None and row["channels"] == 1
    channels, rate, (mono,) = read_wav(rig.data_dir / row["path"])
    assert (channels, rate) == (1, 8000)
    expected = np.clip(decoded(PCMU, caller).astype(np.int32) + decoded(PCMA, agent), -32768, 32767)
    np.testing.assert_array_equal(mono, expected)
    freqs, magnitude = spectrum(mono)
    floor = np.median(magnitude)
    for freq in (400, 1000):
        assert magnitude[np.abs(freqs - freq) < 5].max() > 100 * floor, freq


async def test_gap_becomes_silence_in_place_and_channels_stay_aligned(rig: Rig) -> None:
    caller = encode(PCMU, tone(1000, 140))  # hangs up 0.2 s before the agent side stops
    agent = encode(PCMA, tone(400, 150))
    gapped: list[Arrivals] = [*agent[:50], *[None] * 50, *agent[100:]]  # 1 s without packets
    recording = rig.begin()
    rig.play(caller[:75], gapped[:75])
    await rig.recorder.flush()  # mid-gap: what is final is written now, the rest later
    rig.play(caller[75:130], gapped[75:130])
    await rig.recorder.flush()
    rig.play(caller[130:], gapped[130:])

    row = await rig.recorder.end(recording)

    assert row is not None and row["seconds"] == 3.0
    _, _, (left, right) = read_wav(rig.data_dir / row["path"])
    assert left.size == right.size == 150 * FRAME  # padded to the longer channel
    np.testing.assert_array_equal(left[: 140 * FRAME], decoded(PCMU, caller))
    assert not left[140 * FRAME :].any()
    np.testing.assert_array_equal(right[: 50 * FRAME], decoded(PCMA, agent[:50]))
    assert not right[50 * FRAME : 100 * FRAME].any()
    np.testing.assert_array_equal(right[100 * FRAME :], decoded(PCMA, agent[100:]))


async def test_silent_side_jitter_and_pause(rig: Rig) -> None:
    caller = encode(PCMU, tone(1000, 100))
    # Two packets every other tick: jitter, not gaps, so nothing is inserted.
    bursty: list[Arrivals] = []
    for first in range(0, 100, 2):
        bursty += [[caller[first], caller[first + 1]], None]
    recording = rig.begin()
    rig.play(bursty[:40], [])
    recording.pause()  # card number: silence, the time keeps running
    rig.play(bursty[40:70], [])
    recording.resume()
    rig.play(bursty[70:], [])

    row = await rig.recorder.end(recording)

    assert row is not None
    _, _, (left, right) = read_wav(rig.data_dir / row["path"])
    assert left.size == 100 * FRAME
    assert not right.any()  # the agent side sent nothing
    np.testing.assert_array_equal(left[: 40 * FRAME], decoded(PCMU, caller[:40]))
    assert not left[40 * FRAME : 70 * FRAME].any()
    np.testing.assert_array_equal(left[70 * FRAME :], decoded(PCMU, caller[70:]))


async def test_call_id_unsafe_in_file_names_stays_in_its_folder(rig: Rig) -> None:
    recording = rig.begin("../../etc/.passwd")
    rig.play(encode(PCMU, tone(1000, 10)), [])

    row = await rig.recorder.end(recording)

    assert row is not None and row["id"] == "../../etc/.passwd"
    path = rig.data_dir / row["path"]
    assert path.parent == day_folder(rig.data_dir) and path.is_file()
    assert not path.name.startswith(".") and "/" not in path.name
    assert all_files(rig.data_dir) == [row["path"]]


async def test_same_call_recorded_twice_never_overwrites(rig: Rig) -> None:
    first = rig.begin()
    rig.play(encode(PCMU, tone(1000, 10)), [])
    row = await rig.recorder.end(first)
    second = rig.begin()
    rig.play(encode(PCMU, tone(1000, 20)), [])

    # One row per call id: the second file is kept but cannot be listed.
    assert await rig.recorder.end(second) is None and second.failed
    assert row is not None and await rig.rows() == [row]
    assert (rig.data_dir / row["path"]).stat().st_size == row["bytes"]
    assert all_files(rig.data_dir) == sorted([row["path"], row["path"].replace(".wav", "-2.wav")])


async def test_folder_blocked_by_a_file_fails_the_recording_quietly(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.data_dir.mkdir()
    (rig.data_dir / "recordings").write_text("not a folder")
    recording = rig.begin()
    rig.play(encode(PCMU, tone(1000, 20)), encode(PCMA, tone(400, 20)))

    with caplog.at_level(logging.ERROR, logger="pbx.recordings"):
        assert await rig.recorder.end(recording) is None

    assert recording.failed and recording.error
    assert await rig.rows() == []
    assert all_files(rig.data_dir) == ["recordings"]
    assert rig.seen == [("recording_failed", {"call_id": "call-1@pbx.local", "error": recording.error})]
    assert rig.metric("pbx_recording_failures_total") == 1
    assert rig.metric("pbx_recordings_total") == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"recording call-1@pbx.local failed: {recording.error}"]
    assert rig.relay.a.on_audio is None and rig.relay.b.on_audio is None


async def test_disk_full_is_noticed_during_the_call(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    folder = day_folder(rig.data_dir)
    folder.mkdir(parents=True)
    partial = folder / ".call-1@pbx.local.wav.part"
    partial.symlink_to("/dev/full")  # every write: ENOSPC, even for root
    recording = rig.begin()
    caller, agent = encode(PCMU, tone(1000, 100)), encode(PCMA, tone(400, 100))

    with caplog.at_level(logging.ERROR, logger="pbx.recordings"):
        rig.play(caller[:60], agent[:60])
        await rig.recorder.flush()  # 0.7 s are final: written, and refused
        assert recording.failed and "No space left on device" in (recording.error or "")
        assert rig.seen == [("recording_failed", {"call_id": "call-1@pbx.local", "error": recording.error})]
        rig.play(caller[60:], agent[60:])  # the call goes on; its audio is dropped
        assert await rig.recorder.end(recording) is None

    assert not os.path.lexists(partial) and os.path.exists("/dev/full")
    assert all_files(rig.data_dir) == []
    assert await rig.rows() == []
    assert len(rig.seen) == 1 and rig.metric("pbx_recording_failures_total") == 1
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


async def test_start_removes_leftovers_and_retention_removes_old_recordings(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    data = rig.data_dir
    now = datetime.now(UTC)
    old_started, recent_started = now - timedelta(days=31), now - timedelta(days=29)
    leftovers = [data / "recordings/2020/01/01/.crashed.wav.part", data / "voicemail/1001/.msg.wav.part"]
    kept = [data / "recordings/2020/01/02/finished.wav"]  # a finished file: not ours to judge
    for started, name in ((old_started, "old"), (recent_started, "recent")):
        relative = f"recordings/{started:%Y/%m/%d}/{name}.wav"
        kept.append(data / relative)
        await rig.store.insert(
            "recordings",
            {"id": name, "call_id": name, "queue": None, "agent": None, "caller": "1", "callee": "2",
             "started": started.isoformat(timespec="milliseconds"), "seconds": 1.0, "bytes": 4,
             "channels": 2, "path": relative},
        )  # fmt: skip
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")

    with caplog.at_level(logging.INFO, logger="pbx.recordings"):
        await rig.recorder.start()

    assert [p for p in leftovers if p.exists()] == []
    old = data / f"recordings/{old_started:%Y/%m/%d}/old.wav"
    assert [p for p in kept if not p.exists()] == [old]
    assert not old.parent.exists()  # its emptied date folder went too
    assert [r["id"] for r in await rig.rows()] == ["recent"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("removed 2 unfinished" in m for m in messages), messages
    assert any("deleted 1 recordings older than 30 days" in m for m in messages), messages

    rig.config = replace(rig.config, recording=RecordingConfig("wav", stereo=True, retention_days=0))
    assert await rig.recorder.apply_retention() == 0  # 0 keeps everything
    assert [r["id"] for r in await rig.rows()] == ["recent"]


async def test_g722_is_decoded_to_8khz(rig: Rig) -> None:
    rig.relay.a.set_remote(("192.0.2.10", 40000), G722, 101)
    caller = encode(G722, tone(1500, 100, rate=16000))
    agent = encode(PCMU, tone(400, 100))
    rig.relay.b.set_remote(("192.0.2.20", 40002), PCMU, 101)
    recording = rig.begin()
    rig.play(caller, agent)

    row = await rig.recorder.end(recording)

    assert row is not None
    channels, rate, (left, right) = read_wav(rig.data_dir / row["path"])
    assert (channels, rate) == (2, 8000)
    assert abs(left.size / rate - 2.0) < 0.1
    assert abs(peak(left[800:]) - 1500) < 5 and abs(peak(right) - 400) < 5
    assert np.sqrt(np.mean(left[800:].astype(np.float64) ** 2)) > 0.15 * 32767  # the tone, not a faint alias


async def test_real_clock_and_flush_timer(rig: Rig) -> None:
    recorder = Recorder(config=lambda: rig.config, store=rig.store, events=rig.events, clock=rig.clock, flush_interval=0.1)
    caller = encode(PCMU, tone(1000, 50))
    agent = encode(PCMA, tone(400, 50))
    sent = 0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_tick(tick: int) -> None:
        nonlocal sent
        if sent < len(caller):
            send(rig.relay.a, caller[sent])
            send(rig.relay.b, agent[sent])
            sent += 1
        elif not done.done():
            done.set_result(None)

    rig.clock.start()
    recording = recorder.begin("timed", rig.relay.a, rig.relay.b, queue=None, agent_ext=None, caller_id="1", callee="2")
    subscription = rig.clock.subscribe(on_tick)
    await asyncio.wait_for(done, 10)
    rig.clock.unsubscribe(subscription)
    try:
        row = await recorder.end(recording)
    finally:
        await recorder.stop()

    assert row is not None and row["queue"] is None and row["agent"] is None
    _, _, (left, right) = read_wav(rig.data_dir / row["path"])
    # Ticks the loop skipped under load may add silence; never lose audio.
    assert 1.0 <= left.size / 8000 < 1.0 + 0.1 + rig.clock.skipped * 0.02
    assert abs(peak(left) - 1000) < 10 and abs(peak(right) - 400) < 10


async def test_an_ended_recording_is_freed_without_the_garbage_collector(rig: Rig) -> None:
    recording = rig.begin()
    rig.play(encode(PCMU, tone(1000, 5)), encode(PCMA, tone(400, 5)))
    assert await rig.recorder.end(recording) is not None
    gone = weakref.ref(recording)
    gc.disable()  # what its taps' closures held in a cycle would wait for a full collection
    try:
        del recording
        assert gone() is None
    finally:
        gc.enable()
