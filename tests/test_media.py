"""The media layer with real UDP sockets on loopback: port pool, relay, codecs, clock.

The peers are plain asyncio datagram endpoints standing in for phones; packets
are built and read with aiortp's RtpPacket, never by the code under test.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiortp import RtpPacket
from aiortp.codecs import PcmuCodec

from pbx.media.clock import MediaClock
from pbx.media.codecs import ALAW_TO_ULAW, G722, PCMA, PCMU, ULAW_TO_ALAW, UnsupportedCodec, decode_to_pcm16
from pbx.media.ports import RTP_RECEIVE_BUFFER, RtpPortPool, RtpPortsExhausted
from pbx.media.relay import RtpRelay
from pbx.media.relay_worker import RelayWorker
from tests.support.server import free_udp_block

HOST = "127.0.0.1"
RATE = 8000


# --- helpers ---


def free_range(pairs: int) -> tuple[int, int]:
    """An even-based port range of ``pairs`` RTP/RTCP pairs that is free right now."""
    base = free_udp_block(2 * pairs, HOST)
    return base, base + 2 * pairs - 1


class Peer(asyncio.DatagramProtocol):
    """A fake phone's UDP socket: sends datagrams and queues what arrives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, port: int) -> None:
        self.transport.sendto(data, (HOST, port))

    async def recv(self, timeout: float = 1.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def nothing(self, wait: float = 0.1) -> bool:
        """True when nothing arrives within ``wait`` seconds."""
        await asyncio.sleep(wait)
        return self.received.empty()


async def open_peer(port: int = 0) -> Peer:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(HOST, port))
    return peer


def rtp(pt: int, seq: int = 1, payload: bytes = b"\xff" * 160, marker: int = 0, ts: int = 0) -> bytes:
    return RtpPacket(payload_type=pt, marker=marker, sequence_number=seq, timestamp=ts, ssrc=0x1234, payload=payload).serialize()


def dominant_frequency(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / RATE)[int(np.argmax(spectrum))])


@pytest.fixture
async def pool() -> RtpPortPool:
    low, high = free_range(8)
    return RtpPortPool(HOST, low, high)


@pytest.fixture(params=["in the server", "in the relay process"])
async def relay(pool: RtpPortPool, request: pytest.FixtureRequest) -> AsyncIterator[RtpRelay]:
    """A relay whose sockets the server reads, or the second process (as in `pbx serve`)."""
    worker = None
    if request.param == "in the relay process":
        worker = RelayWorker()
        pool.relay_workers = [worker]
        worker.start()
    relay = await RtpRelay.create(pool)
    yield relay
    relay.close()
    if worker is not None:
        await worker.stop()


@pytest.fixture
async def peers() -> AsyncIterator[tuple[Peer, Peer]]:
    a, b = await open_peer(), await open_peer()
    yield a, b
    a.transport.close()
    b.transport.close()


# --- port pool ---


async def test_pool_allocates_even_ports_in_range_until_exhausted() -> None:
    low, high = free_range(3)
    pool = RtpPortPool(HOST, low, high)
    pairs = [await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol) for _ in range(3)]
    ports = [p.port for p in pairs]
    assert sorted(ports) == [low, low + 2, low + 4]
    for pair in pairs:
        assert pair.rtp_transport.get_extra_info("sockname")[1] == pair.port
        assert pair.rtcp_transport.get_extra_info("sockname")[1] == pair.port + 1
    assert pool.in_use == pool.capacity == 3

    with pytest.raises(RtpPortsExhausted):
        await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)

    pairs[1].close()
    pairs[1].close()  # a second close must not free a port twice
    await asyncio.sleep(0)  # the OS lets go of the sockets on the next loop pass
    again = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
    assert again.port == ports[1]
    for pair in [pairs[0], pairs[2], again]:
        pair.close()
    assert pool.in_use == 0


async def test_pool_does_not_hand_back_a_just_closed_port() -> None:
    low, high = free_range(3)
    pool = RtpPortPool(HOST, low, high)
    first = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
    first.close()
    await asyncio.sleep(0)
    second = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
    assert second.port != first.port
    second.close()


async def test_pool_skips_ports_bound_by_someone_else() -> None:
    low, high = free_range(3)
    pool = RtpPortPool(HOST, low, high)
    taken_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken_rtp.bind((HOST, low))
    taken_rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken_rtcp.bind((HOST, low + 3))  # the RTCP half of the second pair
    try:
        pair = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
        assert pair.port == low + 4
        with pytest.raises(RtpPortsExhausted):
            await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
        await asyncio.sleep(0)
        # The RTP half of the refused second pair was not leaked.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((HOST, low + 2))
        probe.close()
        pair.close()
    finally:
        taken_rtp.close()
        taken_rtcp.close()


async def test_relay_create_gives_each_side_its_own_port(relay: RtpRelay, pool: RtpPortPool) -> None:
    assert relay.a.port % 2 == 0 and relay.b.port % 2 == 0
    assert relay.a.port != relay.b.port
    # Room for a burst, as much as the host allows (Linux reports twice what was set).
    allowed = min(RTP_RECEIVE_BUFFER, int(Path("/proc/sys/net/core/rmem_max").read_text()))
    for side in (relay.a, relay.b):
        assert side.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * allowed
    assert pool.in_use == 2
    relay.close()
    assert pool.in_use == 0


# --- relay ---


async def test_bytes_arrive_unchanged_when_codecs_match(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 101)

    sent = rtp(0, seq=7, payload=bytes(range(160)), marker=1, ts=160)
    a.send(sent, relay.a.port)
    data, source = await b.recv()
    assert data == sent
    assert source == (HOST, relay.b.port)  # B sees the relay's B-side port, not A

    reply = rtp(0, seq=9, payload=bytes(reversed(range(160))))
    b.send(reply, relay.b.port)
    data, source = await a.recv()
    assert data == reply
    assert source == (HOST, relay.a.port)

    comfort_noise = rtp(13, seq=8, payload=b"\x40")
    a.send(comfort_noise, relay.a.port)
    assert (await b.recv())[0] == comfort_noise

    stats = relay.stats()
    assert stats["a_to_b"] == {"relayed": 2, "transcoded": 0, "dropped": 0, "bytes": len(sent) + len(comfort_noise)}
    assert stats["b_to_a"] == {"relayed": 1, "transcoded": 0, "dropped": 0, "bytes": len(reply)}
    assert relay.total().relayed == 3


async def test_pcmu_sine_reaches_the_other_side_as_pcma(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    relay.a.set_remote(a.addr, PCMU, None)
    relay.b.set_remote(b.addr, PCMA, None)
    t = np.arange(RATE) / RATE
    tone = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2")
    ulaw = PcmuCodec().encode(tone.tobytes())

    for seq in range(50):
        a.send(rtp(0, seq=seq, ts=seq * 160, payload=ulaw[seq * 160 : (seq + 1) * 160]), relay.a.port)
    packets = [RtpPacket.parse((await b.recv())[0]) for _ in range(50)]

    packets.sort(key=lambda p: p.sequence_number)
    assert {p.payload_type for p in packets} == {8}
    assert [p.timestamp for p in packets] == [seq * 160 for seq in range(50)]
    assert {p.ssrc for p in packets} == {0x1234}
    received = np.concatenate([decode_to_pcm16("PCMA", p.payload) for p in packets]).astype(np.float64)
    assert abs(dominant_frequency(received) - 440) < 5
    # Same waveform, same polarity: the conversion keeps the sign of every sample.
    assert np.corrcoef(received, tone.astype(np.float64))[0, 1] > 0.99
    assert relay.stats()["a_to_b"]["transcoded"] == 50


async def test_telephone_event_payload_type_is_mapped(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    relay.a.set_remote(a.addr, PCMU, 101)
    relay.b.set_remote(b.addr, PCMU, 96)
    event = bytes([5, 0x8A, 0x01, 0x40])  # digit 5, end bit, volume 10, duration 320

    a.send(rtp(101, seq=3, payload=event, marker=1), relay.a.port)
    packet = RtpPacket.parse((await b.recv())[0])
    assert (packet.payload_type, packet.marker, packet.sequence_number, packet.payload) == (96, 1, 3, event)

    b.send(rtp(96, seq=4, payload=event), relay.b.port)
    packet = RtpPacket.parse((await a.recv())[0])
    assert (packet.payload_type, packet.marker, packet.payload) == (101, 0, event)


async def test_replies_go_to_the_source_the_peer_actually_sends_from(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b_sdp = peers
    b_nat = await open_peer()  # the same phone as seen through a NAT
    b_other = await open_peer()
    try:
        relay.a.set_remote(a.addr, PCMU, None)
        relay.b.set_remote(b_sdp.addr, PCMU, None)

        a.send(rtp(0, seq=1), relay.a.port)
        await b_sdp.recv()  # until B speaks, its SDP address is all we know

        b_nat.send(rtp(0, seq=1), relay.b.port)
        await a.recv()
        a.send(rtp(0, seq=2), relay.a.port)
        assert RtpPacket.parse((await b_nat.recv())[0]).sequence_number == 2
        assert await b_sdp.nothing()

        # Latched once: no other source may speak for B now.
        b_other.send(rtp(0, seq=99), relay.b.port)
        assert await a.nothing()
        assert relay.stats()["b_to_a"]["dropped"] == 1

        # A re-INVITE with the same address keeps what was learnt; a new one starts over.
        relay.b.set_remote(b_sdp.addr, PCMU, None)
        a.send(rtp(0, seq=3), relay.a.port)
        assert RtpPacket.parse((await b_nat.recv())[0]).sequence_number == 3

        # The address the SDP named always speaks for B, and once it has, it alone.
        b_sdp.send(rtp(0, seq=100), relay.b.port)
        assert RtpPacket.parse((await a.recv())[0]).sequence_number == 100
        a.send(rtp(0, seq=4), relay.a.port)
        assert RtpPacket.parse((await b_sdp.recv())[0]).sequence_number == 4
        b_nat.send(rtp(0, seq=101), relay.b.port)
        assert await a.nothing()
    finally:
        b_nat.transport.close()
        b_other.transport.close()


async def test_new_sdp_address_starts_learning_again(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b_old = peers
    b_new = await open_peer()
    try:
        relay.a.set_remote(a.addr, PCMU, None)
        relay.b.set_remote(b_old.addr, PCMU, None)
        b_old.send(rtp(0, seq=1), relay.b.port)
        await a.recv()

        relay.b.set_remote(b_new.addr, PCMU, None)
        a.send(rtp(0, seq=2), relay.a.port)
        assert RtpPacket.parse((await b_new.recv())[0]).sequence_number == 2
        b_new.send(rtp(0, seq=3), relay.b.port)
        assert RtpPacket.parse((await a.recv())[0]).sequence_number == 3
    finally:
        b_new.transport.close()


async def test_packets_before_the_other_side_is_known_are_dropped(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    relay.a.set_remote(a.addr, PCMU, None)
    for seq in range(3):
        a.send(rtp(0, seq=seq), relay.a.port)
    assert await b.nothing()
    assert relay.stats()["a_to_b"] == {"relayed": 0, "transcoded": 0, "dropped": 3, "bytes": 0}

    relay.b.set_remote(b.addr, PCMU, None)
    a.send(rtp(0, seq=3), relay.a.port)
    assert RtpPacket.parse((await b.recv())[0]).sequence_number == 3
    assert relay.stats()["a_to_b"]["relayed"] == 1


async def test_hold_address_stops_media_to_that_side(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    relay.a.set_remote(a.addr, PCMU, None)
    relay.b.set_remote(b.addr, PCMU, None)
    relay.b.set_remote(("0.0.0.0", b.addr[1]), PCMU, None)
    a.send(rtp(0, seq=1), relay.a.port)
    assert await b.nothing()
    b.send(rtp(0, seq=2), relay.b.port)  # music on hold still flows the other way
    assert RtpPacket.parse((await a.recv())[0]).sequence_number == 2

    relay.b.set_remote(b.addr, PCMU, None)
    a.send(rtp(0, seq=3), relay.a.port)
    assert RtpPacket.parse((await b.recv())[0]).sequence_number == 3


async def test_rtcp_is_relayed_to_rtp_port_plus_one(pool: RtpPortPool) -> None:
    low, high = free_range(2)
    phones = RtpPortPool(HOST, low, high)
    a = await phones.open(Peer, Peer)
    b = await phones.open(Peer, Peer)
    relay = await RtpRelay.create(pool)
    try:
        relay.a.set_remote((HOST, a.port), PCMU, None)
        relay.b.set_remote((HOST, b.port), PCMU, None)
        report = bytes([0x81, 201, 0, 7]) + bytes(28)  # a receiver report
        a.rtcp_protocol.send(report, relay.a.port + 1)
        data, source = await b.rtcp_protocol.recv()
        assert (data, source) == (report, (HOST, relay.b.port + 1))
        # B's reports come from another port than RTP + 1: later ones to B follow them.
        b.rtp_protocol.send(report[:8], relay.b.port + 1)
        assert (await a.rtcp_protocol.recv())[0] == report[:8]
        a.rtcp_protocol.send(report[:12], relay.a.port + 1)
        assert (await b.rtp_protocol.recv())[0] == report[:12]
    finally:
        relay.close()
        a.close()
        b.close()


# --- codecs ---


def test_g711_conversion_keeps_every_level() -> None:
    every = bytes(range(256))
    ulaw = decode_to_pcm16("PCMU", every).astype(np.int32)
    alaw = decode_to_pcm16("PCMA", every).astype(np.int32)
    via_alaw = decode_to_pcm16("PCMA", every.translate(ULAW_TO_ALAW)).astype(np.int32)
    via_ulaw = decode_to_pcm16("PCMU", every.translate(ALAW_TO_ULAW)).astype(np.int32)
    # Within one quantisation step of the coarser law, with the same sign.
    assert np.all(np.abs(via_alaw - ulaw) <= np.maximum(np.abs(ulaw) // 16, 16))
    assert np.all(np.abs(via_ulaw - alaw) <= np.maximum(np.abs(alaw) // 16, 16))
    assert decode_to_pcm16("PCMU", b"\xff\x7f").tolist() == [0, 0]
    with pytest.raises(UnsupportedCodec):
        decode_to_pcm16(G722.name, b"\x00")


# --- clock ---


@pytest.mark.serial
async def test_clock_ticks_fifty_times_a_second_without_drift(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    clock = MediaClock()
    ticks: list[tuple[int, float]] = []

    def broken(tick: int) -> None:
        raise RuntimeError("subscriber bug")

    clock.subscribe(broken)
    clock.subscribe(lambda tick: ticks.append((tick, loop.time())))
    with caplog.at_level(logging.ERROR, logger="pbx.media.clock"):
        clock.start()
        await asyncio.sleep(1.0)
        await clock.stop()

    assert 45 <= len(ticks) <= 51
    first_tick, first_at = ticks[0]
    last_tick, last_at = ticks[-1]
    assert last_tick - first_tick + 1 == len(ticks) + clock.skipped
    # Deadlines are absolute: the last tick is as punctual as the first.
    assert abs((last_at - first_at) - (last_tick - first_tick) * clock.interval) < 0.010
    assert "subscriber bug" in caplog.text


async def test_a_packet_heard_late_belongs_to_the_tick_it_arrived_in(clock: MediaClock) -> None:
    loop = asyncio.get_running_loop()
    ticked = asyncio.Event()
    handle = clock.subscribe(lambda tick: ticked.set() if tick >= 5 else None)
    await ticked.wait()
    clock.unsubscribe(handle)
    now, tick = loop.time(), clock.tick
    assert clock.tick_at(None) == clock.tick_at(now) == tick
    assert clock.tick_at(now - 0.045) == tick - 2  # two whole intervals before
    assert clock.tick_at(now + 1) == tick  # never a tick still to come


@pytest.mark.serial
async def test_clock_skips_ticks_instead_of_bursting_after_a_stall() -> None:
    loop = asyncio.get_running_loop()
    clock = MediaClock()
    ticks: list[tuple[int, float]] = []

    def stall_once(tick: int) -> None:
        ticks.append((tick, loop.time()))
        if len(ticks) == 3:
            time.sleep(0.2)  # ten ticks' worth of blocked loop

    handle = clock.subscribe(stall_once)
    clock.start()
    await asyncio.sleep(0.4)
    clock.unsubscribe(handle)
    count = len(ticks)
    await asyncio.sleep(0.05)
    await clock.stop()

    assert len(ticks) == count  # unsubscribed means no more calls
    assert clock.skipped >= 5
    numbers = [tick for tick, _ in ticks]
    assert max(b - a for a, b in zip(numbers, numbers[1:], strict=False)) > clock.max_lag
    # No catch-up burst: the ticks after the stall stay about 20 ms apart.
    times = [at for _, at in ticks[4:]]
    assert all(b - a > 0.010 for a, b in zip(times, times[1:], strict=False))
