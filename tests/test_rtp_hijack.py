"""Media belongs to the call: an attacker spraying the RTP port range gets
nothing and injects nothing, while a phone behind NAT still gets its audio.

The attacker is a plain UDP socket on another loopback host (127.0.0.66)
that sends valid-looking RTP (version 2, PCMU and PCMA, a loud 2300 Hz tone)
and RTCP to every port of the server's small RTP range, before and during
the call. The end-to-end tests run against `pbx serve` with pjsua2 phones,
or a SIP user agent on bare sockets where the test must choose the addresses
(the NAT case); what the callers hear is checked by FFT. The unit tests drive
the relay's latch rules with real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiortp import RtpPacket
from aiortp.codecs import PcmaCodec, PcmuCodec
from aiosipua import SipMessage, SipResponse

from pbx.events import EventBus
from pbx.media.codecs import PCMU
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.sip.messages import make_response
from tests.support.audio import read_samples, write_tone
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, free_udp_block, start_server, worker_index
from tests.test_calls import connect
from tests.test_media import Peer, free_range, open_peer, rtp

LOOPBACK = "127.0.0.1"
# The servers' RTP address, the one the attacker sprays: one per xdist
# worker, where no socket of a test running beside this one can be hit.
MEDIA_IP = f"127.0.77.{1 + worker_index()}"
ATTACKER_IP = "127.0.0.66"  # another host than the phones and the server
TRUNK_IP = "127.0.0.2"  # the provider of the NAT test, trusted for inbound calls
UNREACHABLE_IP = "127.0.0.3"  # what the NATed phone's SDP says: nobody listens there
RATE = 8000
ATTACK_HZ = 2300  # 46 whole periods in 20 ms: one frame repeated is a clean tone
PROMPT_HZ = 600
PROMPT_SECONDS = 2.0
RANGE_PORTS = 40
SPRAY_INTERVAL = 0.010  # one sweep of the whole range every 10 ms

# The caller hears the prompt, then 1.5 s of nothing while the menu waits for
# a key (a quiet stretch where injected audio would stand out), then is hung up.
FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 1.5, retries: 0, on_fail: hangup}
"""


# --- the attacker ---


def _tone_frame(hz: int) -> bytes:
    t = np.arange(RATE // 50) / RATE
    return (np.sin(2 * np.pi * hz * t) * 0.7 * 32767).astype("<i2").tobytes()


class Attacker(asyncio.DatagramProtocol):
    """Sprays RTP and RTCP at every port of a range and keeps what comes back."""

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.sent = 0
        self.sweeps = 0
        self.transport: asyncio.DatagramTransport
        self._swept = asyncio.Event()
        pcm = _tone_frame(ATTACK_HZ)
        self._payloads = {0: PcmuCodec().encode(pcm), 8: PcmaCodec().encode(pcm)}
        self._seq = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # a closed port answering ICMP is part of spraying

    async def spray(self) -> None:
        report = bytes([0x80, 201, 0, 1]) + (0x5EC0DE).to_bytes(4)  # an empty receiver report
        while True:
            seq = next(self._seq)
            payload_type = 0 if seq % 2 else 8
            packet = RtpPacket(
                payload_type=payload_type, sequence_number=seq & 0xFFFF, timestamp=seq * 160, ssrc=0x5EC0DE,
                payload=self._payloads[payload_type],
            ).serialize()
            for port in self.ports:
                self.transport.sendto(packet if port % 2 == 0 else report, (MEDIA_IP, port))
            self.sent += len(self.ports)
            self.sweeps += 1
            self._swept.set()
            self._swept.clear()
            await asyncio.sleep(SPRAY_INTERVAL)

    async def sweeps_more(self, count: int) -> None:
        """Return once ``count`` more sweeps of the range have been sent."""
        target = self.sweeps + count
        async with asyncio.timeout(5):
            while self.sweeps < target:
                await self._swept.wait()


@contextlib.asynccontextmanager
async def spraying(ports: range) -> AsyncIterator[Attacker]:
    """An attacker spraying ``ports`` for as long as the block runs."""
    loop = asyncio.get_running_loop()
    transport, attacker = await loop.create_datagram_endpoint(lambda: Attacker(ports), local_addr=(ATTACKER_IP, 0))
    task = loop.create_task(attacker.spray())
    try:
        await attacker.sweeps_more(3)  # the range is sprayed before the call
        yield attacker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        transport.close()


# --- audio checks ---


def tone_share(samples: npt.NDArray[np.float64], hz: float, width: float = 40.0) -> float:
    """Share of the spectral energy (above 100 Hz) within ``width`` Hz of ``hz``."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size))) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / RATE)
    total = float(spectrum[freqs > 100].sum())
    return float(spectrum[np.abs(freqs - hz) < width].sum()) / total if total else 0.0


def loud_seconds(samples: npt.NDArray[np.float64], threshold: float = 0.05) -> float:
    """Seconds of 20 ms frames whose RMS is above ``threshold`` (of full scale)."""
    frame = RATE // 50
    frames = samples[: samples.size // frame * frame].reshape(-1, frame)
    return float(np.count_nonzero(np.sqrt(np.mean(frames**2, axis=1)) > threshold)) / 50


def assert_heard_the_prompt_and_not_the_attacker(samples: npt.NDArray[np.float64], min_seconds: float) -> None:
    assert loud_seconds(samples) >= min_seconds, f"only {loud_seconds(samples):.2f}s of the prompt arrived"
    assert tone_share(samples, PROMPT_HZ) > 0.8
    assert tone_share(samples, ATTACK_HZ) < 0.01, "the attacker's tone reached the caller"


# --- end to end against `pbx serve` ---


async def hijack_server(tmp_path: Path) -> tuple[Server, range]:
    """A server with an IVR on 8000 (FLOW, its prompt a PROMPT_HZ tone), a
    trunk at TRUNK_IP and an RTP range of RANGE_PORTS ports."""
    folder = tmp_path / "pbx"
    (folder / "ivr_flows").mkdir(parents=True)
    (folder / "sounds").mkdir()
    (folder / "ivr_flows" / "main.yaml").write_text(FLOW)
    write_tone(folder / "sounds" / "tone.wav", PROMPT_HZ, PROMPT_SECONDS, amplitude=0.5)
    low = free_udp_block(RANGE_PORTS, MEDIA_IP)
    server = await start_server(
        folder,
        rtp={"ip": MEDIA_IP, "ports": [low, low + RANGE_PORTS - 1]},
        ivr={"dir": str(folder / "ivr_flows")},
        sounds={"dir": str(folder / "sounds")},
        inbound={"8000": "ivr:main"},
        trunks={"carrier": {"host": f"{TRUNK_IP}:5060", "inbound_from": [f"{TRUNK_IP}/32"]}},
    )
    return server, range(low, low + RANGE_PORTS)


def stranger_reports(server: Server) -> list[str]:
    return [line for line in server.log if "event=security kind=rtp_stranger" in line]


async def test_a_sprayed_port_range_gives_the_attacker_nothing_of_an_ivr_call(tmp_path: Path) -> None:
    server, ports = await hijack_server(tmp_path)
    try:
        async with await Phone.start(name="alice") as alice, spraying(ports) as attacker:
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            call = await alice.call("sip:8000@pbx.local")
            await alice.wait_event("media", call=call, active=True)
            await alice.record(call, tmp_path / "heard.wav")
            await alice.wait_event("call_state", call=call, state="disconnected", timeout=15)
            await alice.stop_record(call)
            sent = attacker.sent

        assert sent > 1000
        assert attacker.received == []
        samples, _ = read_samples(tmp_path / "heard.wav")
        assert_heard_the_prompt_and_not_the_attacker(samples, PROMPT_SECONDS - 0.4)
        # Thousands of packets, one report: the caller's side, once for this address.
        [report] = stranger_reports(server)
        assert f"src={ATTACKER_IP}" in report
        assert await server.metric("pbx_security_events_total", event="rtp_stranger") == 1
    finally:
        assert await server.stop() == 0


async def test_neither_phone_of_a_bridged_call_hears_or_feeds_the_attacker(tmp_path: Path) -> None:
    server, ports = await hijack_server(tmp_path)
    try:
        async with (
            await Phone.start(name="alice") as alice,
            await Phone.start(name="bob") as bob,
            spraying(ports) as attacker,
        ):
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            await bob.register(server.sip, "1002", PASSWORDS["1002"])
            a, b = await connect(alice, bob)
            await alice.play_tone(a, 440)
            await bob.play_tone(b, 1000)
            await alice.record(a, tmp_path / "alice.wav")
            await bob.record(b, tmp_path / "bob.wav")
            await attacker.sweeps_more(100)  # the recording's length: a second and more of spraying
            await alice.stop_record(a)
            await bob.stop_record(b)
            await alice.hangup(a)
            await bob.wait_event("call_state", call=b, state="disconnected")

        assert attacker.received == []
        for path, hz in (("alice.wav", 1000), ("bob.wav", 440)):
            samples, _ = read_samples(tmp_path / path)
            assert tone_share(samples, hz) > 0.8, path
            assert tone_share(samples, ATTACK_HZ) < 0.01, f"{path}: the attacker's tone got in"
        # One report per side of the call, however many packets.
        assert [line.split(" src=")[1].split()[0] for line in stranger_reports(server)] == [ATTACKER_IP] * 2
    finally:
        assert await server.stop() == 0


class TrunkCaller(asyncio.DatagramProtocol):
    """A caller from the trunk on bare sockets: its SIP comes from TRUNK_IP,
    its SDP names ``sdp_addr`` and its RTP socket is another one on TRUNK_IP,
    as a phone behind NAT looks to the server."""

    def __init__(self, server: Server) -> None:
        self.server = (LOOPBACK, server.sip_port)
        self.transport: asyncio.DatagramTransport
        self.responses: asyncio.Queue[SipResponse] = asyncio.Queue()
        self.hung_up = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = SipMessage.parse(data)
        if isinstance(message, SipResponse):
            self.responses.put_nowait(message)
        elif message.method != "ACK":
            self.transport.sendto(bytes(make_response(message, 200)), self.server)
            if message.method == "BYE":
                self.hung_up.set()

    async def call(self, number: str, sdp_addr: tuple[str, int]) -> tuple[str, int]:
        """INVITE ``number`` with an SDP naming ``sdp_addr``; ACK its 200 and
        return the RTP address its SDP names."""
        ip, port = self.transport.get_extra_info("sockname")[:2]
        host, media_port = sdp_addr
        body = (
            f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {media_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
        )
        call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
        head = [
            f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            "Max-Forwards: 70",
            f"From: <sip:+15550001@{ip}>;tag={tag}",
            f"To: <sip:{number}@pbx.local>",
            f"Call-ID: {call_id}",
        ]
        invite = "\r\n".join(
            [f"INVITE sip:{number}@pbx.local SIP/2.0", *head, "CSeq: 1 INVITE", f"Contact: <sip:carrier@{ip}:{port}>",
             "Content-Type: application/sdp", f"Content-Length: {len(body)}", "", body]
        )  # fmt: skip
        self.transport.sendto(invite.encode(), self.server)
        async with asyncio.timeout(5):
            while (response := await self.responses.get()).status_code < 200:
                pass
        assert response.status_code == 200, response.status_code
        head[0] = f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport"
        head[3] = f"To: {response.headers.get_first('to')}"
        ack = "\r\n".join([f"ACK sip:{number}@pbx.local SIP/2.0", *head, "CSeq: 1 ACK", "Content-Length: 0", "", ""])
        self.transport.sendto(ack.encode(), self.server)
        sdp = dict(line.split("=", 1) for line in response.text.splitlines() if "=" in line)
        return sdp["c"].split()[-1], int(sdp["m"].split()[1])


class RtpPhone(asyncio.DatagramProtocol):
    """The NATed phone's RTP socket: sends silence every 20 ms, keeps what arrives."""

    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []
        self.transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append(RtpPacket.parse(data))

    async def talk(self, to: tuple[str, int]) -> None:
        for seq in itertools.count(1):
            self.transport.sendto(rtp(0, seq=seq & 0xFFFF, ts=seq * 160), to)
            await asyncio.sleep(0.020)

    def heard(self) -> npt.NDArray[np.float64]:
        """What arrived, in sequence order, decoded."""
        ordered = sorted(self.packets, key=lambda p: p.sequence_number)
        pcm = PcmuCodec().decode(b"".join(p.payload for p in ordered if p.payload_type == 0))
        return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768


async def test_a_phone_behind_nat_is_latched_from_its_signalling_ip_and_a_faster_stranger_is_not(tmp_path: Path) -> None:
    server, ports = await hijack_server(tmp_path)
    loop = asyncio.get_running_loop()
    sip_transport, caller = await loop.create_datagram_endpoint(lambda: TrunkCaller(server), local_addr=(TRUNK_IP, 0))
    rtp_transport, phone = await loop.create_datagram_endpoint(RtpPhone, local_addr=(TRUNK_IP, 0))
    talking: asyncio.Task[Any] | None = None
    try:
        async with spraying(ports) as attacker:
            server_rtp = await caller.call("8000", (UNREACHABLE_IP, 40000))
            # The attacker's packets reach the answered call's port before the phone's first one.
            await attacker.sweeps_more(5)
            assert phone.packets == []  # the prompt goes where the SDP said until the phone speaks
            talking = loop.create_task(phone.talk(server_rtp))
            async with asyncio.timeout(15):
                await caller.hung_up.wait()

        assert attacker.received == []
        assert_heard_the_prompt_and_not_the_attacker(phone.heard(), PROMPT_SECONDS - 0.5)
    finally:
        if talking is not None:
            talking.cancel()
        sip_transport.close()
        rtp_transport.close()
        assert await server.stop() == 0


# --- the relay's rules, with real sockets ---


@pytest.fixture
async def pool() -> RtpPortPool:
    low, high = free_range(8)
    return RtpPortPool(LOOPBACK, low, high)


class Reports:
    """The security events a relay emits."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.events: list[dict[str, Any]] = []
        self.bus.subscribe("security", lambda **fields: self.events.append(fields))


@pytest.fixture
async def stranger() -> AsyncIterator[Peer]:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(ATTACKER_IP, 0))
    yield peer
    peer.transport.close()


@contextlib.contextmanager
def closing(*peers: Peer) -> Iterator[None]:
    try:
        yield
    finally:
        for peer in peers:
            peer.transport.close()


async def test_a_stranger_can_neither_latch_nor_listen_and_is_reported_once_per_side(pool: RtpPortPool, stranger: Peer) -> None:
    reports = Reports()
    relay = await RtpRelay.create(pool, events=reports.bus)
    a, b = await open_peer(), await open_peer()
    with closing(a, b):
        try:
            relay.a.set_remote(a.addr, PCMU, 101, LOOPBACK)
            relay.b.set_remote(b.addr, PCMU, 101, LOOPBACK)
            for seq in range(50):  # first, before either phone has said a word
                for port in (relay.a.port, relay.b.port):
                    stranger.send(rtp(0, seq=seq), port)
                    stranger.send(bytes([0x80, 201, 0, 1]) + bytes(4), port + 1)
            assert await a.nothing() and await b.nothing()

            a.send(rtp(0, seq=1), relay.a.port)
            assert RtpPacket.parse((await b.recv())[0]).sequence_number == 1
            b.send(rtp(0, seq=2), relay.b.port)
            assert RtpPacket.parse((await a.recv())[0]).sequence_number == 2
            assert await stranger.nothing()
        finally:
            relay.close()
    assert relay.a.strangers == relay.b.strangers == 100
    assert [(e["kind"], e["src"], e["side"]) for e in reports.events] == [
        ("rtp_stranger", ATTACKER_IP, "a"),
        ("rtp_stranger", ATTACKER_IP, "b"),
    ]


async def test_nothing_is_relayed_from_or_to_a_side_whose_peer_is_unknown(pool: RtpPortPool) -> None:
    reports = Reports()
    relay = await RtpRelay.create(pool, events=reports.bus)
    a, b = await open_peer(), await open_peer()
    with closing(a, b):
        try:
            relay.a.set_remote(a.addr, PCMU, None, LOOPBACK)
            b.send(rtp(0, seq=1), relay.b.port)  # the callee's side: no answer yet
            b.send(bytes([0x80, 201, 0, 1]) + bytes(4), relay.b.port + 1)
            a.send(rtp(0, seq=2), relay.a.port)
            assert await a.nothing() and await b.nothing()
        finally:
            relay.close()
    assert relay.stats()["b_to_a"]["dropped"] == 1
    assert relay.stats()["a_to_b"]["dropped"] == 1
    assert reports.events == []  # the callee's answer may have been on its way


async def test_a_phone_behind_nat_latches_once_from_its_signalling_ip_with_a_negotiated_payload_type(
    pool: RtpPortPool, stranger: Peer
) -> None:
    relay = await RtpRelay.create(pool)
    a, b_nat, b_other = await open_peer(), await open_peer(), await open_peer()
    with closing(a, b_nat, b_other):
        try:
            relay.a.set_remote(a.addr, PCMU, 101, LOOPBACK)
            relay.b.set_remote((UNREACHABLE_IP, 40000), PCMU, 101, LOOPBACK)  # SDP with the phone's LAN address

            stranger.send(rtp(0, seq=1), relay.b.port)  # the right payload type, another host
            b_nat.send(rtp(96, seq=2), relay.b.port)  # the phone's host, a payload type never negotiated
            assert await a.nothing()
            b_nat.send(rtp(101, seq=3, payload=bytes([1, 0x0A, 0, 160])), relay.b.port)  # a key press: negotiated
            assert RtpPacket.parse((await a.recv())[0]).sequence_number == 3
            a.send(rtp(0, seq=4), relay.a.port)
            assert RtpPacket.parse((await b_nat.recv())[0]).sequence_number == 4

            b_other.send(rtp(0, seq=5), relay.b.port)  # latched once: not another port of that host
            stranger.send(rtp(0, seq=6), relay.b.port)
            assert await a.nothing()
            b_nat.send(rtp(0, seq=7), relay.b.port)
            assert RtpPacket.parse((await a.recv())[0]).sequence_number == 7

            # A re-INVITE with a new address starts the learning again, under the same rules.
            relay.b.set_remote((UNREACHABLE_IP, 40002), PCMU, 101, LOOPBACK)
            b_nat.send(rtp(96, seq=8), relay.b.port)
            stranger.send(rtp(0, seq=9), relay.b.port)
            assert await a.nothing()
            b_other.send(rtp(0, seq=10), relay.b.port)
            assert RtpPacket.parse((await a.recv())[0]).sequence_number == 10
            a.send(rtp(0, seq=11), relay.a.port)
            assert RtpPacket.parse((await b_other.recv())[0]).sequence_number == 11
            assert await b_nat.nothing() and await stranger.nothing()
        finally:
            relay.close()


async def test_rtcp_is_taken_only_from_the_peers_addresses(pool: RtpPortPool, stranger: Peer) -> None:
    low, high = free_range(2)
    phones = RtpPortPool(LOOPBACK, low, high)
    a = await phones.open(Peer, Peer)
    b = await phones.open(Peer, Peer)
    relay = await RtpRelay.create(pool)
    try:
        relay.a.set_remote((LOOPBACK, a.port), PCMU, None, LOOPBACK)
        relay.b.set_remote((LOOPBACK, b.port), PCMU, None, LOOPBACK)
        report = bytes([0x81, 201, 0, 7]) + bytes(28)
        stranger.send(report, relay.a.port + 1)
        stranger.send(b"not RTCP", relay.a.port + 1)
        assert await b.rtcp_protocol.nothing()
        a.rtcp_protocol.send(report, relay.a.port + 1)
        assert (await b.rtcp_protocol.recv())[0] == report
        b.rtcp_protocol.send(report, relay.b.port + 1)
        assert (await a.rtcp_protocol.recv())[0] == report
        stranger.send(report, relay.b.port + 1)  # after the peers: still nothing
        assert await a.rtcp_protocol.nothing() and await stranger.nothing()
        assert relay.a.strangers == 2 and relay.b.strangers == 1
    finally:
        relay.close()
        a.close()
        b.close()


async def test_stranger_reports_are_rate_limited_per_side(pool: RtpPortPool, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("pbx.media.relay_side._now", lambda: now[0])
    reports = Reports()
    relay = await RtpRelay.create(pool, events=reports.bus)
    a = await open_peer()
    strangers = {ip: await _peer_on(ip) for ip in ("127.0.0.66", "127.0.0.67")}
    with closing(a, *strangers.values()):
        try:
            relay.a.set_remote(a.addr, PCMU, None, LOOPBACK)
            for _ in range(20):
                for peer in strangers.values():
                    peer.send(rtp(0), relay.a.port)
            await _until(lambda: relay.a.strangers == 40)
            now[0] += 5.0  # the side may report again, but only an address it has not reported
            for _ in range(20):
                for peer in strangers.values():
                    peer.send(rtp(0), relay.a.port)
            await _until(lambda: relay.a.strangers == 80)
        finally:
            relay.close()
    assert [e["src"] for e in reports.events] == ["127.0.0.66", "127.0.0.67"]


async def _peer_on(ip: str) -> Peer:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(ip, 0))
    return peer


async def _until(condition: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# --- ports ---


async def test_ports_are_picked_at_random_and_a_released_one_is_not_handed_back_at_once() -> None:
    low, high = free_range(50)
    pool = RtpPortPool(LOOPBACK, low, high)
    ports = []
    for _ in range(30):
        pair = await pool.open(asyncio.DatagramProtocol, asyncio.DatagramProtocol)
        ports.append(pair.port)
        pair.close()
        await asyncio.sleep(0)
    assert all(port % 2 == 0 and low <= port < high for port in ports)
    assert all(later != earlier for earlier, later in itertools.pairwise(ports))
    # In order, each port would be the last one + 2; at random, 30 draws from 50 spread out.
    assert {later - earlier for earlier, later in itertools.pairwise(ports)} != {2}
    assert len(set(ports)) >= 15
