"""The media relay's second process: the hot path of every relay side, on
the other core (``python -m pbx.media.relay_process FD``).

The server (:mod:`pbx.media.relay_worker`) hands this process a duplicate of
each relay side's RTP socket and tells it, per socket, a *route*: the one
source address the side has latched, the one payload type it may pass on as
it is, and where such packets go (the other side's socket and peer). A
packet that fits the route is sent on here, as the very bytes received, and
counted; everything else (a stranger, a packet before the source is known,
an RFC 4733 event, a payload type that needs rewriting, a side whose peer
uses SRTP) goes back to the server as it came, to be handled there by
:meth:`RelaySide.datagram_received` as if read from the socket itself. So
the rules of what a side takes from whom live in one place, and this process
only ever does what the server would have done the same way.

The server still sees what it measures: the two packets in sixteen that
:class:`~pbx.media.relay_stats.ReceiveStats` samples, and every packet of a
side that is being recorded (its ``on_audio`` listener), each with the time
it arrived and the counts before it; the counts of the rest come as deltas
at least twice a second, and all of a side's when the server settles it
(``settle``: to read a call's counts, or to detach its sides at its end).

Nothing here parses more than two header bytes, allocates more than the
received ``bytes``, or waits on anything but one ``epoll``; one read per
readable socket per round (more when it was readable the round before: a
backlog), and a rest of ``COALESCE`` after each round, so that under load
each wake-up serves many packets (the wake-ups, not the packets, were most
of the cost). Packets the server must handle go to it at once;
measurements, and the audio it listens to, wait up to ``REPORT_INTERVAL``
to go together. Messages both ways are pickled lists over a ``SOCK_SEQPACKET``
Unix socket pair; sockets come with their message as ``SCM_RIGHTS``. The
process ends when the server's end of the pair closes (the server stopped
or died).
"""

from __future__ import annotations

import array
import pickle
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

# Worker -> server records, each a tuple starting with its kind.
PACKET = 0  # (PACKET, sid, data, addr): not on the route; the server handles it
MEASURED = 1  # (MEASURED, sid, data, arrival, flags, relayed, bytes, dropped): on the route, the server measures it; counts before it
COUNTS = 2  # (COUNTS, sid, relayed, bytes, dropped, last): deltas since the last COUNTS, last packet seen
SETTLED = 3  # (SETTLED, token): every record of the sides of that settle was sent before
# MEASURED flags
SAMPLED = 1  # a statistics sample: sequence number 16n - 1 or 16n
TAPPED = 2  # the side's audio is listened to (a recording, a voicemail)
RELAYED = 4  # sent on here; else dropped (no destination)

RTP_HEADER = 12
FLUSH_INTERVAL = 0.5  # seconds between count deltas at most
BATCH = 256  # records per message at most
# Seconds the process rests after a round of packets, so that the next
# round finds several: one wake-up per packet costs more than the packet.
# A packet waits that long at most, against the 20 ms between two of a stream.
COALESCE = 0.002
# Seconds measurements, counts and audio listened to may wait to go to the server together;
# packets it must handle itself and answers go at once.
REPORT_INTERVAL = 0.02
BACKLOG_READS = 64  # reads at most in a round of a socket with a backlog, so a sprayed one cannot hold up the rest
# Reads at most of one socket in a settle: more than a full receive buffer
# holds, so everything there before the settle is read; what a flood adds
# meanwhile must not keep the process (every call of it) in the settle.
SETTLE_READS = 8192
# Seconds a released call's sides still forward what is on their routes
# after the last such packet (the echo of what a caller said just before its
# BYE, or what a process kept off the CPU forwarded late), and at most after
# the release: a quiet call's ports are free again soon, a talking one's in time.
LINGER = 0.5
LINGER_MAX = 3.0
BEHIND_MAX = 16 * BATCH  # records held at most while the server is behind
BUFFER = 4 * 1024 * 1024  # bytes of each end's socket buffers
_FD = array.array("i")  # the C int of a file descriptor in SCM_RIGHTS


class _Port:
    """One relay side's RTP socket here, and its route."""

    __slots__ = ("sid", "sock", "source", "fast_pt", "out", "dest", "tap", "relayed", "bytes", "dropped", "last", "linger")

    def __init__(self, sid: int, sock: socket.socket) -> None:
        self.sid = sid
        self.sock = sock
        self.source: Any = None  # the peer's latched address; None: nothing is on the route
        self.fast_pt = -1  # the payload type on the route
        self.out: socket.socket | None = None  # the other side's socket
        self.dest: Any = None  # the other side's peer; None: packets on the route are dropped
        self.tap = False
        self.relayed = self.bytes = self.dropped = 0  # not yet reported
        self.last = b""
        self.linger: _Linger | None = None  # once released


class _Linger:
    """The sides one settle released, forwarding until quiet (see LINGER)."""

    __slots__ = ("ports", "heard", "until")

    def __init__(self, ports: list[_Port], now: float) -> None:
        self.ports = ports
        self.heard = now  # the last packet on a route of theirs, or the release
        self.until = now + LINGER_MAX


class RelayProcess:
    """The loop of the second process; ``run()`` returns when the server's end closes."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.poller = select.epoll()
        self.poller.register(control.fileno(), select.EPOLLIN)
        self.ports: dict[int, _Port] = {}  # by file descriptor here
        self.by_sid: dict[int, _Port] = {}
        self.batch: list[tuple[Any, ...]] = []
        self._handlers: dict[str, Callable[..., None]] = {"attach": self._attach, "route": self._route, "settle": self._settle}
        self._pending_fds: list[int] = []
        self.urgent = False  # the batch holds a packet or an answer the server waits for: send it now
        self.lingering: list[_Linger] = []  # released sides still relaying
        self.sent = 0.0  # when the last batch went
        # The server's end was full at the last send: the batch waits for the
        # next round, and nothing is measured until it has gone (see _send).
        self.behind = False
        self._readable: set[int] = set()  # the sockets read in the last round, if it was just before
        self._next_flush = time.monotonic() + FLUSH_INTERVAL

    def run(self) -> None:
        while True:
            events = self.poller.poll(0)
            if not events:  # the last round's sockets are empty: no backlog
                self._readable.clear()
                events = self.poller.poll(REPORT_INTERVAL if self.batch else FLUSH_INTERVAL)
            if not self._round(events):
                return
            if events:
                time.sleep(COALESCE)

    def _round(self, events: list[tuple[int, int]]) -> bool:
        """Serve what one poll found; False once the server's end is gone."""
        # What the poll found is true as of now; the round can be kept off
        # the CPU long after (a busy core: 0.7 s seen), while packets arrive
        # that only the next poll sees. A released call is quiet only as far
        # as a poll has seen.
        polled = time.monotonic()
        # The server's messages first: a route it sent before a packet
        # arrived is ready by the time the packet is, and must apply to it.
        # A settle's answer goes at once, not after the round: the server
        # waits for it (a call's end) with everything else held up.
        control_fd = self.control.fileno()
        if any(fd == control_fd for fd, _ in events):
            if not self._read_control():
                return False
            if self.urgent and not self.behind:
                self._send()
        # One read per socket, unless it was readable the round just before too: a
        # backlog (a burst, a sender catching up after a stall), which one
        # packet a round would drain too late, and past a released side's LINGER.
        backlogged, self._readable = self._readable, set()
        for fd, _ in events:
            port = self.ports.get(fd)
            if port is not None:
                self._readable.add(fd)
                if fd in backlogged:
                    self._drain(port, BACKLOG_READS)
                else:
                    self._take(port)
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_INTERVAL
            if not self.behind:  # else the counts wait on the ports
                for port in self.by_sid.values():
                    self._flush_counts(port)
            self._close_lingering(polled)
        if (self.urgent and not self.behind) or (self.batch and now >= self.sent + REPORT_INTERVAL):
            self._send()
        return True

    def _take(self, port: _Port) -> bool:
        """Read one datagram (epoll reports the socket again while it has more)
        and send it on when it fits the route, else pass it to the server;
        False when the socket had nothing."""
        try:
            data, addr = port.sock.recvfrom(2048)
        except BlockingIOError:
            return False
        except OSError:
            return True  # an ICMP error queued on the socket: the next read gets the datagrams
        batch = self.batch
        if addr != port.source or len(data) < RTP_HEADER or data[1] & 0x7F != port.fast_pt:
            if port.linger is None and len(batch) < BEHIND_MAX:  # else a lingering side's, or lost while the server is behind
                batch.append((PACKET, port.sid, data, addr))
                self.urgent = True
        elif port.linger is not None:
            port.linger.heard = time.monotonic()
            if port.dest is not None:
                _send(port.out, data, port.dest)
        else:
            dest = port.dest
            flags = TAPPED if port.tap else 0
            if not (data[3] + 1) & 14:  # 16n - 1 or 16n, as RelaySide.datagram_received samples
                flags |= SAMPLED
            if flags and not self.behind:
                if dest is not None and _send(port.out, data, dest):
                    flags |= RELAYED
                # With the counts before it: the server's are right when it measures.
                # The arrival goes with it: a recording places audio by the media clock's tick it arrived in.
                batch.append((MEASURED, port.sid, data, time.monotonic(), flags, port.relayed, port.bytes, port.dropped))
                port.relayed = port.bytes = port.dropped = 0
            elif dest is not None and _send(port.out, data, dest):
                port.relayed += 1
                port.bytes += len(data)
            else:
                port.dropped += 1
            port.last = data
        if len(batch) >= BATCH and not self.behind:
            self._send()
        return True

    def _drain(self, port: _Port, most: int) -> None:
        """Take the datagrams the socket holds now, ``most`` of them at most."""
        for _ in range(most):
            if not self._take(port):
                return

    def _flush_counts(self, port: _Port) -> None:
        if port.relayed or port.dropped:
            self.batch.append((COUNTS, port.sid, port.relayed, port.bytes, port.dropped, port.last[:RTP_HEADER]))
            port.relayed = port.bytes = port.dropped = 0

    def _send(self) -> None:
        """Send the batch, unless the server's end is full: a server that falls
        behind (a busy loop, a stall) must not stop the media. Then the batch
        waits for the next round, and until it has gone the packets on the
        routes are only counted: no samples, no recorded audio (a gap in the
        recording rather than in every call)."""
        try:
            self.control.send(pickle.dumps(self.batch, pickle.HIGHEST_PROTOCOL), socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.behind = True
            self.sent = time.monotonic()  # tried again a REPORT_INTERVAL later
            return
        self.behind = False
        self.batch.clear()
        self.urgent = False
        self.sent = time.monotonic()

    def _read_control(self) -> bool:
        """Apply the server's messages; False once it is gone."""
        while True:
            try:  # not socket.recv_fds(), which drops its flags (Python 3.12)
                data, ancillary, _, _ = self.control.recvmsg(1 << 20, socket.CMSG_SPACE(16 * _FD.itemsize), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            for level, kind, fds in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self._pending_fds.extend(array.array("i", fds[: len(fds) - len(fds) % _FD.itemsize]))
            for name, *args in pickle.loads(data):
                self._handlers[name](*args)

    def _attach(self, sid: int) -> None:
        sock = socket.socket(fileno=self._pending_fds.pop(0))
        sock.setblocking(False)
        port = _Port(sid, sock)
        self.ports[sock.fileno()] = port
        self.by_sid[sid] = port
        self.poller.register(sock.fileno(), select.EPOLLIN)

    def _route(self, sid: int, source: Any, fast_pt: int, out_sid: int, dest: Any, tap: bool) -> None:
        port = self.by_sid.get(sid)
        if port is None:
            return
        out = self.by_sid.get(out_sid)
        if out is None:
            source, fast_pt = None, -1  # nowhere to send: the server decides
        port.source, port.fast_pt, port.dest, port.tap = source, fast_pt, dest, tap
        port.out = out.sock if out is not None else None

    def _settle(self, sids: list[int], token: int, release: bool) -> None:
        """Send the server everything of ``sids`` (what their sockets hold, up
        to SETTLE_READS each; their counts), then ``SETTLED``; with ``release``
        also let go of their sockets."""
        released: list[_Port] = []
        for sid in sids:
            port = self.by_sid.get(sid)
            if port is None:
                continue
            self._drain(port, SETTLE_READS)
            self._flush_counts(port)
            if release:
                # The server is done with the side, but packets already on
                # their way still go where the route says, until LINGER,
                # as rtpengine keeps a call a while after its delete;
                # uncounted, as the call's counts are final now.
                del self.by_sid[sid]
                released.append(port)
        if released:
            linger = _Linger(released, time.monotonic())
            for port in released:
                port.linger = linger
            self.lingering.append(linger)
        self.batch.append((SETTLED, token))
        self.urgent = True

    def _close_lingering(self, polled: float) -> None:
        """Close the released sides whose LINGER was over when the last poll
        found nothing more of theirs (``polled``). A side's route only
        ever leads to the other side of its call, released in the same settle
        and closed with it, so no route of a side still served leads to a
        closed socket."""
        over = [linger for linger in self.lingering if polled >= min(linger.heard + LINGER, linger.until)]
        for linger in over:
            self.lingering.remove(linger)
            for port in linger.ports:
                del self.ports[port.sock.fileno()]
                self.poller.unregister(port.sock.fileno())
                port.sock.close()


def _send(sock: socket.socket | None, data: bytes, dest: Any) -> bool:
    if sock is None:
        return False
    try:
        sock.sendto(data, dest)
    except OSError:
        return False  # a full send buffer, an unreachable peer: a lost datagram, as RTP allows
    return True


def main() -> None:
    # The server ends this process by closing its end, after its calls:
    # a Ctrl-C or systemd's SIGTERM to the whole group must not cut them first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=int(sys.argv[1]))
    control.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    RelayProcess(control).run()


if __name__ == "__main__":
    main()
