"""The media relay's second process (pbx.media.relay_process) with real UDP
sockets on loopback: it forwards the packets of a plain bridge, everything
else still reaches the server's rules, the server's counts, statistics and
listeners miss nothing, and calls go on when the process dies.

The relay tests of tests/test_media.py also run with the process; these
are the cases only the process has. The server never reads a side's socket
while the process does (``is_reading()`` is False), so a packet that arrives
went through the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import cast

import pytest

from pbx.media.clock import MediaClock
from pbx.media.codecs import TELEPHONE_EVENT
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.media import relay_process
from pbx.media.relay_process import BACKLOG_READS, BATCH, LINGER, LINGER_MAX, MEASURED, PACKET, RELAYED, SETTLE_READS, SETTLED, RelayProcess
from pbx.media.relay_worker import RelayWorker
from tests.support.rtp_peer import until
from tests.test_media import HOST, Peer, free_range, rtp

DTMF_PT = TELEPHONE_EVENT.payload_type  # as the peers fixture (conftest) negotiates


@pytest.fixture
async def worker() -> AsyncIterator[RelayWorker]:
    worker = RelayWorker()
    worker.start()
    yield worker
    await worker.stop()


@pytest.fixture
async def relay(worker: RelayWorker, clock: MediaClock) -> AsyncIterator[RtpRelay]:
    low, high = free_range(8)
    pool = RtpPortPool(HOST, low, high)
    pool.relay_workers = [worker]
    relay = await RtpRelay.create(pool, clock)
    yield relay
    relay.close()


def reading(relay: RtpRelay) -> list[bool]:
    """Whether the server reads each side's RTP socket itself."""
    return [cast(asyncio.ReadTransport, side.transport).is_reading() for side in (relay.a, relay.b)]


async def test_the_process_forwards_a_call_and_the_server_counts_and_measures_every_packet(
    relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    assert reading(relay) == [False, False]
    sent = [rtp(0, seq=seq, ts=seq * 160, payload=bytes([seq % 256]) * 160) for seq in range(1, 201)]
    for packet in sent:
        a.send(packet, relay.a.port)
        await asyncio.sleep(0.001)  # pacing, as a phone's: the relay's socket buffer is not under test
    received = [(await b.recv())[0] for _ in sent]

    assert received == sent  # the very bytes, in order
    assert relay.stats()["a_to_b"] == {"relayed": 200, "transcoded": 0, "dropped": 0, "bytes": 200 * 172}
    report = relay.a.stats.report()
    assert (report.received, report.expected, report.lost) == (200, 200, 0)
    assert relay.a.stats.highest_seq() == 200  # the last packet's header came back with the counts


async def talk_both_ways(relay: RtpRelay, peers: tuple[Peer, Peer], seqs: range) -> None:
    """Each peer sends a packet of each sequence number to its side; return once the other peer has them all."""
    a, b = peers
    for seq in seqs:
        a.send(rtp(0, seq=seq), relay.a.port)
        b.send(rtp(0, seq=seq), relay.b.port)
    for peer in peers:
        for _ in seqs:
            await peer.recv()


async def test_the_counts_are_complete_when_the_call_ends(relay: RtpRelay, peers: tuple[Peer, Peer]) -> None:
    await talk_both_ways(relay, peers, range(1, 31))
    relay.close()  # no sync before: the detach itself brings the last counts
    assert relay.total().relayed == 60


async def test_a_recorded_side_shows_its_listener_every_packet_the_process_forwards(
    relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    heard: list[tuple[bytes, float | None]] = []
    relay.a.on_audio = lambda payload, pt: heard.append((payload, relay.a.heard_at))
    payloads = [bytes([seq]) * 160 for seq in range(1, 41)]
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    for seq, payload in enumerate(payloads, 1):
        a.send(rtp(0, seq=seq, payload=payload), relay.a.port)
    for _ in payloads:
        await b.recv()
    await until(lambda: len(heard) == len(payloads))
    assert [payload for payload, _ in heard] == payloads
    # Each the process forwarded (all but the first, which the server took
    # itself to learn the source) with when it reached the process, since
    # they come in batches: a recording places it by that, not by when the
    # server got to it.
    arrivals = [arrival for _, arrival in heard[1:]]
    assert all(arrival is not None and sent_at <= arrival <= loop.time() for arrival in arrivals)
    assert arrivals == sorted(arrivals)  # type: ignore[type-var]


async def test_a_feature_code_press_is_kept_by_the_server_while_the_audio_goes_on(
    relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    keys: list[str] = []

    def on_dtmf(key: str) -> bool:
        keys.append(key)
        return True  # a feature code: the other side must not hear it

    relay.a.on_dtmf = on_dtmf
    a.send(rtp(0, seq=1), relay.a.port)
    await b.recv()
    event = bytes([5, 0x0A, 0, 160])  # key 5, not yet ended
    a.send(rtp(DTMF_PT, seq=2, ts=320, payload=event), relay.a.port)
    a.send(rtp(0, seq=3), relay.a.port)
    data, _ = await b.recv()
    assert data[1] & 0x7F == 0  # the audio came through, the press did not
    await until(lambda: keys == ["5"])  # the press reached the server, maybe in the same round as the audio
    assert await b.nothing()


async def test_packets_go_through_the_server_once_the_other_side_plays(
    relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    a.send(rtp(0, seq=1), relay.a.port)
    first, _ = await b.recv()
    assert first[8:12] == (0x1234).to_bytes(4)  # forwarded as sent
    playback = relay.b.play([b"\xff" * 160])  # one frame of our own to b: our stream from now on
    assert await playback.done
    await b.recv()  # that frame
    a.send(rtp(0, seq=2), relay.a.port)
    data, _ = await b.recv()
    assert data[8:12] == relay.b._ssrc.to_bytes(4)  # renumbered into our stream: the server sent it


async def test_calls_go_on_in_the_server_when_the_relay_process_dies(
    worker: RelayWorker, relay: RtpRelay, peers: tuple[Peer, Peer]
) -> None:
    a, b = peers
    a.send(rtp(0, seq=1), relay.a.port)
    await b.recv()
    assert worker._process is not None
    os.kill(worker._process.pid, signal.SIGKILL)
    await until(lambda: not worker.running, timeout=5)
    assert reading(relay) == [True, True]
    await talk_both_ways(relay, peers, range(2, 12))
    assert relay.stats()["a_to_b"]["relayed"] == 11


def test_a_settle_drains_a_socket_numbered_past_select_s_limit() -> None:
    """A relay process of a busy server holds more than 1024 sockets: draining
    one at a call's end must not use select(), which cannot take them."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("needs 1200 file descriptors")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next descriptor is past 1024
    side, phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    process = RelayProcess(theirs)
    try:
        side.bind((HOST, 0))
        phone.bind((HOST, 0))
        packet = rtp(0, seq=1)
        phone.sendto(packet, side.getsockname())  # queued on the side's socket: loopback delivers at once
        socket.send_fds(ours, [pickle.dumps([("attach", 7), ("settle", [7], 1, False)])], [side.fileno()])
        assert process._read_control()
        assert max(process.ports) > 1024
        process._send()
        assert pickle.loads(ours.recv(1 << 20)) == [(PACKET, 7, packet, phone.getsockname()), (SETTLED, 1)]
    finally:
        for fd in filler:
            os.close(fd)
        for sock in (ours, theirs, side, phone, *(port.sock for port in process.ports.values())):
            sock.close()


@contextlib.contextmanager
def one_call(*, tapped: bool, server_buffer: int | None = None) -> Iterator[tuple[RelayProcess, socket.socket, socket.socket, socket.socket]]:
    """A relay process, run by hand here, with the two sides of one call
    attached and side a routed from ``caller`` to ``callee``: yields the
    process, the server's end of the pair, ``caller`` and ``callee``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if server_buffer is not None:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_buffer)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    caller, side_a, side_b, callee = sockets
    process = RelayProcess(theirs)
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        setup = [("attach", 1), ("attach", 2), ("route", 1, caller.getsockname(), 0, 2, callee.getsockname(), tapped)]
        socket.send_fds(ours, [pickle.dumps(setup)], [side_a.fileno(), side_b.fileno()])
        assert process._read_control()
        yield process, ours, caller, callee
    finally:
        for sock in (ours, theirs, *sockets):
            sock.close()


def test_a_server_that_falls_behind_never_holds_up_the_media() -> None:
    """The server's end of the pair stays full (its loop stalled): the process
    goes on forwarding every packet, only counting those it would have shown
    the server; once the server reads again, the counts arrive whole."""
    with one_call(tapped=True, server_buffer=65536) as (process, ours, caller, callee):  # the server's end is full after two batches
        callee.settimeout(2)
        port = process.by_sid[1]
        sent = 0

        def relay_one() -> None:
            nonlocal sent
            sent += 1
            packet = rtp(0, seq=sent % 65536, payload=bytes([sent % 256]) * 160)
            caller.sendto(packet, process.by_sid[1].sock.getsockname())
            assert process._take(port)
            assert callee.recv(2048) == packet  # forwarded at once, whatever the server does

        while not process.behind and sent < 100_000:  # every packet of a recorded side goes to the server
            relay_one()
        assert process.behind
        for _ in range(500):
            relay_one()
        assert sum(1 for record in process.batch if record[0] == MEASURED) <= BATCH

        ours.setblocking(False)
        relayed = 0
        while True:  # the server reads again, as its loop would
            try:
                records = pickle.loads(ours.recv(1 << 20))
            except BlockingIOError:
                if not (process.behind or process.batch or port.relayed):
                    break
                process._flush_counts(port)
                process._send()
                continue
            relayed += sum(r[5] + (r[4] & RELAYED > 0) if r[0] == MEASURED else r[2] for r in records)
        assert not process.behind
        assert relayed == sent


def test_a_backlog_on_one_socket_goes_on_in_a_few_rounds_not_one_packet_a_round() -> None:
    """A sender that catches up after a stall (SIPp's echo under load, a phone
    after a network hiccup) leaves a socket holding many packets at once. At
    one packet a round, with a rest between rounds, 300 of them took half a
    second and more: past a released side's LINGER, the tail of a call was
    lost. A socket readable two rounds running is read many times a round."""
    with one_call(tapped=False) as (process, _, caller, callee):
        burst = [rtp(0, seq=seq, payload=bytes([seq % 256]) * 160) for seq in range(1, 301)]
        for packet in burst:
            caller.sendto(packet, process.by_sid[1].sock.getsockname())  # queued on side a's socket: loopback delivers at once

        rounds = 0
        callee.setblocking(False)
        received: list[bytes] = []
        while len(received) < len(burst) and rounds < len(burst):
            assert process._round(process.poller.poll(1.0))
            rounds += 1
            while True:
                try:
                    received.append(callee.recv(2048))
                except BlockingIOError:
                    break
        assert received == burst
        assert rounds <= 2 + len(burst) // BACKLOG_READS


def test_a_sprayed_socket_is_read_no_more_than_its_share_of_a_round() -> None:
    """A stranger floods one side's port: the backlog rule reads it at most
    BACKLOG_READS times a round, so the other sockets' packets (here the
    caller's, on side a) go on in the same round rather than after the flood."""
    with one_call(tapped=False) as (process, ours, caller, callee):
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            stranger.bind((HOST, 0))
            side_b = process.by_sid[2].sock.getsockname()
            for seq in range(500):
                stranger.sendto(rtp(0, seq=seq), side_b)  # queued at once: loopback delivers as it sends
            assert process._round(process.poller.poll(1.0))  # one read of the flood: not yet a backlog
            packet = rtp(0, seq=1, payload=b"\x01" * 160)
            caller.sendto(packet, process.by_sid[1].sock.getsockname())
            assert process._round(process.poller.poll(1.0))
            callee.settimeout(1)
            assert callee.recv(2048) == packet  # forwarded in the same round as the flood's share
        finally:
            stranger.close()
        ours.setblocking(False)
        taken = 0
        while True:
            try:
                records = pickle.loads(ours.recv(1 << 20))
            except BlockingIOError:
                break
            taken += sum(1 for record in records if record[0] == PACKET and record[1] == 2)
        assert taken == 1 + BACKLOG_READS


def test_a_released_call_forwards_until_it_has_been_quiet_for_linger_and_no_longer_than_linger_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo of what a caller said just before the BYE comes after the
    release, and later still when the process was kept off the CPU and
    forwarded the caller's last packets late: a released call's sockets
    forward until its packets have stopped for LINGER, so a quiet call frees
    its ports after LINGER and a talking one after LINGER_MAX at most."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(relay_process, "time", SimpleNamespace(monotonic=lambda: clock.now, sleep=time.sleep))
    with one_call(tapped=False) as (process, _, caller, callee):
        callee.settimeout(1)
        side_a = process.by_sid[1].sock
        address = side_a.getsockname()
        process._settle([1, 2], 1, True)
        released = clock.now
        step = LINGER * 0.8
        forwarded = 0
        while clock.now + step < released + LINGER_MAX:  # a packet every 0.4 s: never quiet for LINGER
            clock.now += step
            caller.sendto(rtp(0, seq=forwarded), address)
            assert process._round(process.poller.poll(1.0))
            assert callee.recv(2048) == rtp(0, seq=forwarded)
            forwarded += 1
        assert forwarded > LINGER_MAX / LINGER  # still forwarding well past LINGER after the release
        clock.now = process._next_flush = released + LINGER_MAX
        process._round([])
        assert side_a.fileno() == -1 and not process.ports  # talking or not, gone at LINGER_MAX

    with one_call(tapped=False) as (process, _, caller, callee):
        side_a = process.by_sid[1].sock
        process._settle([1, 2], 2, True)
        clock.now = process._next_flush = clock.now + LINGER * 0.9
        process._round([])
        assert side_a.fileno() != -1  # quiet, but not for LINGER yet
        clock.now = process._next_flush = clock.now + LINGER * 0.2
        process._round([])
        assert side_a.fileno() == -1 and not process.ports  # quiet for LINGER: its ports are free


class StandIn:
    """A side's socket whose reads a subclass changes; everything else is the real socket's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


class Flooded(StandIn):
    """A side's socket under a flood faster than the process reads it, which
    loopback cannot make on demand: every read finds a stranger's datagram."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.reads = 0

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        self.reads += 1
        if self.reads > 10 * SETTLE_READS:
            raise AssertionError("still reading the flood")
        return rtp(0, seq=self.reads % 65536), ("192.0.2.66", 4000)


def test_a_call_ends_on_a_flooded_port_without_holding_up_the_process() -> None:
    """An attacker sprays a call's RTP port faster than the process reads it.
    When the call ends the process reads that socket for the settle, and
    stops after a full buffer's worth: it answers the server and goes back
    to the other calls, rather than reading the flood for as long as it lasts."""
    with one_call(tapped=False) as (process, _, _, _):
        port = process.by_sid[2]
        flooded = Flooded(port.sock)
        port.sock = cast(socket.socket, flooded)
        process._settle([1, 2], 9, True)
        assert flooded.reads == SETTLE_READS
        assert process.batch[-1] == (SETTLED, 9)


class Watched(StandIn):
    """A side's socket that notes, at each read, whether an answer from the
    process already waits at the server's end of the pair."""

    def __init__(self, sock: socket.socket, server_end: socket.socket) -> None:
        super().__init__(sock)
        self.server_end = server_end
        self.answered: list[bool] = []

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        try:
            self.server_end.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            self.answered.append(True)
        except BlockingIOError:
            self.answered.append(False)
        return self.sock.recvfrom(size)


def test_a_settle_is_answered_before_the_round_goes_on_to_the_other_sockets() -> None:
    """A call's end (or a look at its counts) waits for the process's answer,
    and the server's loop waits with it: every other call's SIP and prompts.
    The process answers as soon as it has read the server's message, before it
    reads the other sockets ready in that round (many milliseconds under
    load, when the server's media clock was seen a second late)."""
    with one_call(tapped=False) as (process, ours, caller, _):
        port = process.by_sid[1]
        watched = Watched(port.sock, ours)
        port.sock = cast(socket.socket, watched)
        caller.sendto(rtp(0, seq=1, payload=b"\x01" * 160), watched.sock.getsockname())
        ours.send(pickle.dumps([("settle", [2], 7, False)]))
        assert process._round(process.poller.poll(1.0))
        assert watched.answered == [True]  # side a's packet was read after the answer had gone
        assert pickle.loads(ours.recv(1 << 20))[-1] == (SETTLED, 7)


class HeldUp(StandIn):
    """A side's socket whose read keeps the process off the CPU for ``seconds``
    of the test's clock, as the scheduler can mid-round; ``meanwhile`` happens then."""

    def __init__(self, sock: socket.socket, clock: SimpleNamespace, seconds: float, meanwhile: Callable[[], object]) -> None:
        super().__init__(sock)
        self.clock = clock
        self.seconds = seconds
        self.meanwhile = meanwhile

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        self.clock.now += self.seconds
        self.meanwhile()
        return self.sock.recvfrom(size)


def test_a_released_call_is_not_closed_on_a_packet_that_came_while_the_round_was_held_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process is kept off the CPU in the middle of a round (seen for
    0.7 s with one core for 500 calls), and meanwhile the last echo of a
    released call reaches its socket: that round's poll did not see it, so
    the call has not been quiet for LINGER as far as the process can tell,
    and its sockets stay open for the next round to forward the echo."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(relay_process, "time", SimpleNamespace(monotonic=lambda: clock.now, sleep=time.sleep))
    with one_call(tapped=False) as (process, _, caller, callee), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        callee.settimeout(1)
        side_a, side_b = process.by_sid[1], process.by_sid[2]
        process._settle([1, 2], 1, True)
        clock.now += LINGER / 2
        stranger.sendto(rtp(0, seq=1), side_b.sock.getsockname())  # read in the next round, which is held up there
        side_b.sock = cast(socket.socket, HeldUp(side_b.sock, clock, LINGER, lambda: caller.sendto(rtp(0, seq=2), side_a.sock.getsockname())))
        process._next_flush = clock.now
        assert process._round(process.poller.poll(1.0))
        assert process.lingering  # not closed: its last poll was LINGER / 2 after the release
        assert process._round(process.poller.poll(1.0))
        assert callee.recv(2048) == rtp(0, seq=2)
