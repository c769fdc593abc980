"""RTP as the benchmarks see it on the wire: dumpcap on `lo`, and what its capture holds.

:class:`Capture` runs dumpcap on the loopback interface with a BPF filter
(headers only, bounded in time, packets and size) and says how many packets it
lost. The readers go through the libpcap file it writes without any
dissector: :func:`rtp_intervals` gives the times between consecutive packets
of each RTP stream (bench/ivr.py: is the media clock steady?), and
:class:`Delivery` counts the RTP packets between a relay and the two
endpoints of its calls, both ways (bench/bridge.py: did the relay deliver
what it was sent?). Both skip RTCP.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.measure import num
from tests.support.server import stop_process

PAUSE_SECONDS = 1.0  # a longer gap between two packets of a stream is a pause, not a late packet
CAPTURE_SNAPLEN = 96  # Ethernet + IPv4 + UDP + RTP headers, with room for IP options and CSRCs
CAPTURE_MAX_KB = 400_000
START_LIMIT = 15.0  # seconds for dumpcap (or a baseline program) to come up

# Where the IPv4 header starts, by link type: Ethernet (lo), Linux cooked v1 and v2, BSD loopback.
IP_OFFSET = {1: 14, 113: 16, 276: 20, 0: 4}


@dataclass
class Intervals:
    """Times between consecutive RTP packets of each stream a capture holds."""

    packets: int = 0
    streams: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.empty(0))  # packets of each stream
    deltas_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    pauses: int = 0  # gaps above PAUSE_SECONDS, left out of deltas_ms
    dropped: int | None = None  # packets the capture lost, as dumpcap reports it
    error: str = ""

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.deltas_ms, q)) if self.deltas_ms.size else None

    @property
    def max(self) -> float | None:
        return float(self.deltas_ms.max()) if self.deltas_ms.size else None

    def within(self, low: float, high: float) -> float | None:
        """Share of the intervals in [low, high] ms."""
        if not self.deltas_ms.size:
            return None
        return float(np.count_nonzero((self.deltas_ms >= low) & (self.deltas_ms <= high)) / self.deltas_ms.size)

    def per_second(self, seconds: float) -> tuple[float, float] | None:
        """Packets per second of the median stream and of the one with the
        fewest, over a call of ``seconds``."""
        if not self.counts.size:
            return None
        return float(np.median(self.counts)) / seconds, float(self.counts.min()) / seconds

    def summary(self, seconds: float) -> str:
        if self.error:
            return f"RTP intervals n/a ({self.error})"
        share = self.within(15, 25)
        rates = self.per_second(seconds)
        text = (
            f"RTP sent {self.packets} packets in {self.streams} streams, "
            f"per call {num(rates[0] if rates else None, '.1f')}/s (fewest {num(rates[1] if rates else None, '.1f')}/s), "
            f"interval p50 {num(self.percentile(50), '.2f')} "
            f"p99 {num(self.percentile(99), '.2f')} max {num(self.max, '.1f')} ms, "
            f"{num(share * 100 if share is not None else None, '.2f')}% within 20 +- 5 ms"
        )
        if self.pauses:
            text += f", {self.pauses} pauses > {PAUSE_SECONDS:g} s left out"
        if self.dropped is not None:
            text += f", capture lost {self.dropped}"
        return text


def pcap_packets(path: Path) -> Iterator[tuple[float, bytes]]:
    """(time, bytes from the link header on) of each packet of a libpcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    formats = {
        b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
        b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
    }  # fmt: skip
    if magic not in formats:
        raise ValueError(f"{path} is not a libpcap file (magic {magic.hex()})")
    endian, unit = formats[magic]
    record = struct.Struct(endian + "IIII")
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, captured, _ = record.unpack_from(data, offset)
        offset += 16
        yield sec + frac * unit, data[offset : offset + captured]
        offset += captured


def pcap_linktype(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    endian = "<" if head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    return int(struct.unpack_from(endian + "I", head, 20)[0])


def rtp_packets(path: Path) -> Iterator[tuple[float, int, int, bytes]]:
    """(time, UDP source port, UDP destination port, RTP header on) of each
    IPv4 RTP packet of a capture; RTCP and other UDP are skipped. Raises
    ValueError for a link type it cannot read."""
    linktype = pcap_linktype(path)
    if linktype not in IP_OFFSET:
        raise ValueError(f"link type {linktype} not understood")
    ip_at = IP_OFFSET[linktype]
    for stamp, frame in pcap_packets(path):
        ip = frame[ip_at:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        udp = ip[(ip[0] & 0x0F) * 4 :]
        rtp = udp[8:]
        if len(rtp) < 12 or rtp[0] >> 6 != 2 or 72 <= (rtp[1] & 0x7F) <= 76:  # not RTP v2, or RTCP
            continue
        yield stamp, (udp[0] << 8) | udp[1], (udp[2] << 8) | udp[3], rtp


def rtp_intervals(path: Path) -> Intervals:
    """Per stream (source port, SSRC) the intervals between RTP packets (not RTCP)."""
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    packets = 0
    try:
        for stamp, src_port, _, rtp in rtp_packets(path):
            times[(src_port, int.from_bytes(rtp[8:12], "big"))].append(stamp)
            packets += 1
    except ValueError as exc:
        return Intervals(error=str(exc))
    chunks = [np.diff(np.asarray(stamps)) * 1000 for stamps in times.values() if len(stamps) > 1]
    deltas = np.concatenate(chunks) if chunks else np.empty(0)
    pauses = int(np.count_nonzero(deltas > PAUSE_SECONDS * 1000))
    counts = np.asarray([len(stamps) for stamps in times.values()])
    return Intervals(packets, len(times), counts, deltas[deltas <= PAUSE_SECONDS * 1000], pauses)


def rtp_port_pairs(path: Path) -> Counter[tuple[int, int]]:
    """RTP packets (not RTCP) of a capture by UDP (source port, destination port)."""
    return Counter((src_port, dst_port) for _, src_port, dst_port, _ in rtp_packets(path))


@dataclass
class Delivery:
    """RTP packets (not RTCP) captured between a relay and the two endpoints
    of its calls, a caller and a callee, each on one media port."""

    to_callee: int = 0
    to_caller: int = 0
    from_caller: int = 0
    from_callee: int = 0
    lost: int | None = None  # packets dumpcap lost, as it reports them
    ended_early: bool = False  # dumpcap stopped by itself (a size or packet limit) before it was stopped

    @classmethod
    def count(cls, pairs: Counter[tuple[int, int]], caller: int, callee: int) -> Delivery:
        """Out of a capture's counts by (source port, destination port)."""
        delivery = cls()
        for (src, dst), n in pairs.items():
            if src == caller:
                delivery.from_caller += n
            elif src == callee:
                delivery.from_callee += n
            elif dst == caller:
                delivery.to_caller += n
            elif dst == callee:
                delivery.to_callee += n
        return delivery

    @property
    def delivered(self) -> int:
        return self.to_callee + self.to_caller

    @property
    def sent(self) -> int:
        return self.from_caller + self.from_callee

    @property
    def ratio(self) -> float | None:
        return self.delivered / self.sent if self.sent else None

    def problem(self, min_ratio: float) -> str:
        """Why the count cannot vouch for the relay ("" when it can): the
        capture is incomplete, or the relay delivered less than ``min_ratio``
        of what the endpoints sent it."""
        if self.ended_early:
            return "capture ended before the calls"
        if self.lost:
            return f"capture lost {self.lost} packets"
        if self.ratio is None:
            return "no RTP captured"
        if self.ratio < min_ratio:
            return f"relay delivered {self.ratio:.2%} of the RTP sent to it"
        return ""


def relay_filter(relay_ports: Sequence[int], media_ports: Collection[int]) -> str:
    """The UDP on 127.0.0.1 between a relay's RTP (and RTCP) ports, ``relay_ports``
    [first, last], and the endpoints' media ports, both ways."""
    ends = " or ".join(f"port {port}" for port in sorted(media_ports))
    return f"udp and host 127.0.0.1 and ({ends}) and portrange {relay_ports[0]}-{relay_ports[1] + 1}"


class Capture:
    """dumpcap on `lo`, writing the UDP packets a filter picks to a libpcap file."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path, log: Path) -> None:
        self.proc = proc
        self.path = path
        self.log = log

    @classmethod
    async def start(cls, path: Path, bpf: str, seconds: float, max_packets: int) -> Capture:
        log = path.with_suffix(".log")
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                shutil.which("dumpcap") or "dumpcap",
                "-i", "lo", "-f", bpf, "-s", str(CAPTURE_SNAPLEN), "-P", "-B", "64",
                "-a", f"duration:{math.ceil(seconds)}", "-a", f"filesize:{CAPTURE_MAX_KB}", "-c", str(max_packets),
                "-w", str(path),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        capture = cls(proc, path, log)
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline and proc.returncode is None:
            if "Capturing on" in log.read_text(errors="replace"):
                return capture
            await asyncio.sleep(0.05)
        await capture.stop()
        raise RuntimeError(f"dumpcap did not start capturing: {log.read_text(errors='replace').strip()[-500:]}")

    async def stop(self) -> None:
        """SIGINT (it writes its statistics and ends), then SIGKILL after 10 s."""
        await stop_process(self.proc, (signal.SIGINT, 10))

    def dropped(self) -> int | None:
        found = re.findall(r"Packets received/dropped on interface '[^']*': (\d+)/(\d+)", self.log.read_text(errors="replace"))
        return sum(int(d) for _, d in found) if found else None

    async def intervals(self) -> Intervals:
        await self.stop()
        if not self.path.exists():
            return Intervals(error="no capture file")
        result = await asyncio.to_thread(rtp_intervals, self.path)
        result.dropped = self.dropped()
        return result

    async def delivery(self, caller: int, callee: int) -> Delivery | None:
        """Stop, and count the RTP between a relay and the endpoints on media
        ports ``caller`` and ``callee`` (None, after saying why on stderr,
        when the capture cannot be read)."""
        ended_early = self.proc.returncode is not None
        await self.stop()
        try:
            pairs = await asyncio.to_thread(rtp_port_pairs, self.path)
        except (OSError, ValueError) as exc:
            print(f"the RTP capture cannot be read: {exc}", file=sys.stderr)
            return None
        delivery = Delivery.count(pairs, caller, callee)
        delivery.lost, delivery.ended_early = self.dropped(), ended_early
        return delivery
