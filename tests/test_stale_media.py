"""A new process never takes an old process's media: a phone that still
sends to a port after the server restarted gets that port quarantined, and
two senders sharing a leg's source are reported.

The stale phone is a plain UDP socket on the phones' own host (loopback, so
the NAT rule that latches a peer from its signalling IP would take it) that
sends a 1100 Hz PCMU stream every 20 ms, as a phone of a call lost in a crash
goes on doing. End to end against `pbx serve` with pjsua2 phones; the pool's
quarantine and the two-sender rule with real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from aiortp import RtpPacket
from aiortp.codecs import PcmuCodec

from pbx.media.codecs import PCMU
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, free_udp_block, start_server
from tests.test_calls import connect
from tests.test_media import free_range, open_peer
from tests.test_rtp_hijack import MEDIA_IP, TRUNK_IP, Reports, TrunkCaller, hijack_server

LOOPBACK = "127.0.0.1"
RATE = 8000
STALE_HZ = 1100
PAIRS = 8  # the server's RTP range
STALE_PAIRS = 6  # of them, those a stale phone sends to: a bridged call needs the other two


def _frame(hz: int) -> bytes:
    t = np.arange(RATE // 50) / RATE
    return PcmuCodec().encode((np.sin(2 * np.pi * hz * t) * 0.5 * 32767).astype("<i2").tobytes())


class StalePhone(asyncio.DatagramProtocol):
    """A phone of a call the server lost: sends its stream to ``ports`` every
    20 ms (or two interleaved streams, as two senders behind one address),
    and keeps what comes back."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)

    def error_received(self, exc: Exception) -> None:
        pass  # a port nobody listens on yet answers ICMP

    async def send(self, ports: list[tuple[str, int]], ssrcs: tuple[int, ...] = (0x57A1E,), packets: int | None = None) -> None:
        payload = _frame(STALE_HZ)
        counter = itertools.count(1) if packets is None else range(1, packets + 1)
        for n in counter:
            for index, ssrc in enumerate(ssrcs):
                seq = (n + 20000 * index) & 0xFFFF  # each stream its own sequence
                packet = RtpPacket(payload_type=0, sequence_number=seq, timestamp=n * 160, ssrc=ssrc, payload=payload)
                for addr in ports:
                    self.transport.sendto(packet.serialize(), addr)
            await asyncio.sleep(0.020)


@contextlib.asynccontextmanager
async def stale_phone(ports: list[tuple[str, int]], host: str = LOOPBACK) -> AsyncIterator[StalePhone]:
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(StalePhone, local_addr=(host, 0))
    task = loop.create_task(phone.send(ports))
    try:
        yield phone
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        transport.close()


async def test_a_restarted_server_gives_a_new_call_no_port_a_stale_phone_still_sends_to(tmp_path: Path) -> None:
    # On the hijack tests' own address: the stale stream hits no socket of a test running beside this one.
    low = free_udp_block(2 * PAIRS, MEDIA_IP)
    stale = [low + 2 * n for n in range(STALE_PAIRS)]
    async with stale_phone([(MEDIA_IP, port) for port in stale]) as phone:
        server = await start_server(tmp_path / "pbx", rtp={"ip": MEDIA_IP, "ports": [low, low + 2 * PAIRS - 1]})
        try:
            for port in stale:
                await server.wait_log(rf"RTP port {port} quarantined: packets from {LOOPBACK}")
            async with await Phone.start(name="alice") as alice, await Phone.start(name="bob") as bob:
                await alice.register(server.sip, "1001", PASSWORDS["1001"])
                await bob.register(server.sip, "1002", PASSWORDS["1002"])
                a, b = await connect(alice, bob)
                heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
                await alice.hangup(a)
                await bob.wait_event("call_state", call=b, state="disconnected")
            assert not any("handed out while still in quarantine" in line for line in server.log)
            # A side given a stale port would have met the stale phone there, latched or reported it.
            assert not any("kind=rtp_stranger" in line for line in server.log)
        finally:
            assert await server.stop() == 0
    # Each phone heard its own party only, and the stale phone heard nobody.
    assert abs(heard_by_alice - 1000) < 30
    assert abs(heard_by_bob - 440) < 30
    assert phone.received == []


async def test_a_quarantined_port_is_handed_out_once_quiet_or_when_no_other_is_free() -> None:
    low, high = free_range(2)
    pool = RtpPortPool(LOOPBACK, low, high)
    try:
        async with stale_phone([(LOOPBACK, low)]):
            await pool.sweep(window=0.1, quiet=0.5)
            assert pool.quarantined == {low}
            first = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
            assert first.port == low + 2
            last_resort = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
            assert last_resort.port == low and pool.quarantined == frozenset()
            first.close()
            last_resort.close()
            await asyncio.sleep(0)  # the OS gets the sockets back on the next loop iteration

        async with stale_phone([(LOOPBACK, low)]):
            await pool.sweep(window=0.1, quiet=0.5)
            assert pool.quarantined == {low}
            await asyncio.sleep(0.8)  # still sending: still held
            assert pool.quarantined == {low}
        async with asyncio.timeout(2):  # quiet now: released after 0.5 s
            while pool.quarantined:
                await asyncio.sleep(0.05)
    finally:
        pool.close()


async def test_two_streams_interleaving_on_one_side_are_reported_once_and_one_new_stream_is_not() -> None:
    low, high = free_range(2)
    reports = Reports()
    relay = await RtpRelay.create(RtpPortPool(LOOPBACK, low, high), events=reports.bus)
    phone, other = await open_peer(), await open_peer()
    try:
        relay.a.set_remote(phone.addr, PCMU, None, LOOPBACK)
        relay.b.set_remote(other.addr, PCMU, None, LOOPBACK)
        stream = StalePhone()
        stream.transport = phone.transport
        # One sender whose stream starts over with a new SSRC (a re-INVITE, say): nothing to report.
        await stream.send([(LOOPBACK, relay.a.port)], ssrcs=(0x1111,), packets=32)
        await stream.send([(LOOPBACK, relay.a.port)], ssrcs=(0x2222,), packets=32)
        assert reports.events == []
        # Two senders behind the one address.
        await stream.send([(LOOPBACK, relay.a.port)], ssrcs=(0x3333, 0x4444), packets=64)
        async with asyncio.timeout(2):
            while not reports.events:
                await asyncio.sleep(0.02)
        await stream.send([(LOOPBACK, relay.a.port)], ssrcs=(0x3333, 0x4444), packets=32)  # and on: still once
    finally:
        relay.close()
        phone.transport.close()
        other.transport.close()
    assert [(e["kind"], e["src"], e["side"], e["senders"]) for e in reports.events] == [("rtp_stranger", LOOPBACK, "a", 2)]


async def test_a_leg_with_a_second_interleaved_stream_is_logged_by_the_server(tmp_path: Path) -> None:
    server, _ = await hijack_server(tmp_path)
    loop = asyncio.get_running_loop()
    sip_transport, caller = await loop.create_datagram_endpoint(lambda: TrunkCaller(server), local_addr=(TRUNK_IP, 0))
    rtp_transport, phone = await loop.create_datagram_endpoint(StalePhone, local_addr=(TRUNK_IP, 0))
    talking: asyncio.Task[Any] | None = None
    try:
        server_rtp = await caller.call("8000", rtp_transport.get_extra_info("sockname")[:2])
        talking = loop.create_task(phone.send([server_rtp], ssrcs=(0x1111, 0x2222)))
        line = await server.wait_log(r"event=security kind=rtp_stranger .*senders=2", timeout=5)
        assert f"src={TRUNK_IP}" in line
    finally:
        if talking is not None:
            talking.cancel()
        sip_transport.close()
        rtp_transport.close()
        assert await server.stop() == 0
