"""What a relay side counts: packets per direction, and statistics of the
RTP its peer sends us (``side.stats``, RFC 3550 §6.4.1).

The statistics are packets expected from the extended highest sequence
number against packets received, and the interarrival jitter. They are what
our RTCP reports tell the peer (``pbx.media.rtcp``) and what the inbound half
of the call's quality estimate (``pbx.media.quality``) is made from when it
ends. Their per-packet cost is one bit test and one reference kept; two
packets in sixteen also read the clock and their header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pbx.media.rtcp import ReportBlock
from pbx.media.rtp_packet import RTP_HEADER, unpack_seq_ts_ssrc

# RFC 3550 A.1: a jump forward of up to MAX_DROPOUT sequence numbers is loss;
# one back of up to MAX_MISORDER is a late packet; anything else restarts
# the count, as a new SSRC does.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
# A stream that comes back after another one took over, this many times, is
# two senders interleaving, not one sender that started a new stream (a late
# packet of the old stream makes two comebacks: the old stream's and the new one's).
TWO_SENDERS_COMEBACKS = 4
# Consecutive packets whose transit times differ by this many seconds are a
# stream whose timestamps jumped (a 32-bit wrap, a sender that started
# over), not jitter.
_MAX_TRANSIT_STEP = 2.0


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

    A single sender never goes back to a stream it left: when the sampled
    packets keep switching between two streams (two SSRCs, or one SSRC with
    two sequences: what only the packet count would otherwise show), two
    senders share the peer's address, such as a phone of a call from before
    a restart and the call's own party; ``on_two_senders`` is told once.
    """

    __slots__ = (
        "counters", "stray", "ssrc", "base_seq", "max_seq", "cycles", "jitter", "tick", "skip_pt",
        "first_seq", "last", "_pair_seq", "_pair_transit", "_sampled", "_expected_before", "_pairs", "_reported",
        "on_two_senders", "_previous", "_comebacks",
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
        self._reported = (0, 0)  # packets expected and received at the last report_block()
        self.on_two_senders: Callable[[], None] | None = None
        self._previous: tuple[int, int] | None = None  # SSRC and highest sequence number of the stream before this one
        self._comebacks = 0  # times that stream came back

    @property
    def received(self) -> int:
        """RTP packets from the peer, duplicates and late ones included."""
        counters = self.counters
        return counters.relayed + counters.dropped - self.stray

    def sample(self, data: bytes, now: float) -> None:
        """Account for RTP packet ``data`` (a 12-byte header at least, sequence
        number 16n - 1 or 16n) that arrived at ``now``, before the relay counts it."""
        seq, timestamp, ssrc = unpack_seq_ts_ssrc(data, 2)
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
        previous = self._previous
        if previous is not None and ssrc == previous[0] and (seq - previous[1]) & 0xFFFF < MAX_DROPOUT:
            self._comebacks += 1
            if self._comebacks == TWO_SENDERS_COMEBACKS and self.on_two_senders is not None:
                self.on_two_senders()
        if self.ssrc is not None:
            self._previous = (self.ssrc, self.max_seq)
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
            ahead = self._ahead()
            if ahead is not None:
                tail = ahead  # the stream ends at its last packet
        return ReceiveReport(received, expected + tail, self.jitter * 1000.0)

    def report_block(self, lsr: int, dlsr: int) -> ReportBlock | None:
        """What our next RTCP report says of the peer's stream (§6.4.1), its
        fraction lost since the previous call; None before the peer sent RTP.
        ``lsr`` and ``dlsr`` are about the peer's last SR, 0 without one."""
        if len(self.last) < RTP_HEADER:
            return None
        report = self.report()
        expected = report.expected - self._reported[0]
        lost = expected - (report.received - self._reported[1])
        self._reported = (report.expected, report.received)
        return ReportBlock(
            ssrc=unpack_seq_ts_ssrc(self.last, 2)[2],
            fraction_lost=(lost << 8) // expected if lost > 0 else 0,
            cumulative_lost=report.expected - report.received,
            highest_seq=self.highest_seq(),
            jitter=round(self.jitter / self.tick),
            lsr=lsr,
            dlsr=dlsr,
        )

    def highest_seq(self) -> int:
        """The extended highest sequence number received (A.1), what an RTCP
        report block says of the stream: from its last packet, or that
        packet's own number when it starts a stream not yet sampled."""
        ahead = self._ahead()
        if ahead is not None:
            return self.cycles + self.max_seq + ahead
        if len(self.last) >= RTP_HEADER:
            return unpack_seq_ts_ssrc(self.last, 2)[0]
        return self.cycles + self.max_seq

    def _ahead(self) -> int | None:
        """How far the peer's last packet is past the highest sampled one of
        its stream; None when it is of another stream, or of none yet."""
        if self.ssrc is None or len(self.last) < RTP_HEADER:
            return None
        seq, _, ssrc = unpack_seq_ts_ssrc(self.last, 2)
        ahead = (seq - self.max_seq) & 0xFFFF
        return ahead if ssrc == self.ssrc and ahead < MAX_DROPOUT else None

