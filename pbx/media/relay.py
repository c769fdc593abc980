"""The media of a bridged call: RTP and RTCP relayed between two legs.

Each leg ("side") has its own socket pair, whose port goes into that leg's
SDP. A packet arriving on one side's RTP socket leaves through the other
side's socket towards the other side's peer. Nothing is parsed into objects
(ENGINE.md, "Bridged calls"): a packet whose payload type needs no change is
sent on as the very ``bytes`` object received; one that does (a different
telephone-event number, PCMU <-> PCMA) is copied once and patched in place.

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
callee's answer may still be on its way.) A new SDP address from
``set_remote`` starts the learning again under the same rules. The accepted
path pays one address comparison for all this.

The server can also talk to a side itself (IVR prompts, music on hold, later
queues) without a re-INVITE, since the peer's SDP already points at the side's
port: ``side.play(frames)`` sends one pre-encoded 20 ms payload per tick of
the process's shared ``MediaClock`` (no task per call), while whatever the
other side relays towards that peer is held back. A sender that serves many
sides from one stream of its own (music on hold) hands each side its frame
with ``side.send_frame(payload, tick)`` instead. Received RFC 4733 events are
reported through ``side.on_dtmf`` and received audio through ``side.on_audio``.

Each side also keeps statistics of the RTP its peer sends us (``side.stats``,
RFC 3550 §6.4.1): packets expected from the extended highest sequence number
against packets received, and the interarrival jitter. They are what the
call's quality estimate (``pbx.media.quality``) is made from when it ends.
Their per-packet cost is one bit test and one reference kept; two packets in
sixteen also read the clock and their header.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from pbx.events import EventBus
from pbx.media.clock import ClockSubscription, MediaClock
from pbx.media.codecs import Codec, transcoding_table
from pbx.media.ports import RtpPortPool, RtpSocketPair
from pbx.security import security_event

logger = logging.getLogger(__name__)

Address = tuple[str, int]
# Incoming payload type -> (outgoing payload type, translate table or None).
PayloadRules = dict[int, tuple[int, bytes | None]]

_RTP_HEADER = 12
_SEQ_TS_SSRC = struct.Struct("!HII")  # RTP header bytes 2-11
_TIMESTAMP = struct.Struct("!I")  # RTP header bytes 4-7
# RFC 3550 A.1: a jump forward of up to MAX_DROPOUT sequence numbers is loss;
# one back of up to MAX_MISORDER is a late packet; anything else restarts
# the count, as a new SSRC does.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
# Consecutive packets whose transit times differ by this many seconds are a
# stream whose timestamps jumped (a 32-bit wrap, a sender that started
# over), not jitter.
_MAX_TRANSIT_STEP = 2.0
_now = time.monotonic
# RFC 4733 §3.2 event codes 0-15: the DTMF keys.
_DTMF_KEYS = "0123456789*#ABCD"
# A side reports strangers at most this often (seconds), each IP only once.
_STRANGER_REPORT_INTERVAL = 5.0
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


@dataclass(frozen=True, slots=True)
class ReceiveReport:
    """What one side's peer sent us over the whole call (``ReceiveStats.report()``)."""

    received: int  # RTP packets that arrived, duplicates and late ones included
    expected: int  # from each stream's first to its highest extended sequence number
    jitter_ms: float  # RFC 3550 interarrival jitter at the end of the call

    @property
    def lost(self) -> int:
        """Packets expected but never received (never negative, whatever duplicates did)."""
        return max(self.expected - self.received, 0)

    @property
    def loss_fraction(self) -> float:
        """``lost / expected``, 0.0 when nothing was expected."""
        return self.lost / self.expected if self.expected else 0.0


class ReceiveStats:
    """Statistics of the RTP a side's peer sends us (RFC 3550 §6.4.1, A.1, A.3, A.8).

    The relay's hot path pays for them with one bit test and one reference
    kept (``last``) per packet:

    - Counting is free: every packet the side takes from its peer is already
      counted once in its ``RelayCounters`` (relayed or dropped), so
      ``received`` is that sum less the ``stray`` datagrams (wrong source,
      not RTP-sized).
    - Only packets whose sequence number is 16n - 1 or 16n reach ``sample``.
      The 16n ones carry the sequence accounting: the extended highest
      sequence number over 16-bit wraps, where a new SSRC, or a jump no
      reordering explains (A.1's MAX_DROPOUT, MAX_MISORDER), starts a new
      stream whose expected packets add to the earlier ones'. The first
      stream counts from the peer's first packet (``first_seq``, noted when
      the relay learns its source) and the last stream ends at the peer's
      last packet. The one guess is where a new stream starts: the packets
      between the old stream's last sample and the new one's first are taken
      as expected one for one (or as the old stream's 15 and those, when its
      16n + 15 packet came), so loss in that window goes uncounted.
    - Each (16n - 1, 16n) pair that arrives gives one interarrival difference
      D, smoothed into the jitter by 1/16 as in A.8, in seconds: arrival times
      from the caller's monotonic clock against RTP timestamps at the side's
      codec clock rate. So the jitter is RFC 3550's estimator over one
      consecutive pair in sixteen: the same mean, averaged over 256 packets
      instead of 16. Unlike A.8 it starts from the first pair's |D| rather
      than from 0, so that a short call's figure is not mostly the start
      value. Packets of ``skip_pt`` (RFC 4733 events, all stamped with their
      event's start) make no pair.
    """

    __slots__ = (
        "counters", "stray", "ssrc", "base_seq", "max_seq", "cycles", "jitter", "tick", "skip_pt",
        "first_seq", "last", "_pair_seq", "_pair_transit", "_sampled", "_expected_before", "_pairs",
    )  # fmt: skip

    def __init__(self, counters: RelayCounters) -> None:
        self.counters = counters  # the side's, whose packets these are
        self.stray = 0  # datagrams in ``counters`` that were not the peer's RTP
        self.ssrc: int | None = None  # of the stream being counted
        self.base_seq = 0  # its first sampled sequence number
        self.max_seq = 0  # its highest sampled sequence number
        self.cycles = 0  # its sequence number wraps, times 65536
        self.jitter = 0.0  # in s
        self.tick = 1.0 / 8000  # seconds per RTP timestamp unit; the side's codec sets it
        self.skip_pt: int | None = None
        self.first_seq = -1  # of the peer's first packet, set by the relay when it learns the source
        self.last = b""  # the peer's last packet, kept by the relay
        self._pair_seq = -1  # sequence number of the last 16n - 1 packet
        self._pair_transit = 0.0  # its arrival minus its RTP time, in s
        self._sampled = 0  # ``received`` at the last 16n sample, that one included
        self._expected_before = 0  # of the streams before this one, and their tails
        self._pairs = 0  # that fed the jitter

    @property
    def received(self) -> int:
        """RTP packets from the peer, duplicates and late ones included."""
        counters = self.counters
        return counters.relayed + counters.dropped - self.stray

    def sample(self, data: bytes, now: float) -> None:
        """Account for RTP packet ``data`` (a 12-byte header at least, sequence
        number 16n - 1 or 16n) that arrived at ``now``, before the relay counts it."""
        seq, timestamp, ssrc = _SEQ_TS_SSRC.unpack_from(data, 2)
        if seq & 15:  # 16n - 1: the first of a pair
            if data[1] & 0x7F != self.skip_pt:
                self._pair_seq = seq
                self._pair_transit = now - timestamp * self.tick
            return
        counters = self.counters
        received = counters.relayed + counters.dropped - self.stray + 1
        since = received - self._sampled  # packets since the last sample, this one included
        self._sampled = received
        if ssrc != self.ssrc:
            self._restart(seq, ssrc, since)
            return
        max_seq = self.max_seq
        step = (seq - max_seq) & 0xFFFF
        if step < MAX_DROPOUT:
            if seq < max_seq:
                self.cycles += 0x10000
            self.max_seq = seq
        elif step <= 0xFFFF - MAX_MISORDER:
            self._restart(seq, ssrc, since)
            return
        # else: a late or repeated packet, which moves nothing
        if seq == (self._pair_seq + 1) & 0xFFFF and data[1] & 0x7F != self.skip_pt:
            d = now - timestamp * self.tick - self._pair_transit
            if d < 0.0:
                d = -d
            if d < _MAX_TRANSIT_STEP:
                if self._pairs:
                    self.jitter += (d - self.jitter) * 0.0625
                else:
                    self.jitter = d
                self._pairs += 1

    def _restart(self, seq: int, ssrc: int, since: int) -> None:
        # Packets between the last sample and this one: the old stream's tail
        # and the new one's head, taken as expected one for one.
        between = since - 1
        if self.ssrc is None:
            head = (seq - self.first_seq) & 0xFFFF
            if self.first_seq >= 0 and head < MAX_DROPOUT:
                between = max(between, head)  # from the very first packet on
        else:
            self._expected_before += self.cycles + self.max_seq - self.base_seq + 1
            if self._pair_seq == (self.max_seq + 15) & 0xFFFF:
                between = max(between, 15)  # the old stream's 16n + 15 came: its tail was 15
        self._expected_before += between
        self.ssrc = ssrc
        self.base_seq = self.max_seq = seq
        self.cycles = 0
        self._pair_seq = -1  # a pair across streams says nothing about jitter

    def report(self) -> ReceiveReport:
        """Totals over every stream so far."""
        received = self.received
        tail = received - self._sampled  # packets since the last 16n sample, taken one for one
        expected = self._expected_before
        if self.ssrc is not None:
            expected += self.cycles + self.max_seq - self.base_seq + 1
            if len(self.last) >= _RTP_HEADER:
                seq, _, ssrc = _SEQ_TS_SSRC.unpack_from(self.last, 2)
                ahead = (seq - self.max_seq) & 0xFFFF
                if ssrc == self.ssrc and ahead < MAX_DROPOUT:
                    tail = ahead  # the stream ends at its last packet
        return ReceiveReport(received, expected + tail, self.jitter * 1000.0)


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
        self.signalling_ip: str | None = None  # where the peer's SIP comes from: its RTP may too
        self.events: EventBus | None = None  # where strangers are reported; set by RtpRelay
        self.strangers = 0  # packets (RTP and RTCP) dropped because a stranger sent them
        self._remote_ip: str | None = None  # of ``remote``, written as the kernel reports sources
        self._reported: set[str] = set()  # stranger IPs already reported
        self._report_after = 0.0  # no stranger report before this time
        self.dest: Address | None = None  # where RTP for the peer goes, None: nowhere
        self.rules: PayloadRules = {}  # for packets received here
        self.counters = RelayCounters()
        self.stats = ReceiveStats(self.counters)  # of the RTP the peer sends us
        # Each RFC 4733 key press once, as "0"-"9", "*", "#", "A"-"D".
        self.on_dtmf: Callable[[str], None] | None = None
        # (payload, payload type) of every other RTP packet the peer sends us.
        self.on_audio: Callable[[bytes, int], None] | None = None
        # SRTP (pbx.media.srtp): decrypts a packet from the peer, None when it
        # is not authentic; that side's transports also encrypt on send.
        self.unprotect: Callable[[bytes], bytes | None] | None = None
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
        if self.unprotect is not None:
            # Before anything else: a packet that fails SRTP authentication latches nothing.
            plain = self.unprotect(data)
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
        if len(data) < _RTP_HEADER:
            counters.dropped += 1
            self.stats.stray += 1
            return
        stats = self.stats
        stats.last = data
        if not (data[3] + 1) & 14:  # sequence number 16n - 1 or 16n; the counters below count them all
            stats.sample(data, _now())
        if self.on_dtmf is not None or self.on_audio is not None:
            try:
                self._hear(data)
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
                packet = _rewrite(data, rule)
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
        host = _source_ip(addr)
        if not (host == self._remote_ip and addr[1] == remote[1]):
            if (
                self.source is not None
                or (host != self._remote_ip and host != self.signalling_ip)
                or len(data) < _RTP_HEADER
                or data[0] & 0xC0 != 0x80
                or not self._negotiated(data[1] & 0x7F)
            ):
                self.report_stranger(addr, "rtp")
                return False
            logger.debug("relay side %s port %d: peer's RTP comes from %s, not %s", self.name, self.port, addr, remote)
        self.source = addr
        self._update_dest()
        if self.stats.first_seq < 0 and len(data) >= _RTP_HEADER:
            self.stats.first_seq = data[2] << 8 | data[3]
        return True

    def _negotiated(self, payload_type: int) -> bool:
        codec = self.codec
        return (codec is not None and payload_type == codec.payload_type) or payload_type == self.dtmf_pt

    def report_stranger(self, addr: Address, stream: str) -> None:
        """Count a packet a stranger sent to this side's ``stream`` ("rtp", "rtcp")
        and report it as a security event, unless reported lately (module docstring)."""
        self.strangers += 1
        events = self.events
        if events is None:
            return
        host = _source_ip(addr)
        now = _now()
        if now < self._report_after or host in self._reported:
            return
        self._report_after = now + _STRANGER_REPORT_INTERVAL
        self._reported.add(host)
        security_event(events, "rtp_stranger", host, port=addr[1], side=self.name, local_port=self.port, stream=stream)

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
        """Hand a received packet (at least an RTP header long) to ``on_dtmf`` or ``on_audio``."""
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
        self.unprotect: Callable[[bytes], bytes | None] | None = None  # SRTCP, as RelaySide.unprotect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.unprotect is not None:
            plain = self.unprotect(data)
            if plain is None:
                return
            data = plain
        if addr != self.source and not self._admit(data, addr):
            return
        other = self.side.other
        dest = other.rtcp_dest()
        if dest is not None:
            other.rtcp.transport.sendto(data, dest)

    def _admit(self, data: bytes, addr: Address) -> bool:
        """Whether RTCP from ``addr``, which is not the latched source, is the
        peer's: from the SDP's RTP port + 1 always, else once from the IP the
        peer's RTP comes from, its SDP's or its signalling IP; then it is the source."""
        side = self.side
        remote = side.remote
        if remote is None:
            return False  # no peer yet (see RelaySide._admit)
        host = _source_ip(addr)
        if not (host == side._remote_ip and addr[1] == remote[1] + 1):
            rtp_source = side.source
            if (
                self.source is not None
                or (host != side._remote_ip and host != side.signalling_ip and (rtp_source is None or host != _source_ip(rtp_source)))
                or len(data) < 8
                or data[0] & 0xC0 != 0x80
                or not 200 <= data[1] <= 207  # SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR
            ):
                side.report_stranger(addr, "rtcp")
                return False
        self.source = addr
        return True

    def error_received(self, exc: Exception) -> None:
        logger.debug("relay side %s RTCP: %s", self.side.name, exc)


class RtpRelay:
    """Relays the media of one bridged call between side ``a`` and side ``b``."""

    def __init__(self, media_clock: MediaClock | None = None, events: EventBus | None = None) -> None:
        """Use ``await RtpRelay.create(pool)``, which also binds the sockets."""
        self.a = RelaySide("a", media_clock)
        self.b = RelaySide("b", media_clock)
        self.a.events = self.b.events = events
        self.a.other = self.b
        self.b.other = self.a
        self._pairs: list[RtpSocketPair[RelaySide, _RtcpForwarder]] = []

    @classmethod
    async def create(cls, pool: RtpPortPool, clock: MediaClock | None = None, events: EventBus | None = None) -> RtpRelay:
        """Bind a socket pair per side from ``pool``.

        ``clock`` (the process's one media clock) lets the sides ``play()``;
        a relay without one only relays. Packets from strangers are reported
        on ``events`` as ``rtp_stranger`` security events, when given.
        Raises what the pool raises (RtpPortsExhausted, an OSError) and then
        holds no port.
        """
        relay = cls(clock, events)
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


def _source_ip(addr: Address) -> str:
    """The IP of a datagram's source; an IPv4 peer of a dual-stack socket without its ``::ffff:``."""
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
