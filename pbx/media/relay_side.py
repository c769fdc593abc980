"""One side of a relay: the RTP and RTCP sockets facing one leg's peer, and
the rules for what they take from whom.

Media belongs to the call (Asterisk's ``strictrtp``, rtpengine's
``strict-source``): a side takes packets only from its peer. Until its SDP
is known (``set_remote``) a side takes nothing and the other side sends it
nothing. Then the peer is the address its SDP named: a packet from there
becomes the side's ``source`` for good. A phone behind NAT sends from another
address than its SDP says, so until the SDP address has spoken, the first
RTP packet that comes from the peer's signalling IP (the source of its SIP
messages) or its SDP IP and carries a negotiated payload type latches the
source once; after that only the SDP address itself can still take over.
One such packet is enough: Asterisk asks for a few in sequence (its
``probation``) because it latches onto any host, but here a stranger on
another host can never latch, and one on the peer's own host could send a
sequence as easily as one packet; waiting would only cut the start of the
call's audio. RTCP follows the same rules on the odd port, latching from the
RTP source's, the SDP's or the signalling IP. Everything else is a
stranger's: dropped, counted in ``side.strangers`` and reported as the
``rtp_stranger`` security event, at most once per stranger IP per side and
once every few seconds per side, so a spray cannot flood the log. (Packets
that reach a side before its peer is known are dropped without a report: the
callee's answer may still be on its way.) A stranger that shares the peer's
very address, such as a phone still sending to this port for a call of a
process before a restart, shows in the statistics as a second stream
interleaving with the peer's (:class:`ReceiveStats`): reported once per side
as ``rtp_stranger`` with ``senders=2``. A new SDP address from
``set_remote`` starts the learning again under the same rules. The accepted
path pays one address comparison for all this.

A packet taken from the peer leaves through the other side's socket towards
the other side's peer: as the very ``bytes`` object received when its payload
type needs no change, else copied once and patched in place (a different
telephone-event number, PCMU <-> PCMA). Received RFC 4733 events are reported
through ``side.on_dtmf``, which may keep a press from the other side (a
feature code), and received audio through ``side.on_audio``; the
statistics of what the peer sends are in ``side.stats``
(:mod:`pbx.media.relay_stats`). What a side sends its peer of its own is in
:mod:`pbx.media.playback`, its base class. RTCP from the peer takes the same
way through the side's :class:`RtcpForwarder`, which also reads it and sends
reports of our own where there is nothing to relay (:mod:`pbx.media.rtcp`).

In the server, the relay process (:mod:`pbx.media.relay_worker`) reads the
RTP socket: it forwards what needs nothing but forwarding, hands the rest to
``datagram_received``, and is told (``reroute``) whenever that may change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from pbx.events import EventBus
from pbx.media import rtcp
from pbx.media.clock import MediaClock
from pbx.media.codecs import Codec, payload_rules
from pbx.media.playback import PeerStream
from pbx.media.relay_stats import ReceiveStats, RelayCounters
from pbx.media.rtp_packet import RTP_HEADER, Address, PayloadRules, ip_text, is_ip, payload_bounds, rewrite, source_ip, unpack_seq_ts_ssrc, unpack_timestamp
from pbx.security import security_event

logger = logging.getLogger(__name__)

_now = time.monotonic
# RFC 4733 §3.2 event codes 0-15: the DTMF keys.
_DTMF_KEYS = "0123456789*#ABCD"
# A side reports strangers at most this often (seconds), each IP only once.
_STRANGER_REPORT_INTERVAL = 5.0


class SocketReader(Protocol):
    """What reads relay sides' RTP sockets in their place (:class:`pbx.media.relay_worker.RelayWorker`)."""

    def reroute(self, side: RelaySide) -> None: ...
    def sync(self, sides: list[RelaySide]) -> None: ...
    def detach(self, sides: list[RelaySide]) -> None: ...


class RelaySide(PeerStream, asyncio.DatagramProtocol):
    """One leg of a relay: the RTP socket facing that leg's peer.

    What it sends the peer of its own (``play``, ``tune_in``, ``start_filling``) comes from
    its base, :class:`~pbx.media.playback.PeerStream`, whose ``codec``,
    ``dest`` and ``transport`` this class keeps.

    ``counters`` count the packets this side receives, i.e. the direction from
    this side to the other one; packets held back while the other side plays
    count as dropped there.
    """

    def __init__(self, name: str, media_clock: MediaClock | None = None) -> None:
        self.worker: SocketReader | None = None  # the process reading our RTP socket, when one does
        self.sid = 0  # our number there
        self._on_audio: Callable[[bytes, int], None] | None = None
        self.heard_at: float | None = None  # see on_audio: the relay process hands the server audio in batches
        self._unprotect: Callable[[bytes], bytes | None] | None = None
        self.name = name
        self.port = 0
        self.other: RelaySide  # set by RtpRelay once both sides exist
        self.rtcp = RtcpForwarder(self)
        self.codec = None
        self.dtmf_pt: int | None = None
        self.remote: Address | None = None  # the peer's last SDP address, holds aside
        self.held = False  # SDP said 0.0.0.0 or port 0: send the peer nothing
        self.source: Address | None = None  # where the peer's RTP actually comes from
        self.signalling_ip: str | None = None  # where the peer's SIP comes from: its RTP may too
        self.events: EventBus | None = None  # where strangers are reported; set by RtpRelay
        self.strangers = 0  # packets (RTP and RTCP) dropped because a stranger sent them
        self._remote_ip: str | None = None  # of ``remote``, written as the kernel reports sources
        self._reported: set[str] = set()  # stranger IPs already reported
        self._departed: set[Address] = set()  # where peers that left the side (a transfer) sent from
        self._report_after = 0.0  # no stranger report before this time
        self.dest = None
        self.rules: PayloadRules = {}  # for packets received here
        self.counters = RelayCounters()
        self.stats = ReceiveStats(self.counters)  # of the RTP the peer sends us
        self.stats.on_two_senders = self._report_two_senders
        # Each RFC 4733 key press once, as "0"-"9", "*", "#", "A"-"D"; True
        # keeps that press from the other side (a feature code, pbx.calls.feature_keys).
        self.on_dtmf: Callable[[str], bool | None] | None = None
        self._keeping = False  # the press being received is kept from the other side
        super().__init__(media_clock)
        self._dtmf_timestamp: int | None = None  # of the last event reported

    @property
    def on_audio(self) -> Callable[[bytes, int], None] | None:
        """Told (payload, payload type) of every other RTP packet the peer sends us; it arrived at ``heard_at`` (loop time), or just now if None."""
        return self._on_audio

    @on_audio.setter
    def on_audio(self, listener: Callable[[bytes, int], None] | None) -> None:
        self._on_audio = listener
        self._changed()

    @property
    def unprotect(self) -> Callable[[bytes], bytes | None] | None:
        """SRTP (pbx.media.srtp): a packet from the peer decrypted, None if not authentic."""
        return self._unprotect

    @unprotect.setter
    def unprotect(self, unprotect: Callable[[bytes], bytes | None] | None) -> None:
        self._unprotect = unprotect
        self._changed()

    def _changed(self) -> None:  # our route may have changed, and the other side's, which ends at our peer
        if self.worker is not None:
            self.worker.reroute(self)
            self.worker.reroute(self.other)

    def _own_stream(self) -> None:
        super()._own_stream()
        self._changed()

    def set_remote(self, addr: Address, codec: Codec, dtmf_pt: int | None, signalling_ip: str | None = None) -> None:
        """Record the peer's SDP: its RTP address, chosen codec and DTMF payload type.

        Call again on every re-INVITE. An unspecified address (``0.0.0.0``,
        ``::``) or port 0 puts the peer on hold: nothing is sent to it until a
        real address comes back. A different address forgets the learnt source.
        ``signalling_ip``, the source address of the peer's SIP messages, is
        where a peer behind NAT may send RTP from instead of its SDP address;
        without it only the SDP's IP may.
        """
        host, port = addr
        self.held = port == 0 or host in ("0.0.0.0", "::")
        if signalling_ip is not None:
            self.signalling_ip = ip_text(signalling_ip)
        if not self.held and addr != self.remote:
            self.remote = addr
            self._remote_ip = ip_text(host)
            self.source = None
            self.rtcp.source = None
        self.codec = codec
        self.dtmf_pt = dtmf_pt
        self.stats.tick = 1.0 / codec.clock_rate
        self.stats.skip_pt = dtmf_pt
        interval = self._media_clock.interval if self._media_clock is not None else 0.020
        self._samples = round(codec.clock_rate * interval)
        self._update_dest()
        self.rules = payload_rules(codec, dtmf_pt, self.other.codec, self.other.dtmf_pt)
        self.other.rules = payload_rules(self.other.codec, self.other.dtmf_pt, codec, dtmf_pt)
        self._changed()

    def forget_peer(self) -> None:
        """The peer left the call (a transfer, a park): send it nothing, and
        take what reaches the side as nobody's (dropped, not reported as a
        stranger's) until the next peer's SDP, as before a call's first answer.
        What the party that left goes on sending until its BYE is dropped
        unreported too: it is a known party, not a stranger."""
        remote = self.remote
        rtcp_remote = (remote[0], remote[1] + 1) if remote is not None else None
        self._departed.update(a for a in (remote, rtcp_remote, self.source, self.rtcp.source) if a is not None)
        self.remote = self.source = self.rtcp.source = None
        self._remote_ip = None
        self._update_dest()
        self._changed()

    def _update_dest(self) -> None:
        # Never a host name, which would make sendto() resolve it, blocking the loop: the peer's first packet tells.
        if self.held:
            self.dest = None
        elif self.source is not None:
            self.dest = self.source
        else:
            self.dest = self.remote if self.remote is not None and is_ip(self.remote[0]) else None

    def rtcp_dest(self) -> Address | None:
        """Where RTCP for the peer goes: its learnt RTCP source, else RTP port + 1."""
        if self.held:
            return None
        if self.rtcp.source is not None:
            return self.rtcp.source
        if self.dest is None:
            return None
        return (self.dest[0], self.dest[1] + 1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._unprotect is not None:
            # Before anything else: a packet that fails SRTP authentication latches nothing.
            plain = self._unprotect(data)
            if plain is None:
                self.counters.dropped += 1
                self.stats.stray += 1
                return
            data = plain
        counters = self.counters
        if addr != self.source and not self._admit(data, addr):
            counters.dropped += 1
            self.stats.stray += 1
            return
        if len(data) < RTP_HEADER:
            counters.dropped += 1
            self.stats.stray += 1
            return
        stats = self.stats
        stats.last = data
        if not (data[3] + 1) & 14:  # sequence number 16n - 1 or 16n; the counters below count them all
            stats.sample(data, _now())
        if self.on_dtmf is not None or self._on_audio is not None:
            try:
                if self.hear(data):
                    counters.dropped += 1
                    return
            except Exception:
                # A listener's bug must not cost the call its audio.
                logger.exception("relay side %s: DTMF/audio listener failed", self.name)
        other = self.other
        dest = other.dest
        if dest is None:
            counters.dropped += 1
        elif other._rewriting:
            rule = self.rules.get(data[1] & 0x7F)
            if other._relay_into_stream(data, rule, dest):
                if rule is not None and rule[1] is not None:
                    counters.transcoded += 1
                counters.relayed += 1
                counters.bytes += len(data)
            else:
                counters.dropped += 1
        else:
            rule = self.rules.get(data[1] & 0x7F)
            if rule is None:
                other.transport.sendto(data, dest)
            else:
                packet = rewrite(data, rule)
                if packet is None:
                    counters.dropped += 1
                    return
                other.transport.sendto(packet, dest)
                if rule[1] is not None:
                    counters.transcoded += 1
            counters.relayed += 1
            counters.bytes += len(data)

    def _admit(self, data: bytes, addr: Address) -> bool:
        """Whether RTP from ``addr``, which is not the side's source, is the
        peer's; if so ``addr`` becomes the source (the module docstring has the rules)."""
        remote = self.remote
        if remote is None:
            return False  # no peer yet, so no stranger either: the peer's answer may be on its way
        host = source_ip(addr)
        if not (host == self._remote_ip and addr[1] == remote[1]):
            if (
                self.source is not None
                or (host != self._remote_ip and host != self.signalling_ip)
                or len(data) < RTP_HEADER
                or data[0] & 0xC0 != 0x80
                or not self._negotiated(data[1] & 0x7F)
            ):
                self.report_stranger(addr, "rtp")
                return False
            logger.debug("relay side %s port %d: peer's RTP comes from %s, not %s", self.name, self.port, addr, remote)
        self.source = addr
        self._update_dest()
        if self.stats.first_seq < 0 and len(data) >= RTP_HEADER:
            self.stats.first_seq = data[2] << 8 | data[3]
        self._changed()
        return True

    def _negotiated(self, payload_type: int) -> bool:
        codec = self.codec
        return (codec is not None and payload_type == codec.payload_type) or payload_type == self.dtmf_pt

    def report_stranger(self, addr: Address, stream: str) -> None:
        """Count a packet a stranger sent to this side's ``stream`` ("rtp", "rtcp")
        and report it as a security event, unless reported lately (module docstring)."""
        if addr in self._departed:
            return
        self.strangers += 1
        events = self.events
        if events is None:
            return
        host = source_ip(addr)
        now = _now()
        if now < self._report_after or host in self._reported:
            return
        self._report_after = now + _STRANGER_REPORT_INTERVAL
        self._reported.add(host)
        security_event(events, "rtp_stranger", host, port=addr[1], side=self.name, local_port=self.port, stream=stream)

    def _report_two_senders(self) -> None:
        source = self.source  # where both streams come from: statistics count only admitted packets
        if self.events is not None and source is not None:
            security_event(self.events, "rtp_stranger", source_ip(source), port=source[1], side=self.name, local_port=self.port, stream="rtp", senders=2)

    def error_received(self, exc: Exception) -> None:
        # sendto() failures (unreachable peer, ICMP errors) land here; a lost
        # datagram is part of RTP, so only note it.
        logger.debug("relay side %s port %d: %s", self.name, self.port, exc)

    def hear(self, data: bytes, arrival: float | None = None) -> bool:
        """Hand a received packet (at least an RTP header long) to ``on_dtmf``
        or ``on_audio`` (``arrival``: see on_audio); True when it is of a press kept from the other side."""
        payload_type = data[1] & 0x7F
        if payload_type == self.dtmf_pt:
            on_dtmf = self.on_dtmf
            bounds = payload_bounds(data)
            if on_dtmf is None or bounds is None or bounds[1] - bounds[0] < 4:
                return False
            # RFC 4733: every packet of one event (updates, repeated ends) has
            # the event's start as timestamp; a new press gets a new one.
            (timestamp,) = unpack_timestamp(data, 4)
            event = data[bounds[0]]
            if timestamp != self._dtmf_timestamp and event < len(_DTMF_KEYS):
                self._dtmf_timestamp = timestamp
                self._keeping = bool(on_dtmf(_DTMF_KEYS[event]))
            return self._keeping and timestamp == self._dtmf_timestamp
        if self._on_audio is not None:
            bounds = payload_bounds(data)
            if bounds is not None:
                self.heard_at = arrival
                self._on_audio(data[bounds[0] : bounds[1]], payload_type)
        return False


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


