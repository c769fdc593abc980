"""RTCP (RFC 3550 §6): the reports a relay side sends, reads and passes on.

A side whose peer the server talks to alone (a caller in the IVR, a queue,
voicemail: the other side has no peer, so there is nothing to relay) gets
reports of our own, about every 5 s: an SR when its stream carried packets
since the last report, else an RR, each with a report block on the peer's
stream once it has sent RTP, and an SDES CNAME, as a compound packet
(§6.1). One :class:`ReportTimer` per media clock sends them all, at ticks
spread at random over 0.5-1.5 times the interval (§6.3.1) so that reports
do not bunch, the first after half an interval (§6.2).

On a bridged call the peers' own reports are relayed (:mod:`pbx.media.relay_side`),
and we send none of ours: a peer whose far end sends no RTCP gets none.
Where a side sends its peer a stream of its own (:mod:`pbx.media.playback`:
once it has sent anything of ours, everything goes out under its SSRC, with
moved sequence numbers and timestamps), a relayed report would name SSRCs
that peer never sees, so :func:`renumber` maps them: the sender's SSRC
(SR/RR, SDES chunks, BYE, feedback) becomes the one its stream reaches the
receiving peer under, with that stream's counts and timestamps; a report
block on the stream the side sends its own peer becomes one on the stream
the receiving peer sends, its highest sequence number moved back by the
side's offset (the cycle count is left as it came). Where no side rewrites,
reports go on untouched, as the very bytes received.

Every report from a peer is read too (:class:`PeerView`): its report block
tells what the peer received of what we sent it (loss, jitter), the
outbound half of a leg's quality, and its LSR/DLSR the round trip to the
peer, timed against when we sent (or passed on) the SR it names, so no clock
but our own monotonic one is involved.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from pbx.media.clock import MediaClock

logger = logging.getLogger(__name__)

SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR = range(200, 208)
REPORT_INTERVAL = 5.0  # seconds between our own reports (§6.2's minimum)
MAX_BLOCKS = 31  # report count is 5 bits
CNAME = 1  # SDES item type
# §6.5.1 wants a CNAME per participant; a random one (RFC 7022) for the life
# of the process names the server without telling its host or users.
_CNAME = base64.b64encode(os.urandom(12))
_NTP_EPOCH = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
_HEADER = struct.Struct("!BBHI")  # V, P, count | packet type | length in words - 1 | SSRC
_SENDER_INFO = struct.Struct("!QIII")  # NTP timestamp, RTP timestamp, packets, octets
_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction << 24 | cumulative lost, highest sequence, jitter, LSR, DLSR
_WORD = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class SenderInfo:
    """An SR's sender information (§6.4.1): when, and how much the sender has sent."""

    ntp: int  # 64-bit NTP timestamp
    rtp_timestamp: int  # the same instant on the stream's RTP clock
    packets: int  # sent since the stream began
    octets: int  # of payload, likewise


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """What a receiver got of one source (§6.4.1)."""

    ssrc: int  # the source reported on
    fraction_lost: int  # in 256ths, since the previous report
    cumulative_lost: int  # since the start; negative when duplicates outnumber losses
    highest_seq: int  # extended highest sequence number received
    jitter: int  # interarrival jitter in RTP timestamp units
    lsr: int  # middle 32 bits of the NTP timestamp of the last SR received, 0: none
    dlsr: int  # time since that SR, in 1/65536 s


@dataclass(frozen=True, slots=True)
class Report:
    """One SR (with ``sender``) or RR of a compound packet."""

    ssrc: int
    sender: SenderInfo | None
    blocks: tuple[ReportBlock, ...]


@dataclass(frozen=True, slots=True)
class SourceSwap:
    """The relayed sender's stream as the receiving peer gets it: under ``ssrc``,
    its RTP timestamps moved by ``timestamp_offset``, with these counts so far."""

    ssrc: int
    timestamp_offset: int
    packets: int
    octets: int


@dataclass(frozen=True, slots=True)
class ReportedSwap:
    """Report blocks on ``ours`` (the stream the relayed sender receives) are
    about ``theirs`` (what the receiving peer sends), ``seq_offset`` below it."""

    ours: int
    theirs: int
    seq_offset: int


def ntp_timestamp(unix_time: float) -> int:
    """The 64-bit NTP timestamp (seconds since 1900, 32.32 fixed point) of a Unix time."""
    return int((unix_time + _NTP_EPOCH) * 4294967296.0) & 0xFFFFFFFFFFFFFFFF


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp: what an LSR field carries."""
    return (ntp >> 16) & 0xFFFFFFFF


def build_report(ssrc: int, sender: SenderInfo | None, blocks: tuple[ReportBlock, ...] = ()) -> bytes:
    """An SR (when ``sender`` is given) or an RR from ``ssrc`` with up to 31 report blocks."""
    blocks = blocks[:MAX_BLOCKS]
    packet_type, info = (RR, b"") if sender is None else (SR, _SENDER_INFO.pack(sender.ntp, sender.rtp_timestamp, sender.packets, sender.octets))
    body = info + b"".join(_pack_block(block) for block in blocks)
    return _HEADER.pack(0x80 | len(blocks), packet_type, (4 + len(body)) // 4, ssrc) + body


def _pack_block(block: ReportBlock) -> bytes:
    lost = min(max(block.cumulative_lost, -0x800000), 0x7FFFFF) & 0xFFFFFF  # 24-bit two's complement
    return _BLOCK.pack(
        block.ssrc, (min(max(block.fraction_lost, 0), 255) << 24) | lost, block.highest_seq & 0xFFFFFFFF,
        min(max(block.jitter, 0), 0xFFFFFFFF), block.lsr, min(max(block.dlsr, 0), 0xFFFFFFFF),
    )  # fmt: skip


def build_sdes(ssrc: int, cname: bytes = _CNAME) -> bytes:
    """An SDES packet with one chunk: ``ssrc``'s CNAME, ended and padded to a word (§6.5)."""
    chunk = _WORD.pack(ssrc) + bytes((CNAME, len(cname))) + cname
    chunk += bytes(4 - len(chunk) % 4)  # the null item ending the list, and the padding
    return struct.pack("!BBH", 0x81, SDES, len(chunk) // 4) + chunk


def _packets(data: bytes | bytearray) -> Iterator[tuple[int, int, int, int]]:
    """(start, count, packet type, end) of each packet of a compound packet,
    up to the first that is not RTCP version 2 or overruns the datagram."""
    start = 0
    while start + 4 <= len(data):
        first, packet_type, words = data[start], data[start + 1], data[start + 2] << 8 | data[start + 3]
        end = start + 4 + 4 * words
        if first & 0xC0 != 0x80 or end > len(data):
            return
        yield start, first & 0x1F, packet_type, end
        start = end


def parse_reports(data: bytes | bytearray) -> list[Report]:
    """The SRs and RRs of a compound packet (anything else is skipped); the
    readable ones before the first malformed packet, if any."""
    reports: list[Report] = []
    for start, count, packet_type, end in _packets(data):
        if packet_type not in (SR, RR):
            continue
        first_block = start + 8 + (_SENDER_INFO.size if packet_type == SR else 0)
        if first_block + count * _BLOCK.size > end:
            break
        (ssrc,) = _WORD.unpack_from(data, start + 4)
        sender = SenderInfo(*_SENDER_INFO.unpack_from(data, start + 8)) if packet_type == SR else None
        blocks = []
        for offset in range(first_block, first_block + count * _BLOCK.size, _BLOCK.size):
            source, lost, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
            cumulative = lost & 0xFFFFFF
            if cumulative & 0x800000:
                cumulative -= 0x1000000
            blocks.append(ReportBlock(source, lost >> 24, cumulative, highest, jitter, lsr, dlsr))
        reports.append(Report(ssrc, sender, tuple(blocks)))
    return reports


def renumber(data: bytes, source: SourceSwap | None, reported: ReportedSwap | None) -> bytearray | None:
    """A copy of compound packet ``data`` with its SSRCs, and what goes with
    them, mapped as ``source`` and ``reported`` say (the module docstring
    has why); None when it is malformed, since its SSRCs cannot all be found."""
    packet = bytearray(data)
    end = 0
    for start, count, packet_type, end in _packets(packet):
        if packet_type == SDES:
            if source is not None and not _renumber_chunks(packet, start + 4, end, count, source.ssrc):
                return None
            continue
        if end - start < 8:
            return None
        if packet_type == BYE:
            if start + 4 + 4 * count > end:
                return None
            if source is not None:
                for offset in range(start + 4, start + 4 + 4 * count, 4):
                    _WORD.pack_into(packet, offset, source.ssrc)
            continue
        if source is not None:
            _WORD.pack_into(packet, start + 4, source.ssrc)
        if packet_type in (SR, RR):
            first_block = start + 8
            if packet_type == SR:
                first_block += _SENDER_INFO.size
                if first_block > end:
                    return None
                ntp, timestamp, _, _ = _SENDER_INFO.unpack_from(packet, start + 8)
                if source is not None:
                    timestamp = (timestamp + source.timestamp_offset) & 0xFFFFFFFF
                    _SENDER_INFO.pack_into(packet, start + 8, ntp, timestamp, source.packets & 0xFFFFFFFF, source.octets & 0xFFFFFFFF)
            if first_block + count * _BLOCK.size > end:
                return None
            if reported is not None:
                for offset in range(first_block, first_block + count * _BLOCK.size, _BLOCK.size):
                    _renumber_block(packet, offset, reported)
        elif packet_type in (RTPFB, PSFB) and reported is not None and end - start >= 12:
            (media,) = _WORD.unpack_from(packet, start + 8)
            if media == reported.ours:
                _WORD.pack_into(packet, start + 8, reported.theirs)
    return packet if end == len(packet) else None


def _renumber_block(packet: bytearray, offset: int, reported: ReportedSwap) -> None:
    (ssrc,) = _WORD.unpack_from(packet, offset)
    if ssrc != reported.ours:
        return
    (highest,) = _WORD.unpack_from(packet, offset + 8)
    cycles, seq = highest & 0xFFFF0000, highest & 0xFFFF
    _WORD.pack_into(packet, offset, reported.theirs)
    _WORD.pack_into(packet, offset + 8, cycles | (seq - reported.seq_offset) & 0xFFFF)


def _renumber_chunks(packet: bytearray, offset: int, end: int, count: int, ssrc: int) -> bool:
    """Give each SDES chunk's SSRC as ``ssrc``; False when the chunks do not fit."""
    for _ in range(count):
        if offset + 4 > end:
            return False
        _WORD.pack_into(packet, offset, ssrc)
        offset += 4
        while offset < end and packet[offset]:  # items until the null one
            if offset + 1 == end:
                return False
            offset += 2 + packet[offset + 1]
        offset = (offset + 4) & ~3  # past the null item, to the next word
        if offset > end:
            return False
    return True


class PeerView:
    """What a side's peer says, in its reports, of the stream we send it: the
    outbound half of the leg's quality, and the round trip to the peer."""

    __slots__ = ("reports", "jitter", "rtt", "sent", "_ssrc", "_cumulative", "_lost_before", "_srs")

    def __init__(self) -> None:
        self.reports = 0  # report blocks taken
        self.jitter = 0  # the last one's, in RTP timestamp units
        self.rtt: float | None = None  # in seconds, from the last block naming an SR we timed
        self.sent = 0  # packets we had sent the peer when its last block came
        self._ssrc: int | None = None  # the stream the last block reported on
        self._cumulative = 0  # its cumulative loss
        self._lost_before = 0  # of the streams reported on before it
        self._srs: dict[int, float] = {}  # LSR value -> when we sent that SR, the last few

    def sent_sr(self, ntp: int, now: float) -> None:
        """Note that an SR with NTP timestamp ``ntp`` went to the peer at ``now``."""
        srs = self._srs
        srs[ntp_middle(ntp)] = now
        if len(srs) > 4:
            del srs[next(iter(srs))]

    def take(self, block: ReportBlock, sent: int, now: float) -> None:
        """Take the peer's report block on our stream, which had ``sent``
        packets so far, arriving at ``now``."""
        if block.ssrc != self._ssrc:
            self._lost_before += max(self._cumulative, 0)
            self._ssrc = block.ssrc
        self._cumulative = block.cumulative_lost
        self.jitter = block.jitter
        self.sent = sent
        self.reports += 1
        sent_at = self._srs.get(block.lsr) if block.lsr else None
        if sent_at is not None:
            self.rtt = max(now - sent_at - block.dlsr / 65536.0, 0.0)

    @property
    def lost(self) -> int:
        """Packets of ours the peer says never reached it."""
        return self._lost_before + max(self._cumulative, 0)

    @property
    def loss_fraction(self) -> float:
        """``lost`` over what we had sent when the peer last reported, 0..1."""
        lost = self.lost
        return lost / max(self.sent, lost) if lost else 0.0


class Reporter(Protocol):
    """What a :class:`ReportTimer` drives."""

    def send_report(self) -> bool:
        """Send a report if there is one to send; False: stop calling me."""
        ...


class ReportTimer:
    """Calls ``send_report()`` of each member about every ``REPORT_INTERVAL``
    seconds, at random ticks within 0.5-1.5 times that, the first after half
    as long; on one subscription of the media clock, whose tick pops the
    members due then from a table keyed by tick."""

    def __init__(self, clock: MediaClock) -> None:
        # The clock holds this object through its subscription, not the other
        # way round: report_timer()'s weak table must not keep clocks alive.
        self._ticks = REPORT_INTERVAL / clock.interval
        self._last = clock.tick  # the last tick seen
        self._due: dict[int, list[Reporter]] = {}
        clock.subscribe(self._tick)

    def add(self, member: Reporter) -> None:
        """Start calling ``member``."""
        self._schedule(member, self._last, 0.5)

    def _schedule(self, member: Reporter, tick: int, scale: float) -> None:
        due = tick + max(round(self._ticks * scale * random.uniform(0.5, 1.5)), 1)
        self._due.setdefault(due, []).append(member)

    def _tick(self, tick: int) -> None:
        last, self._last = self._last, tick
        for due in range(last + 1, tick + 1):  # the ticks a late clock skipped too
            for member in self._due.pop(due, ()):
                try:
                    again = member.send_report()
                except Exception:
                    logger.exception("RTCP report of %r failed", member)
                    again = True
                if again:
                    self._schedule(member, tick, 1.0)


_TIMERS: weakref.WeakKeyDictionary[MediaClock, ReportTimer] = weakref.WeakKeyDictionary()


def report_timer(clock: MediaClock) -> ReportTimer:
    """The one report timer of ``clock``."""
    timer = _TIMERS.get(clock)
    if timer is None:
        timer = _TIMERS[clock] = ReportTimer(clock)
    return timer
