"""RTCP (RFC 3550 §6): our own reports, relayed ones, and the far end's view
of the call in `pbx_call_mos{direction="outbound"}`.

Three levels: the packet layouts against bytes written out by hand from
RFC 3550's figures; a relay on loopback with bare-socket peers (the report
interval shortened); and `pbx serve` with pjsua2 phones, which send RTCP of
their own, while tshark captures on loopback what the server sends them and
decodes it independently.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pbx.media import rtcp
from pbx.media.clock import MediaClock
from pbx.media.codecs import PCMU
from pbx.media.ports import RtpPortPool, RtpSocketPair
from pbx.media.relay import RtpRelay
from pbx.media.rtcp import ReportBlock, ReportedSwap, SenderInfo, SourceSwap
from pbx.media.rtp_packet import unpack_seq_ts_ssrc
from tests.support.audio import write_tone
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, start_server, worker_index
from tests.test_media import HOST, Peer, free_range, rtp
from tests.test_srtp_media import receiver, sender, srtp_side_a

# --- packet layouts ----------------------------------------------------------

# RFC 3550 §6.4.1: SR from SSRC 0x11223344 with one report block.
SR_BYTES = bytes.fromhex(
    "81c8000c" "11223344"  # V=2 P=0 RC=1, PT=200, length: 13 words less one; sender SSRC
    "0123456789abcdef"  # NTP timestamp
    "deadbeef" "000003e8" "00027100"  # RTP timestamp, 1000 packets, 160000 octets
    "55667788" "40000005" "0001ffff" "0000002a" "456789ab" "00010000"  # SSRC, 64/256 | 5 lost, highest, jitter 42, LSR, DLSR 1 s
)  # fmt: skip
SR_REPORT = rtcp.Report(
    0x11223344,
    SenderInfo(0x0123456789ABCDEF, 0xDEADBEEF, 1000, 160000),
    (ReportBlock(0x55667788, 64, 5, 0x1FFFF, 42, 0x456789AB, 0x10000),),
)
# §6.5: SDES, one chunk: SSRC, CNAME (type 1) "abc", the null item, padding to a word.
SDES_BYTES = bytes.fromhex("81ca0003" "11223344" "0103616263" "000000")  # fmt: skip


def test_a_sender_report_is_laid_out_as_rfc_3550_draws_it() -> None:
    assert rtcp.build_report(SR_REPORT.ssrc, SR_REPORT.sender, SR_REPORT.blocks) == SR_BYTES
    assert rtcp.parse_reports(SR_BYTES) == [SR_REPORT]


def test_a_receiver_report_has_no_sender_info_and_may_have_no_block() -> None:
    assert rtcp.build_report(0x11223344, None) == bytes.fromhex("80c90001" "11223344")
    block = ReportBlock(0x55667788, 0, -1, 7, 0, 0, 0)  # duplicates outnumber losses: -1 in 24 bits
    packet = rtcp.build_report(0x11223344, None, (block,))
    assert packet == bytes.fromhex("81c90007" "11223344" "55667788" "00ffffff" "00000007" "00000000" "00000000" "00000000")
    assert rtcp.parse_reports(packet) == [rtcp.Report(0x11223344, None, (block,))]


def test_sdes_cname_chunks_end_with_a_null_item_and_fill_their_last_word() -> None:
    assert rtcp.build_sdes(0x11223344, b"abc") == SDES_BYTES
    # 4 + 2 + 2 octets fill two words exactly: the null item takes a word of its own.
    assert rtcp.build_sdes(0x11223344, b"ab") == bytes.fromhex("81ca0003" "11223344" "01026162" "00000000")
    ours = rtcp.build_sdes(0x11223344)
    assert ours[8] == 1 and len(ours) % 4 == 0 and ours[-1] == 0


def test_compound_packets_are_read_report_by_report_and_a_truncated_one_up_to_the_cut() -> None:
    compound = SR_BYTES + SDES_BYTES + rtcp.build_report(0x99, None)
    assert rtcp.parse_reports(compound) == [SR_REPORT, rtcp.Report(0x99, None, ())]
    assert rtcp.parse_reports(SR_BYTES[:-4]) == []  # the length overruns the datagram
    assert rtcp.parse_reports(bytes([0x81, 201, 0, 1]) + bytes(4)) == []  # RC=1 but no room for the block
    assert rtcp.parse_reports(b"\x00" + SR_BYTES[1:]) == []  # not version 2


def test_ntp_timestamps_count_from_1900_and_lsr_takes_their_middle() -> None:
    assert rtcp.ntp_timestamp(0.5) == (2208988800 << 32) | 0x80000000
    assert rtcp.ntp_middle(0x0123456789ABCDEF) == 0x456789AB


def test_renumbering_maps_the_sender_and_the_reported_stream() -> None:
    bye = bytes.fromhex("81cb0001" "11223344")
    feedback = bytes.fromhex("81cd0003" "11223344" "aaaaaaaa" "00010000")  # RTPFB (NACK) on our stream
    source = SourceSwap(ssrc=0xCAFE0001, timestamp_offset=0x10, packets=7, octets=1120)
    reported = ReportedSwap(ours=0x55667788, theirs=0xBEEF0002, seq_offset=0x0100)
    got = rtcp.renumber(SR_BYTES + SDES_BYTES + bye + feedback, source, reported)
    assert got == bytes.fromhex(
        "81c8000c" "cafe0001" "0123456789abcdef" "deadbeff" "00000007" "00000460"
        "beef0002" "40000005" "0001feff" "0000002a" "456789ab" "00010000"
        "81ca0003" "cafe0001" "0103616263" "000000"
        "81cb0001" "cafe0001"
        "81cd0003" "cafe0001" "aaaaaaaa" "00010000"
    )  # fmt: skip
    # A block on another stream than ours is left alone; so is everything without swaps.
    other = ReportedSwap(ours=0x1, theirs=0x2, seq_offset=5)
    assert rtcp.renumber(SR_BYTES, None, other) == SR_BYTES
    assert rtcp.renumber(SR_BYTES[:-1], source, reported) is None  # malformed: its SSRCs cannot all be found
    assert rtcp.renumber(SR_BYTES + b"\x81", source, reported) is None


def test_the_peer_view_adds_loss_over_streams_and_times_the_round_trip_from_lsr() -> None:
    view = rtcp.PeerView()
    ntp = rtcp.ntp_timestamp(1000.0)
    view.sent_sr(ntp, now=10.0)
    view.take(ReportBlock(0xA, 0, 3, 100, 80, rtcp.ntp_middle(ntp), 0x8000), sent=100, now=10.7)  # 0.5 s held at the peer
    assert view.rtt == pytest.approx(0.2, abs=1e-4)
    view.take(ReportBlock(0xA, 0, 5, 200, 40, 0x1234, 0), sent=200, now=15.0)  # an SR we did not send: no new round trip
    assert view.rtt == pytest.approx(0.2, abs=1e-4)
    view.take(ReportBlock(0xB, 0, 2, 50, 40, 0, 0), sent=260, now=20.0)  # a new stream of ours starts its count again
    assert (view.lost, view.sent, view.jitter, view.reports) == (7, 260, 40, 3)
    assert view.loss_fraction == pytest.approx(7 / 260)


def test_the_report_timer_spreads_reports_and_drops_a_member_that_is_done() -> None:
    clock = MediaClock()
    timer = rtcp.ReportTimer(clock)
    per_interval = rtcp.REPORT_INTERVAL / clock.interval

    @dataclass
    class Member:
        calls: list[int]
        until: int

        def send_report(self) -> bool:
            self.calls.append(clock.tick)
            return clock.tick < self.until

    members = [Member([], until=int(10 * per_interval)) for _ in range(20)]
    for member in members:
        timer.add(member)
    for tick in range(1, int(20 * per_interval)):
        if tick % 97 == 0:
            continue  # a late clock skips ticks: members due then are not lost
        clock.tick = tick
        for callback in clock._callbacks:
            callback(tick)
    firsts = [member.calls[0] for member in members]
    assert all(0.25 * per_interval <= first <= 0.75 * per_interval + 1 for first in firsts)
    assert len(set(firsts)) > 10  # spread at random, not all at once
    for member in members:
        gaps = [b - a for a, b in zip(member.calls, member.calls[1:], strict=False)]
        assert all(0.5 * per_interval <= gap <= 1.5 * per_interval + 1 for gap in gaps)
        assert member.calls[-1] >= member.until and member.calls[-1] < member.until + 1.5 * per_interval + 1


# --- a relay on loopback -------------------------------------------------------


@dataclass
class SocketPhone:
    """A bare-socket phone: RTP and RTCP sockets on one pair of ports."""

    pair: RtpSocketPair[Peer, Peer]

    @property
    def rtp(self) -> Peer:
        return self.pair.rtp_protocol

    @property
    def rtcp(self) -> Peer:
        return self.pair.rtcp_protocol

    @property
    def addr(self) -> tuple[str, int]:
        return (HOST, self.pair.port)


@pytest.fixture
async def loopback(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[RtpRelay, SocketPhone, SocketPhone]]:
    monkeypatch.setattr(rtcp, "REPORT_INTERVAL", 0.2)  # read when the clock's timer is made
    low, high = free_range(4)
    clock = MediaClock()
    clock.start()
    relay = await RtpRelay.create(RtpPortPool(HOST, low, high), clock)
    phones = RtpPortPool(HOST, *free_range(2))
    a, b = SocketPhone(await phones.open(Peer, Peer)), SocketPhone(await phones.open(Peer, Peer))
    yield relay, a, b
    relay.close()
    a.pair.close()
    b.pair.close()
    await clock.stop()


def ssrc_of(packet: bytes) -> int:
    return unpack_seq_ts_ssrc(packet, 2)[2]


async def next_report(peer: Peer, check: Callable[[rtcp.Report], bool] = lambda _: True) -> tuple[rtcp.Report, bytes]:
    """The next compound packet whose first report passes ``check``."""
    async with asyncio.timeout(3):
        while True:
            data, _ = await peer.recv(timeout=3)
            reports = rtcp.parse_reports(data)
            if reports and check(reports[0]):
                return reports[0], data


async def test_a_side_the_server_talks_to_alone_gets_sender_and_receiver_reports(loopback: tuple[RtpRelay, SocketPhone, SocketPhone]) -> None:
    relay, a, _ = loopback
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    first, _ = await next_report(a.rtcp)
    assert first.sender is None and first.blocks == ()  # nothing sent, nothing heard yet: an empty RR
    relay.a.play([b"\xff" * 160] * 1000)
    ours = ssrc_of((await a.rtp.recv())[0])
    for seq in range(100, 140):
        if seq != 110:  # lost on the way
            a.rtp.send(rtp(0, seq=seq, ts=seq * 160), relay.a.port)
    report, data = await next_report(a.rtcp, lambda r: r.sender is not None and bool(r.blocks) and r.blocks[0].highest_seq == 139)
    assert report.ssrc == ours  # the SSRC of the RTP stream the phone receives
    assert report.sender is not None and 0 < report.sender.packets <= relay.a.stream_packets
    assert report.sender.octets == 160 * report.sender.packets
    block = report.blocks[0]
    assert (block.ssrc, block.cumulative_lost, block.lsr) == (0x1234, 1, 0)
    assert data[len(data) - len(rtcp.build_sdes(ours)) :] == rtcp.build_sdes(ours)  # then our CNAME, in the same datagram

    # The phone's SR comes back as LSR/DLSR; its RR on our stream gives the round trip.
    ntp = rtcp.ntp_timestamp(1234.5)
    a.rtcp.send(rtcp.build_report(0x1234, SenderInfo(ntp, 0, 39, 39 * 160)), relay.a.port + 1)
    echoed, _ = await next_report(a.rtcp, lambda r: bool(r.blocks) and r.blocks[0].lsr != 0)
    assert echoed.blocks[0].lsr == rtcp.ntp_middle(ntp) and echoed.blocks[0].dlsr < 65536
    assert echoed.sender is not None
    reply = ReportBlock(ours, 12, 3, 0, 80, rtcp.ntp_middle(echoed.sender.ntp), 0)
    a.rtcp.send(rtcp.build_report(0x1234, None, (reply,)), relay.a.port + 1)
    async with asyncio.timeout(2):
        while relay.a.rtcp.peer.reports == 0:
            await asyncio.sleep(0.01)
    view = relay.a.rtcp.peer
    assert view.lost == 3 and view.jitter == 80 and view.sent >= report.sender.packets
    assert view.rtt is not None and 0 <= view.rtt < 0.5


async def test_an_srtp_side_sends_and_reads_its_reports_as_srtcp(loopback: tuple[RtpRelay, SocketPhone, SocketPhone]) -> None:
    relay, a, _ = loopback
    a_key = os.urandom(30)
    session = srtp_side_a(relay, a_key)
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    wire, _ = await a.rtcp.recv(timeout=3)
    plain = receiver(session.local.key).unprotect_rtcp(wire)
    assert wire != plain and rtcp.parse_reports(plain) == [rtcp.Report(relay.a._ssrc, None, ())]
    block = ReportBlock(relay.a._ssrc, 0, 4, 0, 0, 0, 0)
    a.rtcp.send(sender(a_key).protect_rtcp(rtcp.build_report(0x1234, None, (block,)) + rtcp.build_sdes(0x1234)), relay.a.port + 1)
    async with asyncio.timeout(2):
        while relay.a.rtcp.peer.reports == 0:
            await asyncio.sleep(0.01)
    assert relay.a.rtcp.peer.lost == 4


async def test_relayed_reports_name_the_streams_each_peer_actually_sees(loopback: tuple[RtpRelay, SocketPhone, SocketPhone]) -> None:
    relay, a, b = loopback
    relay.a.set_remote(a.addr, PCMU, None, HOST)
    relay.b.set_remote(b.addr, PCMU, None, HOST)
    # A prompt to side a first (as the IVR before a transfer): from then on,
    # a's peer gets everything in side a's own stream.
    assert await relay.a.play([b"\xff" * 160] * 3).done
    ours = relay.a._ssrc
    for _ in range(3):
        await a.rtp.recv()  # the prompt
    b.rtp.send(struct.pack("!BBHII", 0x80, 0, 500, 8000, 0xB0B) + b"\xff" * 160, relay.b.port)
    seen = (await a.rtp.recv())[0]
    assert ssrc_of(seen) == ours
    relayed_seq, relayed_ts, _ = unpack_seq_ts_ssrc(seen, 2)
    a.rtp.send(rtp(0, seq=70, ts=70 * 160), relay.a.port)
    assert ssrc_of((await b.rtp.recv())[0]) == 0x1234  # side b relays as received

    # b's SR (on the stream b sends, about a's stream) reaches a as from side a's stream.
    ntp = rtcp.ntp_timestamp(2000.0)
    b_block = ReportBlock(0x1234, 0, 0, 70, 8, 0, 0)
    b.rtcp.send(rtcp.build_report(0xB0B, SenderInfo(ntp, 8000, 1, 160), (b_block,)) + rtcp.build_sdes(0xB0B, b"bob"), relay.b.port + 1)
    data, _ = await a.rtcp.recv()
    (report,) = rtcp.parse_reports(data)
    assert report.ssrc == ours and report.blocks == (b_block,)
    assert report.sender == SenderInfo(ntp, relayed_ts, relay.a.stream_packets, relay.a.stream_octets)
    assert data.endswith(rtcp.build_sdes(ours, b"bob"))

    # a's RR on side a's stream reaches b as one on b's own stream, in b's sequence numbers.
    a_block = ReportBlock(ours, 0, 0, 0x10000 | relayed_seq, 8, rtcp.ntp_middle(ntp), 0)
    a.rtcp.send(rtcp.build_report(0x1234, None, (a_block,)), relay.a.port + 1)
    data, _ = await b.rtcp.recv()
    (report,) = rtcp.parse_reports(data)
    assert report.ssrc == 0x1234
    assert report.blocks[0].ssrc == 0xB0B and report.blocks[0].highest_seq == 0x10000 | 500
    # Each side's view of what its peer got, the round trip timed from when b's SR went to a.
    assert relay.a.rtcp.peer.reports == 1 and relay.a.rtcp.peer.rtt is not None
    assert relay.b.rtcp.peer.reports == 1 and relay.b.rtcp.peer.rtt is None  # b's block named no SR


# --- pbx serve and pjsua2 phones, seen by tshark ------------------------------

# The server's RTP address: what the capture filters on, one per xdist
# worker, so that a capture never sees the calls of a test running beside it.
MEDIA_IP = f"127.0.113.{1 + worker_index()}"
FLOWS = {
    # A caller the server talks to alone for 30 s: the IVR waits for a key.
    "wait": """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 30, retries: 0, on_fail: hangup}
""",
    # A short prompt, then a bridge to 1002: side a has a stream of its own from then on.
    "transfer": """
start: hello
nodes:
  hello: {type: play, prompt: beep, next: extension:1002}
""",
}
FIELDS = ("ip.src", "udp.srcport", "ip.dst", "udp.dstport", "rtp.ssrc", "rtcp.pt", "rtcp.senderssrc", "rtcp.ssrc.identifier", "rtcp.ssrc.ext_high")
QUALITY_LINE = re.compile(r"event=leg_quality leg=(?P<leg>[ab]) .*out_mos=(?P<out_mos>[\d.]+)(?: rtt_ms=(?P<rtt>[\d.]+))?")
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark decodes the capture (apt install tshark)")


@dataclass(frozen=True)
class Packet:
    """One UDP datagram to or from the server's media address, as tshark decoded it."""

    src: tuple[str, int]
    dst: tuple[str, int]
    rtp_ssrc: int | None
    rtcp_types: tuple[int, ...]
    senders: tuple[int, ...]  # the SSRC of each SR and RR
    blocks: tuple[int, ...]  # the SSRC each report block is on
    chunks: tuple[int, ...]  # the SSRCs after those: SDES chunks, BYE

    @classmethod
    def parse(cls, line: str) -> Packet:
        src_ip, src_port, dst_ip, dst_port, rtp_ssrc, types, senders, identifiers, highest = line.split("\t")

        def numbers(text: str) -> tuple[int, ...]:
            return tuple(int(value, 0) for value in text.split(",") if value)

        ids, blocks = numbers(identifiers), len(numbers(highest))
        return cls(
            (src_ip, int(src_port)), (dst_ip, int(dst_port)), int(rtp_ssrc, 0) if rtp_ssrc else None, numbers(types),
            numbers(senders), ids[:blocks], ids[blocks:],
        )  # fmt: skip


class Capture:
    """tshark on loopback, live: the RTP and RTCP to and from MEDIA_IP."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.packets: list[Packet] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls) -> Capture:
        process = await asyncio.create_subprocess_exec(
            "tshark", "-i", "lo", "-l", "-n", "-f", f"udp and host {MEDIA_IP}", "-T", "fields",
            *(arg for field in FIELDS for arg in ("-e", field)),
            "--enable-heuristic", "rtp_udp", "--enable-heuristic", "rtcp_udp",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        async with asyncio.timeout(10):
            while b"Capturing on" not in await process.stderr.readline():
                pass
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            async with self._changed:
                self.packets.append(Packet.parse(line.decode().rstrip("\n")))
                self._changed.notify_all()

    async def until(self, done: Callable[[list[Packet]], bool], timeout: float = 15) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: done(self.packets))

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()
        await self._reader


def flows(packets: list[Packet]) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(server RTP address, phone RTP address) of each leg seen."""
    return {(p.src, p.dst) for p in packets if p.rtp_ssrc is not None and p.src[0] == MEDIA_IP}


def rtcp_of(packets: list[Packet], leg: tuple[tuple[str, int], tuple[str, int]], *, to_phone: bool) -> list[Packet]:
    server, phone = ((host, port + 1) for host, port in leg)
    src, dst = (server, phone) if to_phone else (phone, server)
    return [p for p in packets if p.src == src and p.dst == dst and p.rtcp_types]


def rtp_ssrcs(packets: list[Packet], leg: tuple[tuple[str, int], tuple[str, int]], *, to_phone: bool) -> set[int]:
    server, phone = leg
    src, dst = (server, phone) if to_phone else (phone, server)
    return {p.rtp_ssrc for p in packets if p.src == src and p.dst == dst and p.rtp_ssrc is not None}


def both_ways_reported(packets: list[Packet], legs: int) -> bool:
    """Each of ``legs`` legs has had a report block on a stream from the server and one from its phone."""
    seen = flows(packets)
    return len(seen) == legs and all(
        any(any(p.blocks) for p in rtcp_of(packets, leg, to_phone=True)) and any(any(p.blocks) for p in rtcp_of(packets, leg, to_phone=False))
        for leg in seen
    )


def answered_after_ours(packets: list[Packet]) -> bool:
    """Whether an RTCP datagram went from the phone to the server after one
    from the server reached it: one that can carry our SR's LSR."""
    ours = next((i for i, p in enumerate(packets) if p.src[0] == MEDIA_IP and p.src[1] % 2), None)
    return ours is not None and any(p.dst[0] == MEDIA_IP and p.dst[1] % 2 for p in packets[ours:])


def assert_consistent(packets: list[Packet], leg: tuple[tuple[str, int], tuple[str, int]]) -> None:
    """Every report the server sent this leg's phone names the one SSRC of the
    RTP the phone receives as its sender, and reports on the phone's own."""
    received, sent = rtp_ssrcs(packets, leg, to_phone=True), rtp_ssrcs(packets, leg, to_phone=False)
    assert len(received) == 1 and len(sent) == 1, (received, sent)
    reports = rtcp_of(packets, leg, to_phone=True)
    assert any(rtcp.SR in p.rtcp_types for p in reports), reports
    for report in reports:
        assert set(report.senders) | set(report.chunks) == received, (report, received)
        # pjsua2's first report, sent before any RTP reached it, has a block on SSRC 0.
        assert set(report.blocks) <= sent | {0}, (report, sent)
    assert any(any(report.blocks) for report in reports)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    folder = tmp_path / "pbx"
    sounds, flow_dir = folder / "sounds", folder / "ivr_flows"
    sounds.mkdir(parents=True)
    flow_dir.mkdir()
    write_tone(sounds / "tone.wav", 600, 8.0)
    write_tone(sounds / "beep.wav", 1000, 0.5)
    for name, text in FLOWS.items():
        (flow_dir / f"{name}.yaml").write_text(text)
    srv = await start_server(
        folder, ivr={"dir": str(flow_dir)}, sounds={"dir": str(sounds)}, inbound={"8000": "ivr:wait", "8001": "ivr:transfer"},
        rtp={"ip": MEDIA_IP},
    )  # fmt: skip
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    cap = await Capture.start()
    yield cap
    await cap.stop()


async def outbound_quality(server: Server, mark: int, legs: int) -> list[re.Match[str]]:
    """The leg_quality log lines with the phones' view, once ``legs`` are in."""
    async with asyncio.timeout(10):
        while len(found := [m for line in server.log[mark:] if (m := QUALITY_LINE.search(line))]) < legs:
            await server.wait_log(r"event=leg_quality", start=len(server.log))
    return found


@needs_tshark
async def test_a_caller_in_the_ivr_gets_the_servers_own_reports_and_its_own_count_outbound(server: Server, capture: Capture) -> None:
    async with await Phone.start(name="alice") as alice:
        await alice.register(server.sip, "1001", PASSWORDS["1001"])
        mark = len(server.log)
        call = await alice.call("sip:8000@pbx.local")
        await alice.wait_event("call_state", call=call, state="confirmed")
        await capture.until(lambda packets: both_ways_reported(packets, 1) and answered_after_ours(packets))
        await alice.hangup(call)
        await alice.wait_event("call_state", call=call, state="disconnected")
        (quality,) = await outbound_quality(server, mark, 1)

    (leg,) = flows(capture.packets)
    assert_consistent(capture.packets, leg)
    # pjsua2 answered our SR with its LSR: the round trip was timed, on loopback in no time.
    assert quality["rtt"] is not None and float(quality["rtt"]) < 50
    assert float(quality["out_mos"]) > 4.2
    assert await server.metric("pbx_call_mos_count", direction="outbound") == 1
    assert await server.metric("pbx_call_mos_bucket", direction="outbound", le="4.5") == 1
    assert await server.metric("pbx_call_mos_count", direction="inbound") == 1


@needs_tshark
async def test_a_bridged_call_relays_reports_under_the_ssrcs_each_phone_sees(server: Server, capture: Capture) -> None:
    async with await Phone.start(name="alice") as alice, await Phone.start(name="bob") as bob:
        await alice.register(server.sip, "1001", PASSWORDS["1001"])
        await bob.register(server.sip, "1002", PASSWORDS["1002"])
        mark = len(server.log)
        call = await alice.call("sip:8001@pbx.local")
        incoming = await bob.wait_event("incoming", timeout=15)
        await bob.answer(incoming["call"])
        await alice.wait_event("call_state", call=call, state="confirmed")
        await capture.until(lambda packets: both_ways_reported(packets, 2))
        await alice.hangup(call)
        await bob.wait_event("call_state", call=incoming["call"], state="disconnected")
        await outbound_quality(server, mark, 2)

    legs = flows(capture.packets)
    for leg in legs:
        assert_consistent(capture.packets, leg)
    phones = {ssrc for leg in legs for ssrc in rtp_ssrcs(capture.packets, leg, to_phone=False)}
    # The leg that heard the prompt gets the other phone's audio in the
    # server's own stream, so its reports had to be renumbered both ways.
    assert any(rtp_ssrcs(capture.packets, leg, to_phone=True) - phones for leg in legs)
    assert await server.metric("pbx_call_mos_count", direction="outbound") == 2
    assert await server.metric("pbx_call_mos_bucket", direction="outbound", le="4.5") == 2


@needs_tshark
async def test_an_srtp_caller_and_the_server_read_each_others_srtcp(server: Server, capture: Capture) -> None:
    async with await Phone.start(name="carol", srtp="mandatory") as carol:
        await carol.register(server.sip, "1003", PASSWORDS["1003"])
        mark = len(server.log)
        call = await carol.call("sip:8000@pbx.local")
        await carol.wait_event("call_state", call=call, state="confirmed")
        assert (await carol.wait_event("media", call=call, active=True))["srtp"]
        # tshark cannot read SRTCP, but sees the datagrams go by.
        await capture.until(answered_after_ours)
        await carol.hangup(call)
        await carol.wait_event("call_state", call=call, state="disconnected")
        (quality,) = await outbound_quality(server, mark, 1)
    # Its report came through SRTCP with the LSR of our SRTCP SR.
    assert quality["rtt"] is not None and float(quality["out_mos"]) > 4.2
