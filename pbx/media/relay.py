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

The server can also talk to a side itself (IVR prompts, music on hold, later
queues) without a re-INVITE, since the peer's SDP already points at the side's
port: ``side.play(frames)`` sends one pre-encoded 20 ms payload per tick of
the process's shared ``MediaClock`` (no task per call), while whatever the
other side relays towards that peer is held back. A sender that serves many
sides from one stream of its own (music on hold) hands each side its frame
with ``side.send_frame(payload, tick)`` instead. Received RFC 4733 events are
reported through ``side.on_dtmf`` and received audio through ``side.on_audio``.

What the peer receives stays one continuous RTP stream across the switches
between our frames and relayed packets: once a side has played, it sends
everything under its own SSRC, and relayed packets get their sequence number
and timestamp moved by an offset fixed at each switch. A side that never
plays keeps the untouched pass-through path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from pbx.media.clock import ClockSubscription, MediaClock
from pbx.media.codecs import Codec, transcoding_table
from pbx.media.ports import RtpPortPool, RtpSocketPair

logger = logging.getLogger(__name__)

Address = tuple[str, int]
# Incoming payload type -> (outgoing payload type, translate table or None).
PayloadRules = dict[int, tuple[int, bytes | None]]

_RTP_HEADER = 12
_SEQ_TS_SSRC = struct.Struct("!HII")  # RTP header bytes 2-11
_TIMESTAMP = struct.Struct("!I")  # RTP header bytes 4-7
# RFC 4733 §3.2 event codes 0-15: the DTMF keys.
_DTMF_KEYS = "0123456789*#ABCD"
# One struct per payload size: a whole packet (version byte, marker and
# payload type, sequence, timestamp, SSRC, payload) in one pack_into call.
_PACKETS: dict[int, struct.Struct] = {}


class NoMediaClock(RuntimeError):
    """``play()`` on a relay that was created without a ``MediaClock``."""


class Playback:
    """Frames being played to one relay side; returned by ``RelaySide.play``.

    ``done`` resolves True when the last frame has been sent (never, for a
    looping playback) and False when it was stopped or replaced first.
    """

    __slots__ = ("frames", "loop", "done", "_index", "_side")

    def __init__(self, side: RelaySide, frames: Sequence[bytes], loop: bool, done: asyncio.Future[bool]) -> None:
        self.frames = frames
        self.loop = loop
        self.done = done
        self._index = 0  # the frame the next tick sends
        self._side: RelaySide | None = side  # None once finished

    @property
    def playing(self) -> bool:
        """True until the playback has ended, whichever way."""
        return self._side is not None

    def stop(self) -> None:
        """Stop sending (``done`` becomes False); a no-op once ended."""
        if self._side is not None:
            self._side._end_playback(self, False)


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
    this side to the other one; packets held back while the other side plays
    count as dropped there.
    """

    def __init__(self, name: str, media_clock: MediaClock | None = None) -> None:
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
        # Each RFC 4733 key press once, as "0"-"9", "*", "#", "A"-"D".
        self.on_dtmf: Callable[[str], None] | None = None
        # (payload, payload type) of every other RTP packet the peer sends us.
        self.on_audio: Callable[[bytes, int], None] | None = None
        self.played = 0  # frames of our own sent to the peer
        self.closed = False  # set by RtpRelay.close()
        self._media_clock = media_clock
        self._dtmf_timestamp: int | None = None  # of the last event reported
        # Our own outgoing stream, used once this side has played something.
        self._playback: Playback | None = None
        self._subscription: ClockSubscription | None = None
        self._rewriting = False  # relayed packets go out in our stream
        self._ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)  # of the last packet the peer got
        self._timestamp = random.getrandbits(32)  # of the last packet the peer got
        self._position: int | None = None  # clock tick that last packet stands for
        self._in_ssrc: int | None = None  # relayed stream the offsets are for
        self._seq_offset = 0
        self._timestamp_offset = 0
        self._packet = bytearray(_RTP_HEADER + 160)  # reused for every frame we send
        self._packer = _packet_struct(160)
        self._samples = 160  # RTP clock units per frame: 20 ms at 8000 Hz

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
        interval = self._media_clock.interval if self._media_clock is not None else 0.020
        self._samples = round(codec.clock_rate * interval)
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
        if self.on_dtmf is not None or self.on_audio is not None:
            try:
                self._hear(data)
            except Exception:
                # A listener's bug must not cost the call its audio.
                logger.exception("relay side %s: DTMF/audio listener failed", self.name)
        other = self.other
        dest = other.dest
        if dest is None or len(data) < _RTP_HEADER:
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
                packet = _rewrite(data, rule)
                if packet is None:
                    counters.dropped += 1
                    return
                other.transport.sendto(packet, dest)
                if rule[1] is not None:
                    counters.transcoded += 1
            counters.relayed += 1
            counters.bytes += len(data)

    def error_received(self, exc: Exception) -> None:
        # sendto() failures (unreachable peer, ICMP errors) land here; a lost
        # datagram is part of RTP, so only note it.
        logger.debug("relay side %s port %d: %s", self.name, self.port, exc)

    # --- the server talking to this side ---

    @property
    def playback(self) -> Playback | None:
        """What is being played to this side now, if anything."""
        return self._playback

    def play(self, payloads: Sequence[bytes], *, loop: bool = False) -> Playback:
        """Send ``payloads`` to this side's peer, one per media clock tick.

        Each payload is one pre-encoded 20 ms frame in the side's negotiated
        codec; it goes out under that codec's payload type. Replaces what was
        playing. Until the playback ends, packets relayed from the other side
        to this peer are dropped; then relaying resumes, still in our stream.
        While the side has no destination (no address yet, on hold) frames are
        used up without being sent. ``loop=True`` starts over after the last
        frame until stopped. Raises NoMediaClock when the relay has no clock.
        """
        clock = self._media_clock
        if clock is None:
            raise NoMediaClock(f"relay side {self.name} cannot play: create the relay with RtpRelay.create(pool, clock)")
        if self.closed:
            raise RuntimeError(f"relay side {self.name} is closed")
        frames = payloads if isinstance(payloads, tuple) else tuple(payloads)
        playback = Playback(self, frames, loop, asyncio.get_running_loop().create_future())
        if not frames:
            self.stop_playback()
            self._end_playback(playback, True)
            return playback
        current = self._playback
        self._playback = playback
        self._rewriting = True
        self._in_ssrc = None
        if current is not None:
            self._end_playback(current, False)
        if self._subscription is None:
            self._subscription = clock.subscribe(self._tick)
        return playback

    def stop_playback(self) -> None:
        """Stop what is playing to this side, if anything; relaying resumes."""
        if self._playback is not None:
            self._end_playback(self._playback, False)

    def _end_playback(self, playback: Playback, played_out: bool) -> None:
        playback._side = None
        if not playback.done.done():  # the caller may have cancelled it
            playback.done.set_result(played_out)
        if self._playback is playback:
            self._playback = None
            self._in_ssrc = None  # the next relayed packet fixes new offsets
            if self._subscription is not None and self._media_clock is not None:
                self._media_clock.unsubscribe(self._subscription)
                self._subscription = None

    def send_frame(self, payload: bytes, tick: int) -> None:
        """Send one pre-encoded 20 ms frame of our own stream, stamped for clock tick ``tick``.

        For senders that share one stream among many sides (music on hold),
        called from their clock callback; ``play()`` uses it too. The frame
        goes out under the side's codec payload type, SSRC and next sequence
        number, with a marker and the clock's time when the last packet the
        peer got was not for ``tick - 1``. Counted in ``played``. Without a
        destination (no address yet, on hold) or codec nothing is sent.
        Unlike ``play()`` it does not hold back what the other side relays;
        packets relayed afterwards continue this stream.
        """
        # Called from outside play(), this side may not have taken its stream
        # over yet; and the next relayed packet must fix new offsets after us.
        self._rewriting = True
        self._in_ssrc = None
        dest = self.dest
        codec = self.codec
        if dest is None or codec is None:
            return
        if self._position == tick - 1:
            second = codec.payload_type
            timestamp = (self._timestamp + self._samples) & 0xFFFFFFFF
        else:  # a talkspurt starts (or our stream takes over): marker
            second = codec.payload_type | 0x80
            timestamp = self._next_timestamp(tick)
        seq = (self._seq + 1) & 0xFFFF
        packer = self._packer
        if packer.size != _RTP_HEADER + len(payload):
            packer = self._packer = _packet_struct(len(payload))
            self._packet = bytearray(packer.size)
        packer.pack_into(self._packet, 0, 0x80, second, seq, timestamp, self._ssrc, payload)
        # The transport copies the buffer only if the socket would block.
        self.transport.sendto(self._packet, dest)
        self._seq = seq
        self._timestamp = timestamp
        self._position = tick
        self.played += 1

    def _tick(self, tick: int) -> None:
        """Send the next frame: the per-packet path of every prompt played."""
        playback = self._playback
        if playback is None:
            return
        frames = playback.frames
        index = playback._index
        self.send_frame(frames[index], tick)
        index += 1
        if index < len(frames):
            playback._index = index
        elif playback.loop:
            playback._index = 0
        else:
            self._end_playback(playback, True)

    def _next_timestamp(self, position: int) -> int:
        """Timestamp of a packet for clock tick ``position`` after a gap or switch.

        It moves on by the ticks since the last packet the peer got (at least
        one frame), so the peer's jitter buffer sees real time pass.
        """
        last = self._position
        frames = 1 if last is None else max(position - last, 1)
        return (self._timestamp + frames * self._samples) & 0xFFFFFFFF

    def _relay_into_stream(self, data: bytes, rule: tuple[int, bytes | None] | None, dest: Address) -> bool:
        """Forward a packet from the other side within this side's own stream.

        Used once this side has played: the SSRC becomes ours, and sequence
        number and timestamp continue ours by offsets fixed at the first packet
        after a switch (end of playback, or a new SSRC from the other peer).
        False when not sent: something is playing, or the packet is malformed.
        """
        if self._playback is not None:
            return False
        packet = bytearray(data) if rule is None else _rewrite(data, rule)
        if packet is None:
            return False
        clock = self._media_clock
        position = clock.tick + 1 if clock is not None else 0
        seq, timestamp, ssrc = _SEQ_TS_SSRC.unpack_from(packet, 2)
        if ssrc != self._in_ssrc:
            self._in_ssrc = ssrc
            self._seq_offset = (self._seq + 1 - seq) & 0xFFFF
            self._timestamp_offset = (self._next_timestamp(position) - timestamp) & 0xFFFFFFFF
            packet[1] |= 0x80
        seq = (seq + self._seq_offset) & 0xFFFF
        timestamp = (timestamp + self._timestamp_offset) & 0xFFFFFFFF
        _SEQ_TS_SSRC.pack_into(packet, 2, seq, timestamp, self._ssrc)
        self.transport.sendto(packet, dest)
        if (seq - self._seq) & 0xFFFF < 0x8000:  # not a late, reordered one
            self._seq = seq
            self._timestamp = timestamp
            self._position = position
        return True

    def _hear(self, data: bytes) -> None:
        """Hand a received packet to ``on_dtmf`` or ``on_audio``."""
        if len(data) < _RTP_HEADER:
            return
        payload_type = data[1] & 0x7F
        if payload_type == self.dtmf_pt:
            on_dtmf = self.on_dtmf
            bounds = _payload_bounds(data)
            if on_dtmf is None or bounds is None or bounds[1] - bounds[0] < 4:
                return
            # RFC 4733: every packet of one event (updates, repeated ends) has
            # the event's start as timestamp; a new press gets a new one.
            (timestamp,) = _TIMESTAMP.unpack_from(data, 4)
            event = data[bounds[0]]
            if timestamp != self._dtmf_timestamp and event < len(_DTMF_KEYS):
                self._dtmf_timestamp = timestamp
                on_dtmf(_DTMF_KEYS[event])
        elif self.on_audio is not None:
            bounds = _payload_bounds(data)
            if bounds is not None:
                self.on_audio(data[bounds[0] : bounds[1]], payload_type)


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

    def __init__(self, media_clock: MediaClock | None = None) -> None:
        """Use ``await RtpRelay.create(pool)``, which also binds the sockets."""
        self.a = RelaySide("a", media_clock)
        self.b = RelaySide("b", media_clock)
        self.a.other = self.b
        self.b.other = self.a
        self._pairs: list[RtpSocketPair[RelaySide, _RtcpForwarder]] = []

    @classmethod
    async def create(cls, pool: RtpPortPool, clock: MediaClock | None = None) -> RtpRelay:
        """Bind a socket pair per side from ``pool``.

        ``clock`` (the process's one media clock) lets the sides ``play()``;
        a relay without one only relays. Raises what the pool raises
        (RtpPortsExhausted, an OSError) and then holds no port.
        """
        relay = cls(clock)
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
        """Close all four sockets and give the ports back; safe to call twice.

        Stops any playback first (its ``done`` becomes False).
        """
        for side in (self.a, self.b):
            side.stop_playback()
            side.closed = True
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
        bounds = _payload_bounds(data)
        if bounds is None:
            return None
        start, end = bounds
        packet[start:end] = data[start:end].translate(table)
    return packet


def _payload_bounds(data: bytes) -> tuple[int, int] | None:
    """Where the payload of RTP packet ``data`` starts and ends.

    None when the header's own lengths do not fit the packet.
    """
    first = data[0]
    start = _RTP_HEADER + 4 * (first & 0x0F)  # CSRCs
    if first & 0x10:  # header extension: 4-byte head, then its length in words
        if len(data) < start + 4:
            return None
        start += 4 + 4 * int.from_bytes(data[start + 2 : start + 4])
    end = len(data) - data[-1] if first & 0x20 else len(data)  # padding
    if start > end:
        return None
    return start, end


def _packet_struct(payload_size: int) -> struct.Struct:
    """The shared struct that packs a whole RTP packet with this payload size."""
    packer = _PACKETS.get(payload_size)
    if packer is None:
        packer = _PACKETS[payload_size] = struct.Struct(f"!BBHII{payload_size}s")
    return packer


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
