"""Call quality: the E-model's MOS estimate, and the relay's receive statistics
(loss, jitter) measured with real UDP sockets on loopback.

The peers are plain asyncio datagram endpoints standing in for phones; every
packet a peer sends through the relay is awaited at the other peer, so the
statistics are read once the relay has seen all of it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable

import pytest
from aiortp import RtpPacket

from pbx.media.clock import MediaClock
from pbx.media.codecs import G722, TELEPHONE_EVENT
from pbx.media.ports import RtpPortPool
from pbx.media.quality import (
    G711,
    delay_impairment,
    effective_equipment_impairment,
    estimate_mos,
    impairment,
    mos_from_r,
    r_factor,
)
from pbx.media.quality import G722 as G722_VALUES
from pbx.media.relay import RtpRelay
from pbx.media.relay_stats import ReceiveReport
from tests.test_media import HOST, Peer, free_range, open_peer

DTMF_PT = TELEPHONE_EVENT.payload_type


# --- the E-model ---


def test_r_93_2_is_mos_4_41() -> None:
    assert mos_from_r(93.2) == pytest.approx(4.41, abs=0.005)
    assert r_factor(0.0, 0.0) == pytest.approx(93.2)


def test_mos_is_clamped_to_1_and_4_5_and_rises_with_r() -> None:
    assert mos_from_r(-20.0) == mos_from_r(0.0) == 1.0
    assert mos_from_r(100.0) == mos_from_r(140.0) == 4.5
    grid = [mos_from_r(r / 2) for r in range(-20, 260)]
    assert all(1.0 <= m <= 4.5 for m in grid)
    assert grid == sorted(grid)
    # The standard formula dips below 1 for small R; the clamp keeps it there.
    assert mos_from_r(5.0) == 1.0
    assert mos_from_r(50.0) == pytest.approx(1 + 0.035 * 50 + 50 * -10 * 50 * 7e-6)


def test_delay_impairment_follows_the_simplified_g107_curve() -> None:
    assert delay_impairment(0.0) == 0.0
    assert delay_impairment(100.0) == pytest.approx(2.4)
    assert delay_impairment(177.3) == pytest.approx(0.024 * 177.3)
    # Above 177.3 ms the slope steepens: 0.024 + 0.11 per ms.
    assert delay_impairment(300.0) == pytest.approx(0.024 * 300 + 0.11 * (300 - 177.3))


def test_loss_impairment_for_g711_with_plc() -> None:
    assert effective_equipment_impairment(0.0, G711) == 0.0
    # G.113 Appendix I, G.711 with PLC: Bpl = 25.1.
    assert effective_equipment_impairment(10.0, G711) == pytest.approx(95 * 10 / 35.1)
    assert r_factor(10.0, 0.0, G711) == pytest.approx(93.2 - 95 * 10 / 35.1)
    assert effective_equipment_impairment(100.0, G711) == pytest.approx(95 * 100 / 125.1)


@pytest.mark.parametrize("codec", ["PCMU", "PCMA", "G722"])
def test_mos_falls_as_loss_grows(codec: str) -> None:
    mos = [estimate_mos(codec, loss / 100, jitter_ms=2.0) for loss in (0, 0.5, 1, 2, 5, 10, 20, 40, 80, 100)]
    assert all(a > b for a, b in zip(mos, mos[1:], strict=False)), mos
    assert mos[0] == pytest.approx(4.40, abs=0.02)  # a clean leg: only packetization and a small jitter buffer
    assert mos[-1] < 1.2  # nothing arrives: R = 93.2 - 95 * 100 / (100 + Bpl) - Id


@pytest.mark.parametrize("codec", ["PCMU", "G722"])
def test_mos_falls_as_jitter_grows(codec: str) -> None:
    mos = [estimate_mos(codec, 0.01, jitter_ms=j) for j in (0, 5, 20, 50, 80, 100, 200, 400)]
    assert all(a > b for a, b in zip(mos, mos[1:], strict=False)), mos
    assert mos[0] - mos[3] < 0.2  # 50 ms of jitter costs a little
    assert mos[-1] < 3.0  # 400 ms: an 820 ms jitter buffer is hopeless


def test_ten_percent_loss_is_a_fair_call_and_one_percent_a_good_one() -> None:
    assert estimate_mos("PCMA", 0.10, 1.0) == pytest.approx(3.4, abs=0.1)
    assert estimate_mos("PCMA", 0.01, 1.0) > 4.2


def test_g722_is_rated_on_the_same_scale_and_is_less_robust_to_loss() -> None:
    assert estimate_mos("G722", 0.0, 0.0) == pytest.approx(estimate_mos("PCMU", 0.0, 0.0), abs=0.01)
    for loss in (0.01, 0.05, 0.2):
        assert estimate_mos("G722", loss, 0.0) < estimate_mos("PCMU", loss, 0.0)
    assert impairment("g722") is G722_VALUES
    assert impairment("opus") is G711  # unknown codecs are rated as G.711


# --- the relay's receive statistics, on loopback ---


@pytest.fixture
async def relay() -> AsyncIterator[RtpRelay]:
    low, high = free_range(4)
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), MediaClock())
    yield relay
    relay.close()


def rtp(seq: int, ts: int, ssrc: int = 0x1234, pt: int = 0) -> bytes:
    return RtpPacket(payload_type=pt, sequence_number=seq & 0xFFFF, timestamp=ts & 0xFFFFFFFF, ssrc=ssrc, payload=b"\xff" * 160).serialize()


def stream(first_seq: int, count: int, ssrc: int = 0x1234, skip: int = 0) -> list[bytes]:
    """``count`` consecutive 20 ms packets, leaving out one in every ``skip``
    (never the first or the last: loss the receiver cannot know of)."""
    return [rtp(first_seq + i, 160 * i, ssrc) for i in range(count) if not skip or i % skip != skip // 2]


async def relay_through(sender: Peer, port: int, receiver: Peer, packets: Iterable[bytes], batch: int = 16) -> None:
    """Send ``packets`` to the relay's ``port`` and wait until each came out at
    ``receiver``; in batches, so loopback's socket buffers never overflow."""
    items = list(packets)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        for packet in chunk:
            sender.send(packet, port)
        for _ in chunk:
            await receiver.recv()


async def test_a_clean_stream_loses_nothing(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    await relay_through(a, relay.a.port, b, stream(1000, 500))
    assert relay.a.stats.report() == ReceiveReport(received=500, expected=500, jitter_ms=relay.a.stats.jitter * 1000)
    assert relay.b.stats.report().received == 0


async def test_skipping_every_tenth_sequence_number_is_ten_percent_loss(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    await relay_through(a, relay.a.port, b, stream(1000, 1000, skip=10))
    report = relay.a.stats.report()
    assert report.received == 900
    assert report.lost == 100
    assert report.loss_fraction == pytest.approx(0.10, abs=0.001)


async def test_loss_next_to_the_first_and_last_packets_is_counted(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    # Sequence numbers 4003-4022: the relay looks closely only at every 16th
    # packet or so, and 4005 and 4020 lie outside the samples' span.
    packets = [rtp(4003 + i, 160 * i) for i in range(20) if i not in (2, 17)]
    await relay_through(a, relay.a.port, b, packets)
    report = relay.a.stats.report()
    assert (report.received, report.expected, report.lost) == (18, 20, 2)


async def test_loss_is_counted_across_a_sequence_number_wrap(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    await relay_through(a, relay.a.port, b, stream(65536 - 304, 608, skip=20))
    report = relay.a.stats.report()
    assert report.received == 578
    assert report.expected == 608
    assert report.lost == 30


async def test_a_new_ssrc_starts_counting_again(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    # The phone restarts its stream (a re-INVITE, a transfer) with a new SSRC
    # and a far-away sequence number: neither the jump nor the packets it
    # seems to skip are loss.
    await relay_through(a, relay.a.port, b, stream(100, 300, ssrc=0x1111, skip=10))
    await relay_through(a, relay.a.port, b, stream(40_000, 304, ssrc=0x2222))
    report = relay.a.stats.report()
    assert report.received == 574
    assert report.expected == 604
    assert report.lost == 30


async def test_a_sequence_jump_in_one_ssrc_starts_counting_again(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    await relay_through(a, relay.a.port, b, stream(100, 200) + stream(30_000, 200))
    report = relay.a.stats.report()
    assert (report.received, report.expected, report.lost) == (400, 400, 0)


async def test_late_and_repeated_packets_are_not_loss(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    packets = stream(2000, 400)
    # Every fifth pair arrives the wrong way round (from the fourth packet on:
    # packets before a stream's first sample are counted, not placed).
    for i in range(3, 398, 5):
        packets[i], packets[i + 1] = packets[i + 1], packets[i]
    await relay_through(a, relay.a.port, b, packets)
    report = relay.a.stats.report()
    assert (report.received, report.lost) == (400, 0)
    await relay_through(a, relay.a.port, b, packets[-20:])  # repeated
    assert relay.a.stats.report().lost == 0


async def test_packets_from_a_stranger_are_not_counted(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    stranger = await open_peer()
    try:
        await relay_through(a, relay.a.port, b, stream(1, 40))
        for packet in stream(500, 40, ssrc=0x6666):
            stranger.send(packet, relay.a.port)
        a.send(b"\x80\x00", relay.a.port)  # not RTP-sized
        await relay_through(a, relay.a.port, b, stream(41, 40))
        assert relay.a.stats.report().received == 80
        assert relay.a.stats.report().lost == 0
    finally:
        stranger.transport.close()


async def send_on_schedule(peer: Peer, port: int, packets: list[bytes], times: list[float]) -> list[float]:
    """Send each packet at its loop time; returns when each actually left."""
    loop = asyncio.get_running_loop()
    sent: list[float] = []
    for packet, at in zip(packets, times, strict=True):
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the stream's pacing, not synchronisation
        peer.send(packet, port)
        sent.append(time.monotonic())
    return sent


def rfc3550_jitter_ms(sent: list[float], spacing: float) -> float:
    """RFC 3550 A.8 over consecutive packets, from the send times (on
    loopback, arrival follows sending within microseconds)."""
    jitter = 0.0
    for before, after in zip(sent, sent[1:], strict=False):
        jitter += (abs((after - before) - spacing) - jitter) / 16
    return jitter * 1000


@pytest.mark.serial
async def test_jitter_follows_irregular_sending(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    """Phone a sends every 10 ms but each packet leaves 0 or 8 ms late at
    random (|D| averages 4 ms); phone b sends on time. Both at once."""
    a, b = peers
    count, spacing = 400, 0.010
    rng = random.Random(6)
    packets = [rtp(i, 80 * i) for i in range(count)]
    start = asyncio.get_running_loop().time() + 0.05
    regular = [start + i * spacing for i in range(count)]
    irregular = [t + rng.choice((0.0, 0.008)) for t in regular]
    sent_a, sent_b = await asyncio.gather(
        send_on_schedule(a, relay.a.port, packets, irregular),
        send_on_schedule(b, relay.b.port, packets, regular),
    )
    for receiver in (a, b):  # everything went through
        for _ in range(count):
            await receiver.recv()
    expected_a, expected_b = rfc3550_jitter_ms(sent_a, spacing), rfc3550_jitter_ms(sent_b, spacing)
    got_a, got_b = relay.a.stats.report().jitter_ms, relay.b.stats.report().jitter_ms
    assert expected_a > 2.5  # the schedule was kept well enough to mean something
    assert got_a == pytest.approx(expected_a, abs=1.5), (got_a, expected_a)
    assert got_b == pytest.approx(expected_b, abs=1.5), (got_b, expected_b)
    assert got_a > got_b + 1.0
    assert relay.a.stats.report().lost == relay.b.stats.report().lost == 0


@pytest.mark.serial
async def test_jitter_uses_the_codec_clock_rate(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    """Back-to-back packets stamped 20 ms apart arrive about 20 ms early each:
    at 8000 Hz that is 160 timestamp units, and G.722's RTP clock is 8000 too."""
    a, b = peers
    relay.a.set_remote(a.addr, G722, DTMF_PT)
    await relay_through(a, relay.a.port, b, stream(0, 800), batch=8)
    # Pairs within a batch of 8 arrive together: |D| = 20 ms for each.
    assert relay.a.stats.report().jitter_ms == pytest.approx(20.0, abs=2.0)


async def test_dtmf_events_do_not_count_as_jitter(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    """Every packet of an RFC 4733 event carries the event's start as its
    timestamp; as audio, back-to-back packets stamped a second apart would
    be a second of jitter each."""
    a, b = peers
    events = [rtp(i, 8000 * i, pt=DTMF_PT) for i in range(200)]
    await relay_through(a, relay.a.port, b, events, batch=8)
    assert relay.a.stats.report().jitter_ms == 0.0
    assert relay.a.stats.report().received == 200
    audio = [rtp(200 + i, 8000 * i) for i in range(200)]
    await relay_through(a, relay.a.port, b, audio, batch=8)
    assert relay.a.stats.report().jitter_ms > 100.0  # the same stream as audio: the test can fail
