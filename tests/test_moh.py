"""Music on hold: one shared, looping stream per class, each listener's side
picking the frame of the tick in its own clock callback.

Real relays, UDP sockets on loopback, the real MediaClock and a real
PromptLibrary reading class folders written here. The music is frequency
sweeps, so every 20 ms frame of a class is different and a received payload
tells its position in the loop. The clock ticks in which a side sent a frame
come from the side's ``played`` count, read by a clock subscriber that runs
after the sides'.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import wave
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from aiortp import RtpPacket

from pbx.media.clock import ClockSubscription, MediaClock, TickCallback
from pbx.media.codecs import G722, PCMU, Codec
from pbx.media.moh import MusicOnHold
from pbx.media.ports import RtpPortPool
from pbx.media.prompts import PromptLibrary
from pbx.media.relay import RtpRelay
from pbx.media.relay_side import RelaySide
from tests.support.rtp_peer import HOST, PHONE_SSRC, RtpPhone, assert_one_stream, open_phone, until
from tests.test_media import free_range

CLASS = "test"
# The files of CLASS in the order they must play: file name order, not the order written.
CLASS_FILES = ("a-low", "b-high")
MOH_MODULE = "pbx.media.moh"
SIDE_MODULE = "pbx.media.playback"  # where a side's own clock callback comes from


# --- helpers ---


def write_sweep(path: Path, start: float, end: float, seconds: float, rate: int = 8000) -> None:
    """A mono 16-bit WAV sweeping linearly from ``start`` to ``end`` Hz."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (start * t + (end - start) * t**2 / (2 * seconds))
    samples = np.round(0.5 * 32767 * np.sin(phase)).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


class CountingClock(MediaClock):
    """The real clock, noting which module each live subscription comes from."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[ClockSubscription, str] = {}
        self.subscribed: Counter[str] = Counter()  # subscribe() calls per module

    def subscribe(self, callback: TickCallback) -> ClockSubscription:
        handle = super().subscribe(callback)
        module = getattr(callback, "__module__", "")
        self.live[handle] = module
        self.subscribed[module] += 1
        return handle

    def unsubscribe(self, handle: ClockSubscription) -> None:
        super().unsubscribe(handle)
        self.live.pop(handle, None)

    def sides_on_clock(self) -> int:
        """Relay sides the clock calls now: those sending music (or anything of their own)."""
        return sum(module == SIDE_MODULE for module in self.live.values())


class SentTicks:
    """The clock tick in which each side sent each frame: ``tick_of[i][n]`` of side i's n-th (from 0).

    Create it after the sides' clock subscriptions (their first music,
    prompt or silence) so that it runs last in each tick; frames sent before
    it have no tick.
    """

    def __init__(self, clock: MediaClock, *sides: RelaySide) -> None:
        self.sides = sides
        self.tick_of: list[dict[int, int]] = [{} for _ in sides]
        self.most = 0  # the most frames one side sent in one tick
        self._counts = [side.played for side in sides]
        self._clock = clock
        self._handle = clock.subscribe(self._tick)

    def _tick(self, tick: int) -> None:
        for i, side in enumerate(self.sides):
            new = side.played - self._counts[i]
            for n in range(self._counts[i], side.played):
                self.tick_of[i][n] = tick
            self._counts[i] = side.played
            self.most = max(self.most, new)

    def by_tick(self, i: int, packets: Sequence[RtpPacket]) -> dict[int, RtpPacket]:
        """Side i's packets (all it sent, in order) by the tick each was sent in."""
        return {self.tick_of[i][n]: p for n, p in enumerate(packets) if n in self.tick_of[i]}

    def close(self) -> None:
        self._clock.unsubscribe(self._handle)


async def ticks(clock: MediaClock, count: int) -> None:
    """Wait until ``count`` more clock ticks have run completely."""
    passed = asyncio.get_running_loop().create_future()
    seen = itertools.count(1)

    def tick(_: int) -> None:
        if next(seen) == count and not passed.done():
            passed.set_result(None)

    handle = clock.subscribe(tick)
    try:
        await asyncio.wait_for(passed, 0.1 + count * 0.1)
    finally:
        clock.unsubscribe(handle)


async def receive(phone: RtpPhone, count: int) -> list[RtpPacket]:
    return [await phone.recv() for _ in range(count)]


def positions(packets: Sequence[RtpPacket], music: Sequence[bytes]) -> list[int]:
    """Where in the loop each packet's payload is (ValueError: not music of that loop)."""
    return [music.index(p.payload) for p in packets]


def runs(packets: Sequence[RtpPacket], music: Sequence[bytes]) -> list[tuple[str, int]]:
    """The packets as runs of music ("M") and other frames ("A"): [("M", 4), ("A", 6), ...]."""
    music_set = set(music)
    kinds = ["M" if p.payload in music_set else "A" for p in packets]
    return [(kind, len(list(run))) for kind, run in itertools.groupby(kinds)]


@dataclass
class Caller:
    """A phone with its own relay; side ``a`` faces the phone."""

    relay: RtpRelay
    phone: RtpPhone

    @property
    def side(self) -> RelaySide:
        return self.relay.a


Connect = Callable[..., Awaitable[Caller]]


@pytest.fixture
def sounds(tmp_path: Path) -> Path:
    """A sounds folder with classes "test" (two files), "other" (one) and "empty"."""
    root = tmp_path / "sounds"
    test = root / "moh" / CLASS
    test.mkdir(parents=True)
    # Written out of order; a hidden file and a text file are no music.
    write_sweep(test / "b-high.wav", 1600, 3000, 0.5)
    write_sweep(test / "a-low.wav", 300, 1500, 0.5)
    write_sweep(test / ".hidden.wav", 500, 600, 0.5)
    (test / "notes.txt").write_text("not music\n")
    (root / "moh" / "other").mkdir()
    write_sweep(root / "moh" / "other" / "tone.wav", 3000, 3800, 0.3)
    (root / "moh" / "empty").mkdir()
    (root / "moh" / "empty" / "README.md").write_text("put music here\n")
    return root


@pytest.fixture
async def clock() -> AsyncIterator[CountingClock]:
    clock = CountingClock()
    clock.start()
    yield clock
    await clock.stop()


@pytest.fixture
def library(sounds: Path, tmp_path: Path) -> PromptLibrary:
    return PromptLibrary(sounds, None, tmp_path / "cache")


@pytest.fixture
def moh(clock: CountingClock, library: PromptLibrary) -> MusicOnHold:
    return MusicOnHold(clock, lambda: library)


@pytest.fixture
async def connect(clock: CountingClock) -> AsyncIterator[Connect]:
    low, high = free_range(8)
    pool = RtpPortPool(HOST, low, high)
    callers: list[Caller] = []

    async def connect(codec: Codec = PCMU) -> Caller:
        relay = await RtpRelay.create(pool, clock)
        phone = await open_phone()
        relay.a.set_remote(phone.addr, codec, 101)
        callers.append(Caller(relay, phone))
        return callers[-1]

    yield connect
    for caller in callers:
        caller.relay.close()
        caller.phone.transport.close()


async def class_music(library: PromptLibrary, codec: str = "PCMU", files: Sequence[str] = CLASS_FILES) -> list[bytes]:
    """What the class must play: its files' frames, concatenated in file name order."""
    music: list[bytes] = []
    for name in files:
        music += await library.frames(f"moh/{CLASS}/{name}", codec)
    assert len(set(music)) == len(music), "every frame of the test music is different"
    return music


def announcement(count: int) -> list[bytes]:
    return [bytes([0xF0 + i]) * 160 for i in range(count)]


# --- one stream per class ---


async def test_listeners_share_one_stream(moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary) -> None:
    music = await class_music(library)
    assert len(music) == 50  # 2 x 0.5 s: the hidden file is not part of it
    first, second = await connect(), await connect()

    await moh.join(CLASS, first.side, "PCMU")
    early = await receive(first.phone, 5)
    await moh.join(CLASS, second.side, "PCMU")
    sent = SentTicks(clock, first.side, second.side)
    heard_first = early + await receive(first.phone, 15)
    heard_second = await receive(second.phone, 12)
    sent.close()
    assert clock.subscribed[MOH_MODULE] == 0  # nothing of the class runs per tick

    # The first listener starts the class at the top of the loop, files in
    # name order; the second comes in where the class is, not at the top.
    assert positions(heard_first, music) == list(range(20))
    start = positions(heard_second, music)[0]
    assert start >= 5
    assert positions(heard_second, music) == list(range(start, start + 12))
    assert_one_stream(heard_second, PCMU.payload_type, clock)
    # Both got the very same frames of the class, not copies.
    assert all(any(p.payload == frame for frame in music) for p in heard_first + heard_second)

    # In each tick both got the same frame.
    by_tick_first, by_tick_second = sent.by_tick(0, heard_first), sent.by_tick(1, heard_second)
    common = sorted(by_tick_first.keys() & by_tick_second.keys())
    assert len(common) >= 3
    assert [by_tick_first[t].payload for t in common] == [by_tick_second[t].payload for t in common]
    assert sent.most == 1


async def test_the_loop_wraps_around(moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary) -> None:
    music = await class_music(library)
    caller = await connect()
    skipped_before = clock.skipped
    await moh.join(CLASS, caller.side, "PCMU")
    heard = await receive(caller.phone, 60)
    skipped = clock.skipped - skipped_before
    if skipped == 0:
        assert positions(heard, music) == [i % 50 for i in range(60)]
    else:  # a late loop: the loop moves on with the clock, one frame for each tick skipped
        at = positions(heard, music)
        steps = [(b - a) % 50 for a, b in itertools.pairwise(at)]
        assert at[0] + sum(step - 1 for step in steps) == skipped
        assert any(b < a for a, b in itertools.pairwise(at))  # it wrapped around
    assert_one_stream(heard, PCMU.payload_type, clock)


async def test_codecs_share_the_position(moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary) -> None:
    pcmu, g722 = await class_music(library, "PCMU"), await class_music(library, "G722")
    narrow, wide = await connect(PCMU), await connect(G722)
    await moh.join(CLASS, narrow.side, "PCMU")
    early = await receive(narrow.phone, 3)
    await moh.join(CLASS, wide.side, "G722")
    sent = SentTicks(clock, narrow.side, wide.side)
    heard_wide = await receive(wide.phone, 10)
    heard_narrow = early + await receive(narrow.phone, 10)
    sent.close()

    assert {p.payload_type for p in heard_wide} == {G722.payload_type}
    wide_at = {t: g722.index(p.payload) for t, p in sent.by_tick(1, heard_wide).items()}
    narrow_at = {t: pcmu.index(p.payload) for t, p in sent.by_tick(0, heard_narrow).items()}
    common = wide_at.keys() & narrow_at.keys()
    assert len(common) >= 3
    assert all(wide_at[t] == narrow_at[t] for t in common)


async def test_joining_another_class_moves_the_listener(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary
) -> None:
    music = await class_music(library)
    other = list(await library.frames("moh/other/tone", "PCMU"))
    caller = await connect()
    await moh.join(CLASS, caller.side, "PCMU")
    heard = [await caller.phone.recv()]

    await moh.join("other", caller.side, "PCMU")
    moved_at = caller.side.played
    assert clock.sides_on_clock() == 1
    heard += await receive(caller.phone, moved_at - 1 + 10)
    before, after = heard[:moved_at], heard[moved_at:]
    assert positions(before, music) == list(range(moved_at))
    assert positions(after, other) == list(range(10))  # a class of its own, from its top
    assert_one_stream(heard, PCMU.payload_type, clock)  # the move is seamless


# --- leaving ---


async def test_leave_stops_one_listener_and_takes_it_off_the_clock(
    moh: MusicOnHold, connect: Connect, clock: CountingClock
) -> None:
    first, second = await connect(), await connect()
    await moh.join(CLASS, first.side, "PCMU")
    await moh.join(CLASS, second.side, "PCMU")
    await first.phone.recv()
    await second.phone.recv()

    moh.leave(first.side)
    stopped = first.side.played
    await receive(second.phone, 5)  # the other one plays on
    assert first.side.played == stopped
    assert 1 + first.phone.received.qsize() == stopped  # only what was sent before leave()
    assert clock.sides_on_clock() == 1

    moh.leave(second.side)
    assert clock.sides_on_clock() == 0
    stopped = second.side.played
    await ticks(clock, 5)
    assert second.side.played == stopped
    moh.leave(second.side)  # not listening: a no-op
    moh.leave(first.side)
    assert clock.sides_on_clock() == 0


async def test_a_closed_side_is_dropped(moh: MusicOnHold, connect: Connect, clock: CountingClock) -> None:
    caller = await connect()
    await moh.join(CLASS, caller.side, "PCMU")
    await caller.phone.recv()
    caller.relay.close()
    assert clock.sides_on_clock() == 0
    await moh.join(CLASS, caller.side, "PCMU")  # a join that comes too late does nothing
    assert clock.sides_on_clock() == 0


async def test_leave_while_the_class_loads(moh: MusicOnHold, connect: Connect, clock: CountingClock) -> None:
    caller = await connect()
    joining = asyncio.ensure_future(moh.join(CLASS, caller.side, "PCMU"))
    await asyncio.sleep(0)  # let it start loading
    assert not joining.done()
    moh.leave(caller.side)
    await asyncio.wait_for(joining, 5.0)
    assert clock.sides_on_clock() == 0
    await ticks(clock, 3)
    assert caller.side.played == 0


# --- announcements ---


async def test_announcement_takes_over_and_music_resumes_in_one_stream(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary
) -> None:
    music = await class_music(library)
    caller = await connect()
    await moh.join(CLASS, caller.side, "PCMU")
    packets = await receive(caller.phone, 3)

    playback = caller.side.play(announcement(6))
    sent = SentTicks(clock, caller.side)  # after the side's clock subscription, to run last
    assert await asyncio.wait_for(playback.done, 2.0) is True
    while len(runs(packets, music)) < 3 or runs(packets, music)[-1][1] < 4:
        packets.append(await caller.phone.recv())
    sent.close()

    shape = runs(packets, music)
    assert [kind for kind, _ in shape] == ["M", "A", "M"]
    assert shape[1][1] == 6
    played = [p for p in packets if p.payload not in music]
    assert [p.payload for p in played] == announcement(6)
    # Sequence numbers and timestamps run on; the announcement starts with a marker.
    assert_one_stream(packets, PCMU.payload_type, clock, starts=(shape[0][1],))
    # The class kept going while the caller heard the announcement.
    before, after = packets[: shape[0][1]], packets[shape[0][1] + 6 :]
    assert positions(after, music)[0] - positions(before, music)[-1] == 7
    assert sent.most == 1


async def test_announcement_that_was_playing_when_the_music_started(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary
) -> None:
    music = await class_music(library)
    caller = await connect()
    await moh.join(CLASS, caller.side, "PCMU")  # loads the class
    moh.leave(caller.side)

    playback = caller.side.play(announcement(8))
    packets = [await caller.phone.recv()]
    await moh.join(CLASS, caller.side, "PCMU")
    assert caller.side.playback is playback
    sent = SentTicks(clock, caller.side)
    assert await asyncio.wait_for(playback.done, 2.0) is True
    while runs(packets, music)[-1] != ("M", 4):
        packets.append(await caller.phone.recv())
    sent.close()

    assert runs(packets, music) == [("A", 8), ("M", 4)]
    assert_one_stream(packets, PCMU.payload_type, clock)  # the music goes on in the announcement's stream
    assert sent.most == 1


async def test_music_and_silence_take_turns_one_frame_per_tick(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary
) -> None:
    # A queue caller: answered here (silence), then music, an announcement, silence again.
    music = await class_music(library)
    caller = await connect()
    caller.side.start_filling()
    sent = SentTicks(clock, caller.side)
    packets = await receive(caller.phone, 3)
    await moh.join(CLASS, caller.side, "PCMU")
    while len(runs(packets, music)) < 2 or runs(packets, music)[-1][1] < 5:
        packets.append(await caller.phone.recv())
    playback = caller.side.play(announcement(4))
    assert await asyncio.wait_for(playback.done, 2.0) is True
    while len(runs(packets, music)) < 4 or runs(packets, music)[-1][1] < 3:  # silence, music, announcement, music
        packets.append(await caller.phone.recv())
    moh.leave(caller.side)
    packets += await receive(caller.phone, caller.side.played - len(packets) + 5)
    sent.close()

    silence = b"\xff" * 160
    kinds = ["M" if p.payload in music else "S" if p.payload == silence else "A" for p in packets]
    shape = [(kind, len(list(run))) for kind, run in itertools.groupby(kinds)]
    assert [kind for kind, _ in shape] == ["S", "M", "A", "M", "S"]
    assert shape[2][1] == 4
    assert_one_stream(packets, PCMU.payload_type, clock, starts=(shape[0][1] + shape[1][1],))
    assert sent.most == 1  # never two frames in one tick


async def test_music_still_loading_when_a_person_takes_the_caller_never_plays(
    moh: MusicOnHold, connect: Connect, clock: CountingClock
) -> None:
    # An agent answers (the bridge hands the caller over) while the queue's
    # class is still being decoded: the music must not start over the agent.
    caller = await connect()
    caller.side.start_filling()
    joining = asyncio.ensure_future(moh.join(CLASS, caller.side, "PCMU"))
    await asyncio.sleep(0)  # the join is under way: the class is loading
    assert not joining.done()
    caller.side.hand_over()
    await joining
    assert clock.sides_on_clock() == 0
    played = caller.side.played
    await ticks(clock, 5)
    assert caller.side.played == played


# --- failures ---


@pytest.mark.parametrize(
    ("moh_class", "codec"),
    [("missing", "PCMU"), ("empty", "PCMU"), ("../moh/test", "PCMU"), (CLASS, "OPUS")],
    ids=["missing", "empty", "outside", "codec"],
)
async def test_no_music_is_silence_and_one_warning(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, caplog: pytest.LogCaptureFixture, moh_class: str, codec: str
) -> None:
    caller = await connect()
    with caplog.at_level(logging.WARNING, logger=MOH_MODULE):
        await moh.join(moh_class, caller.side, codec)
    warnings = [r for r in caplog.records if r.name == MOH_MODULE and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "silence" in warnings[0].getMessage()
    assert clock.sides_on_clock() == 0
    await ticks(clock, 5)
    assert caller.side.played == 0
    assert caller.phone.received.empty()


async def test_joining_a_missing_class_stops_the_music(moh: MusicOnHold, connect: Connect, clock: CountingClock) -> None:
    caller = await connect()
    await moh.join(CLASS, caller.side, "PCMU")
    await caller.phone.recv()
    await moh.join("missing", caller.side, "PCMU")
    stopped = caller.side.played
    await ticks(clock, 5)
    assert caller.side.played == stopped
    assert clock.sides_on_clock() == 0


async def test_a_failing_listener_does_not_stop_the_others(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken, fine = await connect(), await connect()
    # A payload type that does not fit the RTP header: building its packet fails.
    broken.side.set_remote(broken.phone.addr, Codec("BROKEN", 300), None)
    with caplog.at_level(logging.ERROR, logger=SIDE_MODULE):
        await moh.join(CLASS, broken.side, "PCMU")
        await moh.join(CLASS, fine.side, "PCMU")
        await receive(fine.phone, 10)
    failures = [r for r in caplog.records if r.name == SIDE_MODULE and r.levelno == logging.ERROR]
    assert len(failures) == 1  # logged once, then the side sends nothing of its own
    assert failures[0].exc_info is not None
    assert broken.phone.received.empty()
    assert clock.sides_on_clock() == 1


async def test_relayed_audio_after_the_music_continues_the_stream(
    moh: MusicOnHold, connect: Connect, clock: CountingClock, library: PromptLibrary
) -> None:
    music = await class_music(library)
    caller = await connect()
    other = await open_phone()  # the far end of the caller's call, on side b
    try:
        caller.relay.b.set_remote(other.addr, PCMU, 101)
        # A prompt, then the far end talks: the stream is ours, with offsets for the far end's SSRC.
        prompt = caller.side.play(announcement(2))
        assert await asyncio.wait_for(prompt.done, 1.0) is True
        other.send(caller.relay.b.port, 0, seq=100, ts=5000, payload=b"\x11" * 160)
        heard = await receive(caller.phone, 3)

        await moh.join(CLASS, caller.side, "PCMU")
        heard += await receive(caller.phone, 5)
        # The far end talking over the music is held back.
        dropped = caller.relay.b.counters.dropped
        other.send(caller.relay.b.port, 0, seq=101, ts=5160, payload=b"\x33" * 160)
        await until(lambda: caller.relay.b.counters.dropped == dropped + 1)
        moh.leave(caller.side)
        stopped = caller.side.played
        # The far end goes on in its own numbering: it reaches the caller after the music.
        for i in range(3):
            other.send(caller.relay.b.port, 0, seq=102 + i, ts=5320 + 160 * i, payload=b"\x22" * 160)
        heard += await receive(caller.phone, stopped - 2 + 3 - 5)
    finally:
        other.transport.close()

    assert runs(heard, music)[-2:] == [("M", stopped - 2), ("A", 3)]
    ssrcs = {p.ssrc for p in heard}
    assert len(ssrcs) == 1 and ssrcs != {PHONE_SSRC}
    first = heard[0].sequence_number
    assert [p.sequence_number for p in heard] == [(first + i) & 0xFFFF for i in range(len(heard))]
    relayed = heard[-3:]
    assert relayed[0].marker == 1  # new offsets, fixed after the music
    assert [(p.timestamp - relayed[0].timestamp) & 0xFFFFFFFF for p in relayed] == [0, 160, 320]
