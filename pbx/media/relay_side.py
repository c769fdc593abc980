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
reports of our own where there is nothing to relay (:mod:`pbx.media.relay_rtcp`).

In the server, the second process (:mod:`pbx.media.relay_worker`) reads
the RTP socket: it forwards what fits the side's ``route()`` (its latched
peer's packets of the one payload type that needs nothing but forwarding,
to the other side's peer) and hands everything else to
``datagram_received``, the counts of what it forwarded to ``counted`` and
what the side measures of it to ``measured``. Every change that could
change the route (a new SDP, a latched source, a listener, SRTP, the other
side's own stream) sends the new one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

from typing import TYPE_CHECKING, Any

from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.codecs import Codec, transcoding_table
from pbx.media.playback import PeerStream
from pbx.media.relay_rtcp import RtcpForwarder, source_ip
from pbx.media.relay_process import RELAYED, SAMPLED, TAPPED
from pbx.media.relay_stats import ReceiveStats, RelayCounters
from pbx.media.rtp_packet import RTP_HEADER, Address, PayloadRules, payload_bounds, rewrite, unpack_timestamp
from pbx.security import security_event

if TYPE_CHECKING:
    from pbx.media.relay_worker import RelayWorker

logger = logging.getLogger(__name__)

_now = time.monotonic
# RFC 4733 §3.2 event codes 0-15: the DTMF keys.
_DTMF_KEYS = "0123456789*#ABCD"
# A side reports strangers at most this often (seconds), each IP only once.
_STRANGER_REPORT_INTERVAL = 5.0


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
        self.worker: RelayWorker | None = None  # the process reading our RTP socket, when one does
        self.sid = 0  # our number there
        self._route: tuple[Any, ...] | None = None  # the last one it was given
        self._on_audio: Callable[[bytes, int], None] | None = None
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
        """Told (payload, payload type) of every other RTP packet the peer sends us."""
        return self._on_audio

    @on_audio.setter
    def on_audio(self, listener: Callable[[bytes, int], None] | None) -> None:
        self._on_audio = listener
        self.route()

    @property
    def unprotect(self) -> Callable[[bytes], bytes | None] | None:
        """SRTP (:mod:`pbx.media.srtp`): decrypts a packet from the peer, None
        when it is not authentic; that side's transports also encrypt on send."""
        return self._unprotect

    @unprotect.setter
    def unprotect(self, unprotect: Callable[[bytes], bytes | None] | None) -> None:
        self._unprotect = unprotect
        self._changed()

    def route(self) -> None:
        """Tell the worker, when one reads our socket, which packets it may
        forward itself: the latched source's, of the peer's codec when no rule
        changes it, while neither side uses SRTP and the other side sends no
        stream of its own, to the other side's peer; and whether it must
        show us their audio."""
        worker = self.worker
        if worker is None:
            return
        other = self.other
        codec = self.codec
        fast_pt = -1
        if (
            self.source is not None
            and codec is not None
            and codec.payload_type not in self.rules
            and self._unprotect is None
            and other._unprotect is None
            and not other._rewriting
            and other.worker is worker
        ):
            fast_pt = codec.payload_type
        route = (self.source if fast_pt >= 0 else None, fast_pt, other.sid, other.dest, self._on_audio is not None)
        if route != self._route:
            self._route = route
            worker.route(self, route)

    def _changed(self) -> None:
        """Both routes may have changed: ours, and the other side's, which ends at our peer."""
        self.route()
        self.other.route()

    def _own_stream(self) -> None:
        if not self._rewriting:
            super()._own_stream()
            self.other.route()

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
            self.signalling_ip = _ip_text(signalling_ip)
        if not self.held and addr != self.remote:
            self.remote = addr
            self._remote_ip = _ip_text(host)
            self.source = None
            self.rtcp.source = None
        self.codec = codec
        self.dtmf_pt = dtmf_pt
        self.stats.tick = 1.0 / codec.clock_rate
        self.stats.skip_pt = dtmf_pt
        interval = self._media_clock.interval if self._media_clock is not None else 0.020
        self._samples = round(codec.clock_rate * interval)
        self._update_dest()
        self.rules = _payload_rules(self, self.other)
        self.other.rules = _payload_rules(self.other, self)
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
        if self.held:
            self.dest = None
        elif self.source is not None:
            self.dest = self.source
        elif self.remote is not None and _is_ip(self.remote[0]):
            self.dest = self.remote
        else:
            # A host name would make sendto() resolve it, blocking the loop:
            # wait for the peer's first packet instead.
            self.dest = None

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
                if self._hear(data):
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

    def measured(self, data: bytes, arrival: float, flags: int) -> None:
        """A packet the worker took on our route (and forwarded, when
        ``RELAYED``): sampled into the statistics and shown to ``on_audio`` as
        ``datagram_received`` would have, then counted."""
        stats = self.stats
        stats.last = data
        if flags & SAMPLED:
            stats.sample(data, arrival)
        if flags & TAPPED and self._on_audio is not None:
            try:
                self._hear(data)
            except Exception:
                logger.exception("relay side %s: audio listener failed", self.name)
        counters = self.counters
        if flags & RELAYED:
            counters.relayed += 1
            counters.bytes += len(data)
        else:
            counters.dropped += 1

    def counted(self, relayed: int, size: int, dropped: int, last: bytes | None) -> None:
        """Packets the worker forwarded (or dropped, having nowhere to send
        them) on our route since it last said; ``last`` is the newest one's header."""
        counters = self.counters
        counters.relayed += relayed
        counters.bytes += size
        counters.dropped += dropped
        if last is not None:
            self.stats.last = last

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

    def _hear(self, data: bytes) -> bool:
        """Hand a received packet (at least an RTP header long) to ``on_dtmf``
        or ``on_audio``; True when it is of a press kept from the other side."""
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
                self._on_audio(data[bounds[0] : bounds[1]], payload_type)
        return False


def _payload_rules(source: RelaySide, target: RelaySide) -> PayloadRules:
    """What packets from ``source``'s peer need before they reach ``target``'s.

    Payload types without a rule (matching numbers, comfort noise, anything
    unknown) are forwarded unchanged.
    """
    rules: PayloadRules = {}
    src, dst = source.codec, target.codec
    if src is not None and dst is not None:
        table = transcoding_table(src.name, dst.name)
        if table is not None or (src.name.upper() == dst.name.upper() and src.payload_type != dst.payload_type):
            rules[src.payload_type] = (dst.payload_type, table)
        elif src.name.upper() != dst.name.upper():
            logger.warning("relay: cannot convert %s to %s; forwarding it unchanged", src.name, dst.name)
    if source.dtmf_pt is not None and target.dtmf_pt is not None and source.dtmf_pt != target.dtmf_pt:
        rules[source.dtmf_pt] = (target.dtmf_pt, None)
    return rules


def _ip_text(host: str) -> str:
    """``host`` written as the kernel reports a datagram's source: IPv6
    compressed, IPv4 without a ``::ffff:`` prefix; a host name unchanged."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
