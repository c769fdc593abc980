"""The server's end of the media relay's second process (:mod:`pbx.media.relay_process`).

The server keeps one process to configure and operate: calls, SIP, RTCP,
prompts and music stay here, and so does every rule of what a relay side
takes from whom. What moves to the second core is the read of every relay
side's RTP socket and the forwarding of the packets that need nothing but
forwarding (the steady state of a call in a plain bridge, both ways). Each
side, once its sockets are bound (:meth:`attach`), stops reading its RTP
socket here and gives a duplicate to the process, with a *route* it
updates whenever what the side would do with a packet changes
(:meth:`RelaySide.route`). Whatever is off the route comes back and goes
through ``datagram_received`` as before; the counts and the statistics
samples of what was forwarded there come back too, so a side's counters,
statistics, recording taps and RTCP read as if it had done all the work.
:meth:`detach` waits (about a millisecond; at most ``SETTLE_TIMEOUT``) until
the process has let go of a relay's sockets and every record of them is in,
so what a call's end reports is complete; :meth:`sync` waits the same way
for a look at a call's counts while it lasts.

If the process dies, every side it read for reads its socket here again:
calls go on, on one core, and a new process takes the calls that begin from
``RESTART_DELAY`` later. A process that stops answering (stopped, stuck in a
loop) is dead to the server too: the server asks it every ``PING_INTERVAL``,
and one that leaves a message unanswered for ``HUNG_AFTER`` is killed, so its
calls' audio comes back. Meanwhile a call's end waits for it once, not at
every call: while a message has gone unanswered for ``SETTLE_TIMEOUT``,
settles do not wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import select
import socket
import subprocess
import sys
import time
from typing import Any, cast

from pbx.media.relay_process import BUFFER, COUNTS, MEASURED, PACKET, RELAYED, SAMPLED, SETTLED, TAPPED
from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT = 1.0  # seconds a call's end (or a look at its counts) waits for the process at most
PING_INTERVAL = 1.0  # seconds between two questions to a process that has answered the last
# Seconds a process may leave the server's message unanswered before it is
# killed as hung: far more than a busy core keeps it off the CPU (0.7 s seen
# at 500 calls on one core), and short enough that its calls' silence ends.
HUNG_AFTER = 5.0
RESTART_DELAY = 1.0  # seconds from a process's end to the next one's start


class RelayWorker:
    """The second process and the relay sides it reads for."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._sides: dict[int, RelaySide] = {}
        self._transports: dict[int, asyncio.DatagramTransport] = {}  # each side's own, under any SRTP wrapper
        self._routes: dict[int, tuple[Any, ...]] = {}  # the last one each side's was given
        self._ids = itertools.count(1)
        self._asked: dict[int, float] = {}  # the settles the process has not answered yet, with when they went
        self._timer: asyncio.TimerHandle | None = None  # the next ping, or the restart

    @property
    def running(self) -> bool:
        return self._sock is not None

    @property
    def attached(self) -> int:
        """Relay sides the process reads for now."""
        return len(self._sides)

    def start(self) -> None:
        """Start the process; sides attach to it from then on."""
        self._reap()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pbx.media.relay_process", str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        self._sock = ours
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._read)
        self._timer = loop.call_later(PING_INTERVAL, self._ping)
        logger.info("media relay process %d started", self._process.pid)

    async def stop(self) -> None:
        """End the process (closing our end ends it) and wait for it."""
        self._lost(quietly=True)
        process, self._process = self._process, None
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, HUNG_AFTER)
        except subprocess.TimeoutExpired:  # a hung process does not see its end close
            process.kill()
            await asyncio.to_thread(process.wait)

    def _ping(self) -> None:
        """Ask the process a settle of nothing, unless an earlier question is
        still out; kill it when one has been for ``HUNG_AFTER``."""
        now = time.monotonic()
        oldest = min(self._asked.values(), default=now)
        if now - oldest >= HUNG_AFTER and self._process is not None:
            logger.error("media relay process %d has not answered for %.1f s: killed", self._process.pid, now - oldest)
            self._process.kill()
            self._lost()
            return
        self._timer = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping)
        if not self._asked:
            self._ask([])  # after the next ping is set: a lost process replaces it with the restart

    def _reap(self) -> None:
        """Wait for the last process, which ended (or was killed) ``RESTART_DELAY`` ago."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def attach(self, side: RelaySide) -> None:
        """The process reads ``side``'s RTP socket from now on."""
        sock = self._sock
        if sock is None:
            return
        sid = next(self._ids)
        try:
            socket.send_fds(sock, [pickle.dumps([("attach", sid)])], [side.transport.get_extra_info("socket").fileno()])
        except OSError:
            self._lost()
            return
        self._sides[sid] = side
        self._transports[sid] = side.transport
        side.sid = sid
        side.worker = self
        cast(asyncio.ReadTransport, side.transport).pause_reading()

    def reroute(self, side: RelaySide) -> None:
        """Tell the process which packets of ``side``'s peer it may forward
        itself: the latched source's, of the peer's codec when no rule changes
        it, while neither side uses SRTP and the other side sends no stream of
        its own, to the other side's peer; and whether the side's audio is
        listened to. Sent only when it changed."""
        if side.worker is not self:
            return
        other = side.other
        codec = side.codec
        fast_pt = -1
        if (
            side.source is not None
            and codec is not None
            and codec.payload_type not in side.rules
            and side.unprotect is None
            and other.unprotect is None
            and not other.own_stream
            and other.worker is self
        ):
            fast_pt = codec.payload_type
        route = (side.source if fast_pt >= 0 else None, fast_pt, other.sid, other.dest, side.on_audio is not None)
        if route != self._routes.get(side.sid):
            self._routes[side.sid] = route
            self._send([("route", side.sid, *route)])

    def detach(self, sides: list[RelaySide]) -> None:
        """The process lets go of ``sides``' sockets; returns once every
        record it had of them is handled (or after ``SETTLE_TIMEOUT``, or
        at once while the process is that late with an earlier answer)."""
        self._settle(sides, release=True)

    def sync(self, sides: list[RelaySide]) -> None:
        """Returns once every record the process had of ``sides`` is handled
        (or as :meth:`detach`): their counts are those of now."""
        self._settle(sides, release=False)

    def _settle(self, sides: list[RelaySide], *, release: bool) -> None:
        sids = [side.sid for side in sides if side.worker is self]
        sock = self._sock
        if not sids or sock is None:
            return
        late = any(time.monotonic() - asked >= SETTLE_TIMEOUT for asked in self._asked.values())
        token = self._ask(sids, release)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while not late and token in self._asked and self._sock is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                logger.warning("media relay process: no answer within %.1f s", SETTLE_TIMEOUT)
                break
            self._read()
        if release:
            for sid in sids:
                self._transports.pop(sid, None)
                self._routes.pop(sid, None)
                side = self._sides.pop(sid, None)
                if side is not None:
                    side.worker = None

    def _ask(self, sids: list[int], release: bool = False) -> int:
        """Send the process a settle of ``sids``; its token is in ``_asked`` until it answers."""
        token = next(self._ids)
        self._asked[token] = time.monotonic()
        self._send([("settle", sids, token, release)])
        return token

    def _send(self, messages: list[tuple[Any, ...]]) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(pickle.dumps(messages, pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._lost()

    def _read(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._dispatch(pickle.loads(data))

    def _dispatch(self, records: list[tuple[Any, ...]]) -> None:
        sides = self._sides
        for record in records:
            kind = record[0]
            if kind == SETTLED:
                self._asked.pop(record[1], None)
                continue
            side = sides.get(record[1])
            if side is None:
                continue
            if kind == PACKET:
                side.datagram_received(record[2], record[3])
            elif kind == MEASURED:
                _counted(side, record[5], record[6], record[7], None)
                _measured(side, record[2], record[3], record[4])
            elif kind == COUNTS:
                _counted(side, record[2], record[3], record[4], record[5])

    def _lost(self, quietly: bool = False) -> None:
        """Our end is closed, or the process is gone: every side reads its own
        socket again; unless ``quietly`` (the server stops), a new process
        starts ``RESTART_DELAY`` later for the calls to come."""
        if self._timer is not None:
            self._timer.cancel()  # the next ping; or, the process being gone already, the restart
        sock, self._sock = self._sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        if not quietly:
            logger.error("media relay process is gone; its calls are relayed in the server process")
            self._timer = loop.call_later(RESTART_DELAY, self.start)
        loop.remove_reader(sock.fileno())
        sock.close()
        sides, self._sides = self._sides, {}
        transports, self._transports = self._transports, {}
        self._routes.clear()
        self._asked.clear()
        for sid, side in sides.items():
            side.worker = None
            if not side.closed:
                cast(asyncio.ReadTransport, transports[sid]).resume_reading()


def _measured(side: RelaySide, data: bytes, arrival: float, flags: int) -> None:
    """A packet the process took on ``side``'s route (and forwarded, when
    ``RELAYED``): sampled into the statistics and shown to ``on_audio`` as
    ``datagram_received`` would have, then counted."""
    stats = side.stats
    stats.last = data
    if flags & SAMPLED:
        stats.sample(data, arrival)
    if flags & TAPPED and side.on_audio is not None:
        try:
            side.hear(data, arrival)
        except Exception:
            logger.exception("relay side %s: audio listener failed", side.name)
    counters = side.counters
    if flags & RELAYED:
        counters.relayed += 1
        counters.bytes += len(data)
    else:
        counters.dropped += 1


def _counted(side: RelaySide, relayed: int, size: int, dropped: int, last: bytes | None) -> None:
    """Packets the process forwarded (or dropped, having nowhere to send
    them) on ``side``'s route since it last said; ``last`` is the newest one's header."""
    counters = side.counters
    counters.relayed += relayed
    counters.bytes += size
    counters.dropped += dropped
    if last is not None:
        side.stats.last = last
