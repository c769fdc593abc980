"""The server talking to a relay side: prompt playback, RFC 4733 DTMF and audio in.

Real UDP sockets on loopback and the project's real MediaClock; the fake
phones build and read packets with aiortp (RtpPacket, DtmfEvent), never with
the code under test. Assertions are on counts and order; timing windows are
loose so a loaded 2-core machine does not fail them.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiortp.dtmf import DtmfEvent

from pbx.media.clock import MediaClock
from pbx.media.codecs import G722, PCMA, PCMU, Codec
from pbx.media.playback import NoMediaClock
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from tests.support.rtp_peer import HOST, PHONE_SSRC, RtpPhone, assert_one_stream, frames, on_clock, until
from tests.test_media import free_range


def event_stream(phone: RtpPhone, port: int, key: int, seq: int, ts: int, pt: int = 101) -> int:
    """Send one key press as a phone does: a marked start, updates, three end packets.

    Every packet carries the event's start timestamp ``ts``. Returns the next
    sequence number.
    """
    for step in range(1, 5):
        payload = DtmfEvent(event=key, end=False, volume=10, duration=160 * step).serialize()
        phone.send(port, pt, seq, ts, payload, marker=int(step == 1))
        seq += 1
    for _ in range(3):
        phone.send(port, pt, seq, ts, DtmfEvent(event=key, end=True, volume=10, duration=800).serialize())
        seq += 1
    return seq


# --- playback ---


@pytest.mark.parametrize("codec", [PCMU, PCMA, G722], ids=lambda c: c.name)
async def test_play_sends_one_frame_per_tick(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock, codec: Codec) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, codec, 101)
    sent = frames(10)
    playback = relay.a.play(sent)
    assert playback.playing and relay.a.playback is playback

    arrivals = await a.recv_timed(10)
    assert await asyncio.wait_for(playback.done, 1.0) is True
    packets = [p for p, _ in arrivals]
    assert_one_stream(packets, codec.payload_type, clock)
    assert [p.payload for p in packets] == sent
    assert a.sources == {(HOST, relay.a.port)}  # from the side's own socket
    # Paced by the 20 ms clock, not sent in a burst (9 intervals, loose window).
    assert 0.09 < arrivals[-1][1] - arrivals[0][1] < 0.6
    assert await a.quiet(0.06)
    assert relay.a.played == 10
    assert not playback.playing and relay.a.playback is None
    assert not on_clock(clock, relay.a)  # idle sides leave the shared clock alone


async def test_stop_ends_playback_and_its_packets(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    playback = relay.a.play(frames(100))
    await a.recv_timed(3)
    playback.stop()
    assert playback.done.done() and playback.done.result() is False
    playback.stop()  # a second stop is harmless
    await a.drain()  # at most what was already on the wire
    assert await a.quiet(0.1)
    assert relay.a.played < 10
    assert not on_clock(clock, relay.a)

    # stop_playback() on the side does the same, and is a no-op when idle.
    again = relay.a.play(frames(100))
    await a.recv()
    relay.a.stop_playback()
    relay.a.stop_playback()
    assert again.done.result() is False


async def test_loop_repeats_until_stopped(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    playback = relay.a.play(frames(3), loop=True)
    packets = [await a.recv() for _ in range(8)]
    assert not playback.done.done()
    assert [p.payload[0] for p in packets] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert_one_stream(packets, 0, clock)
    playback.stop()
    assert playback.done.result() is False


async def test_play_replaces_the_current_playback_in_one_stream(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock
) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    first = relay.a.play([b"\x01" * 160] * 50)
    before = [await a.recv() for _ in range(3)]
    second = relay.a.play([b"\x02" * 160] * 3)
    assert first.done.result() is False
    assert await asyncio.wait_for(second.done, 1.0) is True
    after = await a.drain()
    first_of_second = next(i for i, p in enumerate(after) if p.payload[0] == 2)
    packets = before + after
    assert [p.payload[0] for p in after[first_of_second:]] == [2, 2, 2]
    assert_one_stream(packets, 0, clock, starts=(len(before) + first_of_second,))  # one stream, a marker where the second starts


async def test_empty_play_is_done_at_once(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    current = relay.a.play(frames(50), loop=True)
    empty = relay.a.play([])
    assert empty.done.result() is True
    assert current.done.result() is False
    assert not on_clock(clock, relay.a)


async def test_playback_pauses_relaying_and_the_peer_sees_one_stream(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock
) -> None:
    a, b = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 101)

    # Before the side ever plays, B's packets reach A untouched.
    b.send(relay.b.port, 0, seq=500, ts=9000, payload=b"\xb0" * 160)
    relayed = await a.recv()
    assert (relayed.ssrc, relayed.sequence_number, relayed.timestamp) == (PHONE_SSRC, 500, 9000)

    # While we play to A, what B says is held back: A hears only our frames.
    playback = relay.a.play(frames(8))
    played = [await a.recv()]
    for i in range(3):
        b.send(relay.b.port, 0, seq=501 + i, ts=9160 + 160 * i, payload=b"\xb1" * 160)
    played += [await a.recv() for _ in range(7)]
    assert await asyncio.wait_for(playback.done, 1.0) is True
    assert [p.payload[0] for p in played] == list(range(8))
    assert_one_stream(played, 0, clock)
    ours = played[0].ssrc
    assert relay.stats()["b_to_a"]["dropped"] == 3

    # Relaying resumes inside our stream: same SSRC, next sequence number,
    # time moved on, B's own spacing kept, marker at the switch.
    for i in range(3):
        b.send(relay.b.port, 0, seq=504 + i, ts=9640 + 160 * i, payload=b"\xb2" * 160)
    resumed = [await a.recv() for _ in range(3)]
    assert {p.ssrc for p in resumed} == {ours}
    assert [p.payload[0] for p in resumed] == [0xB2] * 3
    assert [p.sequence_number for p in resumed] == [(played[-1].sequence_number + i) & 0xFFFF for i in (1, 2, 3)]
    gap = (resumed[0].timestamp - played[-1].timestamp) & 0xFFFFFFFF
    assert 160 <= gap <= 160 * 50 and gap % 160 == 0
    assert [(p.timestamp - resumed[0].timestamp) & 0xFFFFFFFF for p in resumed] == [0, 160, 320]
    assert [p.marker for p in resumed] == [1, 0, 0]

    # And back to a prompt, and back to relaying: still one stream.
    second = relay.a.play(frames(2))
    prompt = [await a.recv() for _ in range(2)]
    assert await asyncio.wait_for(second.done, 1.0) is True
    assert [p.sequence_number for p in prompt] == [(resumed[-1].sequence_number + i) & 0xFFFF for i in (1, 2)]
    assert prompt[0].marker == 1 and prompt[0].ssrc == ours
    assert 160 <= (prompt[0].timestamp - resumed[-1].timestamp) & 0xFFFFFFFF <= 160 * 50
    b.send(relay.b.port, 0, seq=507, ts=10120, payload=b"\xb3" * 160)
    last = await a.recv()
    assert (last.ssrc, last.sequence_number) == (ours, (prompt[-1].sequence_number + 1) & 0xFFFF)

    # The other direction was never paused.
    a.send(relay.a.port, 0, seq=1, ts=0, payload=b"\xa0" * 160)
    assert (await b.recv()).ssrc == PHONE_SSRC


async def test_no_destination_uses_up_frames_without_sending(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, _ = phones
    # No remote yet: the prompt still takes its time, and nothing goes anywhere.
    silent = relay.a.play(frames(3))
    assert await asyncio.wait_for(silent.done, 1.0) is True
    assert relay.a.played == 0

    relay.a.set_remote(a.addr, PCMU, 101)
    playback = relay.a.play(frames(30))
    before = [await a.recv() for _ in range(2)]
    relay.a.set_remote(("0.0.0.0", a.addr[1]), PCMU, 101)  # hold
    before += await a.drain(0.1)  # any frame that was on its way when hold came
    assert len(before) < 30
    relay.a.set_remote(a.addr, PCMU, 101)
    assert await asyncio.wait_for(playback.done, 1.0) is True
    after = await a.drain()
    assert after, "frames after the hold"
    skipped = 30 - len(before) - len(after)
    assert skipped >= 3  # about 0.1 s of frames were used up while on hold
    # No sequence gap (nothing was lost), but the timestamp moved on with the clock.
    assert after[0].sequence_number == (before[-1].sequence_number + 1) & 0xFFFF
    assert (after[0].timestamp - before[-1].timestamp) & 0xFFFFFFFF >= 160 * (skipped + 1)
    assert after[0].marker == 1
    assert [p.payload[0] for p in after] == list(range(30 - len(after), 30))


async def test_play_needs_a_clock(phones: tuple[RtpPhone, RtpPhone]) -> None:
    low, high = free_range(2)
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high))
    try:
        relay.a.set_remote(phones[0].addr, PCMU, 101)
        with pytest.raises(NoMediaClock, match="clock"):
            relay.a.play(frames(1))
    finally:
        relay.close()


async def test_close_stops_playback(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], clock: MediaClock) -> None:
    a, _ = phones
    relay.a.set_remote(a.addr, PCMU, 101)
    playback = relay.a.play(frames(10), loop=True)
    await a.recv()
    relay.close()
    assert playback.done.result() is False
    assert not on_clock(clock, relay.a)
    with pytest.raises(RuntimeError, match="closed"):
        relay.a.play(frames(1))


# --- DTMF and audio in ---


async def test_rfc4733_event_stream_reports_the_key_once(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, _ = phones
    keys: list[str] = []
    relay.a.on_dtmf = keys.append
    relay.a.set_remote(a.addr, PCMU, 101)  # not bridged: B has no address

    event_stream(a, relay.a.port, 5, seq=10, ts=48000)
    await until(lambda: relay.a.counters.dropped == 7)
    assert keys == ["5"]


async def test_same_key_twice_and_every_key_name(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, _ = phones
    keys: list[str] = []
    relay.a.on_dtmf = keys.append
    relay.a.set_remote(a.addr, PCMU, 101)

    seq, ts = 1, 1000
    for key in [7, 7, 10, 11, 0, 12, 15]:
        seq = event_stream(a, relay.a.port, key, seq=seq, ts=ts)
        ts += 1600
    await until(lambda: relay.a.counters.dropped == 7 * 7)
    assert keys == ["7", "7", "*", "#", "0", "A", "D"]


async def test_lost_start_still_reports_the_key(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, _ = phones
    keys: list[str] = []
    relay.a.on_dtmf = keys.append
    relay.a.set_remote(a.addr, PCMU, 101)
    for seq in range(3):  # only the end packets made it
        a.send(relay.a.port, 101, seq, 4000, DtmfEvent(event=9, end=True, volume=10, duration=800).serialize())
    a.send(relay.a.port, 101, 3, 4000, b"\x09")  # too short to be an event: ignored
    await until(lambda: relay.a.counters.dropped == 4)
    assert keys == ["9"]


async def test_dtmf_is_reported_and_forwarded_when_bridged(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, b = phones
    keys: list[str] = []
    relay.a.on_dtmf = keys.append
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 96)

    event_stream(a, relay.a.port, 11, seq=20, ts=8000)
    forwarded = [await b.recv() for _ in range(7)]
    assert keys == ["#"]
    assert {p.payload_type for p in forwarded} == {96}
    assert [p.sequence_number for p in forwarded] == list(range(20, 27))
    assert [DtmfEvent.parse(p.payload).event for p in forwarded] == [11] * 7


async def test_a_failing_listener_does_not_stop_the_relay(
    relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = phones

    def broken(key: str) -> None:
        raise RuntimeError("listener bug")

    relay.a.on_dtmf = broken
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 101)
    with caplog.at_level(logging.ERROR, logger="pbx.media.relay_side"):
        event_stream(a, relay.a.port, 1, seq=1, ts=0)
        assert len([await b.recv() for _ in range(7)]) == 7
    assert "listener bug" in caplog.text


async def test_on_audio_gets_the_payloads(relay: RtpRelay, phones: tuple[RtpPhone, RtpPhone]) -> None:
    a, b = phones
    heard: list[tuple[bytes, int]] = []
    keys: list[str] = []
    relay.a.on_audio = lambda payload, pt: heard.append((payload, pt))
    relay.a.on_dtmf = keys.append
    relay.a.set_remote(a.addr, PCMA, 101)

    a.send(relay.a.port, 8, 1, 0, b"\x11" * 160)
    a.send(relay.a.port, 101, 2, 160, DtmfEvent(event=3, end=False, volume=10, duration=160).serialize(), marker=1)
    a.send(relay.a.port, 8, 3, 320, b"\x22" * 160)
    a.send(relay.a.port, 13, 4, 480, b"\x40")  # comfort noise: the listener decides
    await until(lambda: relay.a.counters.dropped == 4)  # unbridged: heard, not forwarded
    assert heard == [(b"\x11" * 160, 8), (b"\x22" * 160, 8), (b"\x40", 13)]
    assert keys == ["3"]

    # Bridged, the listener hears the same packets that go on to B.
    relay.b.set_remote(b.addr, PCMA, 101)
    a.send(relay.a.port, 8, 5, 640, b"\x33" * 160)
    assert (await b.recv()).payload == b"\x33" * 160
    assert heard[-1] == (b"\x33" * 160, 8)

    relay.a.on_audio = None
    a.send(relay.a.port, 8, 6, 800, b"\x44" * 160)
    await b.recv()
    assert len(heard) == 4
