"""The media of a bridged call: RTP and RTCP relayed between two legs.

Each leg ("side") has its own socket pair, whose port goes into that leg's
SDP. A packet arriving on one side's RTP socket leaves through the other
side's socket towards the other side's peer. Nothing is parsed into objects
(ENGINE.md, "Bridged calls"): a packet whose payload type needs no change is
sent on as the very ``bytes`` object received; one that does (a different
telephone-event number, PCMU <-> PCMA) is copied once and patched in place.

Symmetric RTP (Asterisk's ``rtp_symmetric``/comedia): the first packet from a
side's peer pins the address we send to that peer, whatever its SDP said, so
phones behind NAT get audio back. After that, packets from other sources on
that socket are dropped, so a stranger cannot inject audio into the call.
A new SDP address from ``set_remote`` starts the learning again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pbx.media.codecs import Codec, transcoding_table
from pbx.media.ports import RtpPortPool, RtpSocketPair

logger = logging.getLogger(__name__)

Address = tuple[str, int]
# Incoming payload type -> (outgoing payload type, translate table or None).
PayloadRules = dict[int, tuple[int, bytes | None]]

_RTP_HEADER = 12


@dataclass(slots=True)
class RelayCounters:
    """Packet counts of one direction (or of a whole relay)."""

    relayed: int = 0  # RTP packets forwarded, transcoded ones included
    transcoded: int = 0  # of those, payloads converted PCMU <-> PCMA
    dropped: int = 0  # no destination yet, wrong source, or not RTP-sized
    bytes: int = 0  # size of the forwarded packets as received

    def __add__(self, other: RelayCounters) -> RelayCounters:
        return RelayCounters(
            self.relayed + other.relayed,
            self.transcoded + other.transcoded,
            self.dropped + other.dropped,
            self.bytes + other.bytes,
        )


class RelaySide(asyncio.DatagramProtocol):
    """One leg of a relay: the RTP socket facing that leg's peer.

    ``counters`` count the packets this side receives, i.e. the direction from
    this side to the other one.
    """

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self.port = 0
        self.other: RelaySide  # set by RtpRelay once both sides exist
        self.transport: asyncio.DatagramTransport  # set by connection_made
        self.rtcp = _RtcpForwarder(self)
        self.codec: Codec | None = None
        self.dtmf_pt: int | None = None
        self.remote: Address | None = None  # the peer's last SDP address, holds aside
        self.held = False  # SDP said 0.0.0.0 or port 0: send the peer nothing
        self.source: Address | None = None  # where the peer's RTP actually comes from
        self.dest: Address | None = None  # where RTP for the peer goes, None: nowhere
        self.rules: PayloadRules = {}  # for packets received here
        self.counters = RelayCounters()
        self.first_packet_at: float | None = None
        self.last_packet_at: float | None = None
        self.on_first_packet: Callable[[], None] | None = None
        self._clock = clock

    def set_remote(self, addr: Address, codec: Codec, dtmf_pt: int | None) -> None:
        """Record the peer's SDP: its RTP address, chosen codec and DTMF payload type.

        Call again on every re-INVITE. An unspecified address (``0.0.0.0``,
        ``::``) or port 0 puts the peer on hold: nothing is sent to it until a
        real address comes back. A different address forgets the learnt source.
        """
        host, port = addr
        self.held = port == 0 or host in ("0.0.0.0", "::")
        if not self.held and addr != self.remote:
            self.remote = addr
            self.source = None
            self.rtcp.source = None
        self.codec = codec
        self.dtmf_pt = dtmf_pt
        self._update_dest()
        self.rules = _payload_rules(self, self.other)
        self.other.rules = _payload_rules(self.other, self)

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
        counters = self.counters
        source = self.source
        if source is None:
            if self.remote is not None:
                self.source = addr
                self._update_dest()
        elif addr != source:
            counters.dropped += 1
            return
        self.last_packet_at = self._clock()
        other = self.other
        dest = other.dest
        if dest is None or len(data) < _RTP_HEADER:
            counters.dropped += 1
        else:
            rule = self.rules.get(data[1] & 0x7F)
            if rule is None:
                other.transport.sendto(data, dest)
            else:
                packet = _rewrite(data, rule)
                if packet is None:
                    counters.dropped += 1
                    return
                other.transport.sendto(packet, dest)
                if rule[1] is not None:
                    counters.transcoded += 1
            counters.relayed += 1
            counters.bytes += len(data)
        if self.first_packet_at is None:
            self.first_packet_at = self.last_packet_at
            if self.on_first_packet is not None:
                self.on_first_packet()

    def error_received(self, exc: Exception) -> None:
        # sendto() failures (unreachable peer, ICMP errors) land here; a lost
        # datagram is part of RTP, so only note it.
        logger.debug("relay side %s port %d: %s", self.name, self.port, exc)


class _RtcpForwarder(asyncio.DatagramProtocol):
    """The RTCP socket of a side: forwards reports raw to the other side's peer."""

    def __init__(self, side: RelaySide) -> None:
        self.side = side
        self.transport: asyncio.DatagramTransport  # set by connection_made
        self.source: Address | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.source is None:
            if self.side.remote is not None:
                self.source = addr
        elif addr != self.source:
            return
        other = self.side.other
        dest = other.rtcp_dest()
        if dest is not None:
            other.rtcp.transport.sendto(data, dest)

    def error_received(self, exc: Exception) -> None:
        logger.debug("relay side %s RTCP: %s", self.side.name, exc)


class RtpRelay:
    """Relays the media of one bridged call between side ``a`` and side ``b``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        """Use ``await RtpRelay.create(pool)``, which also binds the sockets."""
        self.a = RelaySide("a", clock)
        self.b = RelaySide("b", clock)
        self.a.other = self.b
        self.b.other = self.a
        self._pairs: list[RtpSocketPair[RelaySide, _RtcpForwarder]] = []

    @classmethod
    async def create(cls, pool: RtpPortPool) -> RtpRelay:
        """Bind a socket pair per side from ``pool``.

        Raises what the pool raises (RtpPortsExhausted, an OSError) and then
        holds no port.
        """
        relay = cls(asyncio.get_running_loop().time)
        try:
            await relay._bind(relay.a, pool)
            await relay._bind(relay.b, pool)
        except BaseException:
            relay.close()
            raise
        return relay

    async def _bind(self, side: RelaySide, pool: RtpPortPool) -> None:
        pair = await pool.open(lambda: side, lambda: side.rtcp)
        self._pairs.append(pair)
        side.port = pair.port

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per direction: ``{"a_to_b": {...}, "b_to_a": {...}}``."""
        return {"a_to_b": asdict(self.a.counters), "b_to_a": asdict(self.b.counters)}

    def total(self) -> RelayCounters:
        """Both directions added up, e.g. for a metrics event when the call ends."""
        return self.a.counters + self.b.counters

    def close(self) -> None:
        """Close all four sockets and give the ports back; safe to call twice."""
        for pair in self._pairs:
            pair.close()
        self._pairs.clear()


def _rewrite(data: bytes, rule: tuple[int, bytes | None]) -> bytearray | None:
    """A copy of RTP packet ``data`` with the payload type (and payload) changed.

    None when the header's own lengths do not fit the packet.
    """
    payload_type, table = rule
    packet = bytearray(data)
    packet[1] = (data[1] & 0x80) | payload_type  # keep the marker bit
    if table is not None:
        first = data[0]
        start = _RTP_HEADER + 4 * (first & 0x0F)  # CSRCs
        if first & 0x10:  # header extension: 4-byte head, then its length in words
            if len(data) < start + 4:
                return None
            start += 4 + 4 * int.from_bytes(data[start + 2 : start + 4])
        end = len(data) - data[-1] if first & 0x20 else len(data)  # padding
        if start > end:
            return None
        packet[start:end] = data[start:end].translate(table)
    return packet


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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
