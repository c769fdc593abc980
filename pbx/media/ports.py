"""UDP port pairs for RTP (even port) and RTCP (the odd port above it).

Ports are claimed by binding them: there is no probe-then-close step that
another process could race. They are picked at random within the configured
range (from the OS's random source), as Asterisk and rtpengine do, so the
port of the next call cannot be guessed from the last one's. Recently released
ports are handed out last, which keeps stray packets of an ended call from
reaching the next one.

A process that starts again after a crash is where stray packets are worst:
phones of the calls it lost still send to the ports those calls had, for as
long as nobody hangs them up, and a new call given such a port could latch
that stale stream as its party (a phone behind NAT is latched from its
signalling IP, which the stale phone may share). So at start-up
(:meth:`RtpPortPool.sweep`) the pool listens on every RTP port of the range
for a moment before it hands any out, and a port that hears anything, when
no call of ours exists yet, is quarantined: held bound, and handed out only
once it has been quiet for a while, or when no other port is free (a spray of
the whole range at start-up must not stop the server taking calls; the
relay's strict-source rules still keep a stranger on another host out).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import resource
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pbx.media.relay_worker import RelayWorker

logger = logging.getLogger(__name__)

# Random picks tried before walking the whole range: with a range mostly free
# one or two do; the walk still finds the last free pair or proves there is none.
_RANDOM_TRIES = 8
# At most this many recently released ports are kept back (and at most half
# the range, so a small range still has fresh ports to give).
_RECENT_MAX = 256
# The start-up sweep listens this long (seconds) on each port: a packet or
# more of any stream still running, whatever its packet time (20-60 ms).
SWEEP_WINDOW = 0.1
# A quarantined port is handed out once it has heard nothing for this long.
QUIET_SECONDS = 10.0
# At most this many ports are held in quarantine (each one a file descriptor).
_QUARANTINE_MAX = 256
# Bytes an RTP socket may hold unread: about 800 packets, where Linux's
# default of 208 KB holds about 170. A burst (a sender catching up after a
# stall, a relay process kept off the CPU for a moment) waits here instead
# of being dropped: 500 bridged calls on two busy cores lost 17,000 to 54,000
# packets that way (bench/cores.py), none at their sockets with this. Linux caps it at
# net.core.rmem_max (README, "Both cores").
RTP_RECEIVE_BUFFER = 1 << 20


class RtpPortsExhausted(OSError):
    """Every even port of the RTP range is taken (by us or by someone else)."""

    def __init__(self, port_min: int, port_max: int) -> None:
        super().__init__(errno.EADDRINUSE, f"no free RTP port pair in {port_min}-{port_max}")


@dataclass(eq=False)
class RtpSocketPair[R: asyncio.DatagramProtocol, C: asyncio.DatagramProtocol]:
    """The two sockets of one RTP stream, bound on ``port`` and ``port + 1``."""

    port: int
    rtp_transport: asyncio.DatagramTransport
    rtp_protocol: R
    rtcp_transport: asyncio.DatagramTransport
    rtcp_protocol: C
    _pool: RtpPortPool
    _closed: bool = field(default=False, init=False)

    def close(self) -> None:
        """Close both sockets and give the port back to the pool.

        The sockets are released by the OS on the next loop iteration; the pool
        skips a port it finds still bound, so this never blocks a later ``open``.
        """
        if self._closed:
            return  # the port may already belong to another pair
        self._closed = True
        self.rtp_transport.close()
        self.rtcp_transport.close()
        self._pool.release(self.port)


class RtpPortPool:
    """Binds RTP/RTCP socket pairs on ``ip`` within ``[port_min, port_max]``."""

    def __init__(self, ip: str, port_min: int, port_max: int) -> None:
        self.ip = ip
        # The processes that read the RTP sockets of the relays bound here
        # (pbx.media.relay_worker), once the server started them.
        self.relay_workers: list[RelayWorker] = []
        first = port_min + (port_min & 1)
        # RTCP takes port + 1, which must stay inside the range too.
        self._ports = range(first, port_max, 2)
        self._port_min = port_min
        self._port_max = port_max
        self._in_use: set[int] = set()
        self._random = random.SystemRandom()
        # Released ports, oldest first, handed out only when no other is free.
        self._recent: dict[int, None] = {}
        self._recent_max = min(len(self._ports) // 2, _RECENT_MAX)
        # Ports that heard strangers at start-up: their bound socket and when
        # they last heard anything; handed out after all others.
        self._quarantine: dict[int, _Quarantined] = {}

    @property
    def in_use(self) -> int:
        """Number of pairs currently open through this pool."""
        return len(self._in_use)

    @property
    def quarantined(self) -> frozenset[int]:
        """RTP ports held in quarantine now (:meth:`sweep`)."""
        return frozenset(self._quarantine)

    @property
    def capacity(self) -> int:
        """Number of pairs the range can hold."""
        return len(self._ports)

    async def open[R: asyncio.DatagramProtocol, C: asyncio.DatagramProtocol](
        self, rtp_factory: Callable[[], R], rtcp_factory: Callable[[], C]
    ) -> RtpSocketPair[R, C]:
        """Bind a free even port, picked at random, and the one above it.

        Ports bound by other processes are skipped. Raises RtpPortsExhausted
        when no pair in the range can be bound; other bind errors (an address
        this host does not have, say) propagate.
        """
        loop = asyncio.get_running_loop()
        tried: set[int] = set()
        for port in self._candidates():
            if port in self._in_use or port in tried:
                continue
            tried.add(port)
            quarantined = self._quarantine.pop(port, None)
            if quarantined is not None:
                logger.warning("RTP port %d handed out while still in quarantine: no other port is free", port)
                quarantined.close()
            # Claimed before the first await so a concurrent open() skips it.
            self._in_use.add(port)
            try:
                rtp_transport, rtp_protocol = await loop.create_datagram_endpoint(
                    rtp_factory, local_addr=(self.ip, port)
                )
            except OSError as exc:
                self._in_use.discard(port)
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            try:
                rtcp_transport, rtcp_protocol = await loop.create_datagram_endpoint(
                    rtcp_factory, local_addr=(self.ip, port + 1)
                )
            except OSError as exc:
                rtp_transport.close()
                self._in_use.discard(port)
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._recent.pop(port, None)
            rtp_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RTP_RECEIVE_BUFFER)
            return RtpSocketPair(port, rtp_transport, rtp_protocol, rtcp_transport, rtcp_protocol, self)
        logger.warning("RTP port range %d-%d exhausted (%d pairs open here)", self._port_min, self._port_max, len(self._in_use))
        raise RtpPortsExhausted(self._port_min, self._port_max)

    def release(self, port: int) -> None:
        """Mark ``port`` free again; RtpSocketPair.close() calls this.

        It joins the recently released ports, which ``open`` hands out last.
        """
        self._in_use.discard(port)
        if self._recent_max:
            self._recent[port] = None
            if len(self._recent) > self._recent_max:
                del self._recent[next(iter(self._recent))]

    async def sweep(self, window: float = SWEEP_WINDOW, quiet: float = QUIET_SECONDS) -> None:
        """Listen on every RTP port of the range for ``window`` seconds and
        quarantine each one that hears a packet; call it at start-up, before
        any call can take a port. A quarantined port is released once it has
        heard nothing for ``quiet`` seconds.

        Ports are swept in batches that leave half the file descriptors free
        (the whole default range at once under the shipped systemd unit's
        limit, in about a second under the usual 1024); ports another process
        holds are skipped.
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        batch = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
        ports = self._ports
        for first in range(0, len(ports), batch):
            bound: list[tuple[int, socket.socket]] = []
            for port in ports[first : first + batch]:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.bind((self.ip, port))
                except OSError:
                    sock.close()  # another process's port, or an address this host lacks: open() finds out
                    continue
                sock.setblocking(False)
                bound.append((port, sock))
            await asyncio.sleep(window)
            for port, sock in bound:
                try:
                    _, source = sock.recvfrom(2048)
                except OSError:
                    sock.close()  # nothing arrived (or an ICMP error of no consequence)
                    continue
                if len(self._quarantine) >= _QUARANTINE_MAX:
                    sock.close()
                    continue
                logger.warning(
                    "RTP port %d quarantined: packets from %s before any call had it (media of a call before a restart?)",
                    port, source[0],
                )  # fmt: skip
                self._quarantine[port] = _Quarantined(loop, sock, quiet, functools.partial(self._end_quarantine, port))

    def close(self) -> None:
        """Unbind the ports held in quarantine (open pairs are their owners' to close)."""
        for quarantined in self._quarantine.values():
            quarantined.close()
        self._quarantine.clear()

    def _end_quarantine(self, port: int) -> None:
        quarantined = self._quarantine.pop(port, None)
        if quarantined is not None:
            quarantined.close()
            logger.info("RTP port %d out of quarantine: quiet for %.0f s", port, quarantined.quiet)

    def _candidates(self) -> Iterator[int]:
        """Ports to try, in order: a few random ones, then the whole range from a
        random start, recently released ports left for last in both, and
        quarantined ones after those."""
        ports = self._ports
        count = len(ports)
        recent = self._recent
        quarantine = self._quarantine
        for _ in range(_RANDOM_TRIES):
            port = ports[self._random.randrange(count)]
            if port not in recent and port not in quarantine:
                yield port
        start = self._random.randrange(count)
        for index in range(count):
            port = ports[(start + index) % count]
            if port not in recent and port not in quarantine:
                yield port
        # Copies: release() and the quarantine's timers may change them while open() awaits a bind.
        yield from list(recent)
        yield from list(quarantine)


class _Quarantined:
    """A port held bound while it hears strangers; ``on_quiet`` is called
    once it has heard nothing for ``quiet`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, quiet: float, on_quiet: Callable[[], None]) -> None:
        self.quiet = quiet
        self._loop = loop
        self._sock = sock
        self._last = time.monotonic()
        loop.add_reader(sock.fileno(), self._drain)
        self._timer = loop.call_later(quiet, self._check, on_quiet)

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(2048)
            except OSError:  # BlockingIOError: read them all
                return
            self._last = time.monotonic()

    def _check(self, on_quiet: Callable[[], None]) -> None:
        left = self._last + self.quiet - time.monotonic()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check, on_quiet)
        else:
            on_quiet()

    def close(self) -> None:
        """Unbind the port at once, so that it can be bound again right away."""
        self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
