"""A relay side's RTCP socket (:mod:`pbx.media.rtcp`): the reports of the
side's peer read, passed on to the other side's peer, and reports of our own
where there is nothing to pass on. Latching follows the RTP side's rules
(:mod:`pbx.media.relay_side`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pbx.media import rtcp
from pbx.media.rtp_packet import RTP_HEADER, Address, unpack_seq_ts_ssrc

if TYPE_CHECKING:
    from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)

_now = time.monotonic


class RtcpForwarder(asyncio.DatagramProtocol):
    """The RTCP socket of a side (:mod:`pbx.media.rtcp`): reads the peer's
    reports into ``peer``, passes them on to the other side's peer (renumbered
    where either side sends a stream of its own), and while the other side
    has no peer, sends reports of our own."""

    def __init__(self, side: RelaySide) -> None:
        self.side = side
        self.source: Address | None = None
        self.unprotect: Callable[[bytes], bytes | None] | None = None  # SRTCP, as RelaySide.unprotect
        self.peer = rtcp.PeerView()  # what the peer's reports say of the stream we send it
        self._peer_sr: tuple[int, float] | None = None  # LSR value of the peer's last SR, and when it came
        self._reported_packets = 0  # side.stream_packets at our last report

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport
        clock = self.side._media_clock
        if clock is not None:
            rtcp.report_timer(clock).add(self)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.unprotect is not None:
            plain = self.unprotect(data)
            if plain is None:
                return
            data = plain
        if addr != self.source and not self._admit(data, addr):
            return
        side = self.side
        other = side.other
        now = _now()
        reports = rtcp.parse_reports(data)
        theirs = None if side._rewriting else self._their_ssrc()
        ours = side._ssrc if theirs is None else theirs  # the stream the peer gets from us, or our reports name
        for report in reports:
            if report.sender is not None:
                self._peer_sr = (rtcp.ntp_middle(report.sender.ntp), now)
            for block in report.blocks:
                if block.ssrc == ours:
                    self.peer.take(block, other.counters.relayed + side.played, now)
        dest = other.rtcp_dest()
        if dest is None:
            return
        if side._rewriting or other._rewriting:
            packet = rtcp.renumber(data, self._source_swap(), self._reported_swap())
            if packet is None:
                return
            other.rtcp.transport.sendto(packet, dest)
        else:
            other.rtcp.transport.sendto(data, dest)
        for report in reports:
            if report.sender is not None:
                other.rtcp.peer.sent_sr(report.sender.ntp, now)

    def _admit(self, data: bytes, addr: Address) -> bool:
        """Whether RTCP from ``addr``, which is not the latched source, is the
        peer's: from the SDP's RTP port + 1 always, else once from the IP the
        peer's RTP comes from, its SDP's or its signalling IP; then it is the source."""
        side = self.side
        remote = side.remote
        if remote is None:
            return False  # no peer yet (see RelaySide._admit)
        host = source_ip(addr)
        if not (host == side._remote_ip and addr[1] == remote[1] + 1):
            rtp_source = side.source
            if (
                self.source is not None
                or (host != side._remote_ip and host != side.signalling_ip and (rtp_source is None or host != source_ip(rtp_source)))
                or len(data) < 8
                or data[0] & 0xC0 != 0x80
                or not 200 <= data[1] <= 207  # SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR
            ):
                side.report_stranger(addr, "rtcp")
                return False
        self.source = addr
        return True

    def _source_swap(self) -> rtcp.SourceSwap | None:
        """How the other side's peer gets our peer's stream, when not as sent."""
        other = self.side.other
        if not other._rewriting:
            return None
        return rtcp.SourceSwap(other._ssrc, other._timestamp_offset, other.stream_packets, other.stream_octets)

    def _reported_swap(self) -> rtcp.ReportedSwap | None:
        """Which stream our peer's report blocks on our own are about: the one
        the other side's peer sends (unknown until it has sent RTP)."""
        side = self.side
        theirs = self._their_ssrc()
        if not side._rewriting or theirs is None:
            return None
        return rtcp.ReportedSwap(side._ssrc, theirs, side._seq_offset if side._in_ssrc == theirs else 0)

    def _their_ssrc(self) -> int | None:
        """The SSRC of the other side's peer's RTP, once it has sent some."""
        last = self.side.other.stats.last
        return unpack_seq_ts_ssrc(last, 2)[2] if len(last) >= RTP_HEADER else None

    def send_report(self) -> bool:
        """Send the peer our SR or RR, with an SDES CNAME, while the other side
        has no peer to relay reports from (the report timer calls this)."""
        side = self.side
        if side.closed:
            return False
        dest = side.rtcp_dest()
        if dest is None or side.other.remote is not None:
            return True
        now = _now()
        sender = None
        if side.stream_packets != self._reported_packets:
            self._reported_packets = side.stream_packets
            sender = rtcp.SenderInfo(rtcp.ntp_timestamp(time.time()), self._timestamp_now(), side.stream_packets, side.stream_octets)
            self.peer.sent_sr(sender.ntp, now)
        self.transport.sendto(rtcp.build_report(side._ssrc, sender, self._block(now)) + rtcp.build_sdes(side._ssrc), dest)
        return True

    def _timestamp_now(self) -> int:
        """Our stream's RTP timestamp for the current clock tick."""
        side = self.side
        clock, position = side._media_clock, side._position
        ticks = clock.tick - position if clock is not None and position is not None else 0
        return (side._timestamp + ticks * side._samples) & 0xFFFFFFFF

    def _block(self, now: float) -> tuple[rtcp.ReportBlock, ...]:
        """Our report block on the peer's stream, none before it sent RTP."""
        lsr, dlsr = 0, 0
        if self._peer_sr is not None:
            lsr, at = self._peer_sr
            dlsr = int((now - at) * 65536)
        block = self.side.stats.report_block(lsr, dlsr)
        return () if block is None else (block,)

    def error_received(self, exc: Exception) -> None:
        logger.debug("relay side %s RTCP: %s", self.side.name, exc)


def source_ip(addr: Address) -> str:
    """The IP of a datagram's source; an IPv4 peer of a dual-stack socket without its ``::ffff:``."""
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host
