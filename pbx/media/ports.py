"""UDP port pairs for RTP (even port) and RTCP (the odd port above it).

Ports are claimed by binding them: there is no probe-then-close step that
another process could race. They are picked at random within the configured
range (from the OS's random source), as Asterisk and rtpengine do, so the
port of the next call cannot be guessed from the last one's. Recently released
ports are handed out last, which keeps stray packets of an ended call from
reaching the next one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Random picks tried before walking the whole range: with a range mostly free
# one or two do; the walk still finds the last free pair or proves there is none.
_RANDOM_TRIES = 8
# At most this many recently released ports are kept back (and at most half
# the range, so a small range still has fresh ports to give).
_RECENT_MAX = 256


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

    @property
    def in_use(self) -> int:
        """Number of pairs currently open through this pool."""
        return len(self._in_use)

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

    def _candidates(self) -> Iterator[int]:
        """Ports to try, in order: a few random ones, then the whole range from a
        random start, recently released ports left for last in both."""
        ports = self._ports
        count = len(ports)
        recent = self._recent
        for _ in range(_RANDOM_TRIES):
            port = ports[self._random.randrange(count)]
            if port not in recent:
                yield port
        start = self._random.randrange(count)
        for index in range(count):
            port = ports[(start + index) % count]
            if port not in recent:
                yield port
        # A copy: release() may change the dict while open() awaits a bind.
        yield from list(recent)
