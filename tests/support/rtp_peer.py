"""The phone's end of an RTP stream on loopback, for the media tests.

Several test modules drive relay sides directly or call `pbx serve` and look at
every packet that comes back; they share these ends instead of each writing
its own. Packets are built and read with aiortp (RtpPacket), never with the
code under test. `RtpPhone` sends and queues what arrives for tests on a
relay; `Arrivals` only listens, and keeps the time the kernel received each
packet, so that pauses of the test process itself (its own garbage
collector, a busy machine) do not show as gaps in the server's audio.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from aiortp import RtpPacket

from pbx.media.clock import MediaClock
from pbx.media.playback import PeerStream

HOST = "127.0.0.1"
PHONE_SSRC = 0x1234
# Linux's SO_TIMESTAMPNS (asm-generic): the kernel stamps each datagram as it
# arrives. Python's socket module has no name for it.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")


class RtpPhone(asyncio.DatagramProtocol):
    """A fake phone's RTP socket: sends datagrams and queues what arrives, with arrival times."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[RtpPacket, float]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport
        self.sources: set[tuple[str, int]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.add(addr)
        self.received.put_nowait((RtpPacket.parse(data), asyncio.get_running_loop().time()))

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, port: int, pt: int, seq: int, ts: int, payload: bytes, marker: int = 0, ssrc: int = PHONE_SSRC) -> None:
        packet = RtpPacket(payload_type=pt, marker=marker, sequence_number=seq, timestamp=ts, ssrc=ssrc, payload=payload)
        self.transport.sendto(packet.serialize(), (HOST, port))

    async def recv(self, timeout: float = 1.0) -> RtpPacket:
        return (await asyncio.wait_for(self.received.get(), timeout))[0]

    async def recv_timed(self, count: int, timeout: float = 1.0) -> list[tuple[RtpPacket, float]]:
        return [await asyncio.wait_for(self.received.get(), timeout) for _ in range(count)]

    async def quiet(self, wait: float = 0.1) -> bool:
        """True when nothing arrives within ``wait`` seconds."""
        await asyncio.sleep(wait)
        return self.received.empty()

    async def drain(self, settle: float = 0.03) -> list[RtpPacket]:
        """What has arrived, after ``settle`` seconds for packets already on the wire."""
        await asyncio.sleep(settle)
        packets = []
        while not self.received.empty():
            packets.append(self.received.get_nowait()[0])
        return packets


async def open_phone() -> RtpPhone:
    _, phone = await asyncio.get_running_loop().create_datagram_endpoint(RtpPhone, local_addr=(HOST, 0))
    return phone


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    """Wait until ``condition()`` holds (the relay has processed what a phone sent)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.002)


def frames(count: int, size: int = 160) -> list[bytes]:
    """Pre-encoded frames whose every byte is the frame's index, to tell them apart."""
    return [bytes([i % 256]) * size for i in range(count)]


def assert_one_stream(packets: list[RtpPacket], pt: int, clock: MediaClock, starts: tuple[int, ...] = ()) -> None:
    """Consecutive sequence numbers, timestamps 160 apart, one SSRC, a marker
    on the first packet and on those at ``starts`` (where a prompt starts) only.

    When the loop stalled long enough for the clock to skip ticks, the stream
    rightly shows a gap there (timestamp jump, new marker): only the sequence
    numbers and SSRC are checked then.
    """
    first = packets[0]
    assert [p.sequence_number for p in packets] == [(first.sequence_number + i) & 0xFFFF for i in range(len(packets))]
    assert {p.ssrc for p in packets} == {first.ssrc}
    assert {p.payload_type for p in packets} == {pt}
    assert first.marker == 1
    if clock.skipped == 0:
        assert [p.timestamp for p in packets] == [(first.timestamp + 160 * i) & 0xFFFFFFFF for i in range(len(packets))]
        assert [i for i, p in enumerate(packets) if p.marker] == sorted({0, *starts})


def on_clock(clock: MediaClock, side: PeerStream) -> bool:
    """Whether the clock calls ``side`` (other subscribers, RTCP's timer, aside)."""
    return any(getattr(callback, "__self__", None) is side for callback in clock._callbacks)


class Arrivals:
    """A caller's RTP socket: each packet with the time the kernel received it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.packets: list[RtpPacket] = []
        self.times: list[float] = []  # seconds, CLOCK_REALTIME
        asyncio.get_running_loop().add_reader(self.sock, self._drain)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(2048, socket.CMSG_SPACE(TIMESPEC.size))
            except BlockingIOError:
                return
            for level, kind, stamp in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                    seconds, nanoseconds = TIMESPEC.unpack(stamp[: TIMESPEC.size])
                    self.times.append(seconds + nanoseconds / 1e9)
                    self.packets.append(RtpPacket.parse(data))

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()
