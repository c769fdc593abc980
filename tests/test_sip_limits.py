"""Bounded resources at the SIP edge, attacked for real on loopback: TCP
connections over the per-address cap, idle and half-sent connections, a peer
that never reads its responses, absurdly long headers, a spoofable INVITE
fishing for retransmitted challenges, and request handlers that fail."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from aiosipua import SipDigestAuth, SipMessage, SipRequest, SipResponse, build_credentials, parse_auth, stringify_auth

from pbx.app import Pbx, load_setup
from pbx.events import EventBus
from pbx.sip import transactions as transactions_module
from pbx.sip.stack import SipStack
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow
from pbx.security import address_key
from pbx.sip.tcp import MAX_CONNECTIONS_PER_ADDRESS, MAX_WRITE_BUFFER, BoundedTcp
from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, Server, base_config, free_port, start_server
from tests.test_calls import connect, phone
from tests.test_hostile_input import options, raw_udp, register

ATTACKER = "127.0.0.7"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx")
    yield srv
    assert await srv.stop() == 0


async def open_tcp(server: Server, source: str = ATTACKER) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.sip_port, local_addr=(source, 0))


async def tcp_options(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, extra: str = "") -> SipResponse:
    """Send one OPTIONS on the connection and read its response."""
    ip, port = writer.get_extra_info("sockname")
    writer.write(options(ip, port, extra=extra).replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    msg = SipMessage.parse(head + await reader.readexactly(length))
    assert isinstance(msg, SipResponse)
    return msg


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes (or resets) the connection within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def invite(ip: str, port: int, branch: str) -> bytes:
    body = "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    sdp = body.format(ip=ip)
    return (
        "INVITE sip:1002@pbx.local SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ip}:{port};branch={branch};rport\r\n"
        "From: <sip:1001@pbx.local>;tag=spoofed\r\nTo: <sip:1002@pbx.local>\r\n"
        f"Call-ID: {branch}\r\nCSeq: 1 INVITE\r\nContact: <sip:1001@{ip}:{port}>\r\n"
        f"Max-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


def vm_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


async def test_connections_over_the_cap_and_huge_headers_are_refused_while_a_call_goes_on(server: Server, tmp_path: Path) -> None:
    async with await phone(server, "1001", "tcp") as alice, await phone(server, "1002") as bob:
        a, b = await connect(alice, bob)
        held = [await open_tcp(server) for _ in range(MAX_CONNECTIONS_PER_ADDRESS)]
        refused = [await open_tcp(server) for _ in range(10)]
        try:
            for reader, _ in refused:
                assert await closed_by_server(reader, 2)
            # The connections within the cap are served, and one line tells of ten refusals.
            assert (await tcp_options(*held[-1])).status_code == 200
            line = await server.wait_log(rf"event=security kind=connection_refused src={re.escape(ATTACKER)}")
            assert "limit=per_address" in line
            assert await server.metric("pbx_security_events_total", event="connection_refused") == 1
            # Another address still gets in: a phone registers over TCP meanwhile.
            async with await Phone.start(transport="tcp", name="carol") as carol:
                assert await carol.register(server.sip, "1003", PASSWORDS["1003"]) == 200

            # A header line past 8 KB: 400 over TCP, the connection goes on; one
            # past the 64 KB header section cannot be framed: the connection is closed.
            reader, writer = held[0]
            response = await tcp_options(reader, writer, extra=f"X-Filler: {'a' * 10000}\r\n")
            assert (response.status_code, response.reason_phrase) == (400, "Header Too Long")
            assert (await tcp_options(reader, writer)).status_code == 200
            writer.write(b"OPTIONS sip:pbx.local SIP/2.0\r\nX-Filler: " + b"b" * 100_000 + b"\r\n\r\n")
            assert await closed_by_server(reader, 5)
        finally:
            for _, writer in held + refused:
                writer.close()

        # Over UDP: 400 for a long header, silence when it is one a 400 would copy back.
        transport, peer = await raw_udp(ATTACKER, server)
        ip, port = transport.get_extra_info("sockname")
        try:
            transport.sendto(options(ip, port, extra=f"X-Filler: {'c' * 60000}\r\n"))
            assert (await peer.reply()).status_code == 400
            transport.sendto(options(ip, port).replace(b"From: <sip:probe@pbx.local>", b"From: <sip:" + b"d" * 60000 + b"@pbx.local>"))
            transport.sendto(options(ip, port))
            assert (await peer.reply()).status_code == 200
            assert peer.received.empty()
        finally:
            transport.close()

        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)


async def test_idle_and_half_sent_connections_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIP_TCP_IDLE_TIMEOUT", "3")
    monkeypatch.setenv("PBX_SIP_TCP_READ_TIMEOUT", "1")
    server = await start_server(tmp_path / "pbx")
    loop = asyncio.get_running_loop()
    try:
        idle, half, pinging = [await open_tcp(server) for _ in range(3)]
        start = loop.time()
        half[1].write(b"OPTIONS sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.7:5060;branch=z9hG4bKhalf\r\n")
        assert await closed_by_server(half[0], 2.5)
        assert 0.8 < loop.time() - start < 2.5
        await server.wait_log(r"closing TCP connection from 127\.0\.0\.7:\d+: message not completed for 1 s")

        # RFC 5626 keep-alives are activity: each ping gets its pong, the connection stays.
        for _ in range(8):
            pinging[1].write(b"\r\n\r\n")
            assert await asyncio.wait_for(pinging[0].readexactly(2), 2) == b"\r\n"
            await asyncio.sleep(0.5)  # the pace of the pings is the point of this test
        assert loop.time() - start > 4
        assert await closed_by_server(idle[0], 0.1) is True  # idle since the start: closed after 3 s
        assert await closed_by_server(pinging[0], 1.0) is False
        assert await closed_by_server(pinging[0], 4.0) is True
        await server.wait_log(r"closing TCP connection from 127\.0\.0\.7:\d+: idle for 3 s")
        for _, writer in (idle, half, pinging):
            writer.close()
    finally:
        assert await server.stop() == 0


async def test_a_peer_that_never_reads_its_responses_is_dropped_before_memory_grows(server: Server) -> None:
    assert server.proc.pid is not None
    before = vm_rss_kb(server.proc.pid)
    ip = ATTACKER
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((ip, 0))
    sock.connect(("127.0.0.1", server.sip_port))
    port = sock.getsockname()[1]
    # 25 MB of requests: kept, their answers would be more. The server gets
    # through about a thousand of them (a 64 KB kernel send buffer and the
    # 256 KB write buffer take their answers) before it lets go.
    requests = b"".join(options(ip, port).replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP") for _ in range(100_000))
    try:
        # The kernel's buffers take in megabytes before the server reads them, so
        # the reset may come while sending or after: wait for the server's word.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await asyncio.wait_for(asyncio.to_thread(sock.sendall, requests), 60)
        await server.wait_log(rf"closing TCP connection from {re.escape(ip)}:\d+: \d+ bytes unsent \(limit {MAX_WRITE_BUFFER}\)", 60)
    finally:
        sock.close()
    grown_mb = (vm_rss_kb(server.proc.pid) - before) / 1024
    # Measured: 5 MB, the high-water mark of those transactions, whatever the
    # flood's size (15-33 MB before the kernel's send buffer was bounded).
    assert grown_mb < 12, f"server grew by {grown_mb:.1f} MB"
    transport, peer = await raw_udp("127.0.0.8", server)
    try:
        transport.sendto(options(*transport.get_extra_info("sockname")))
        assert (await peer.reply()).status_code == 200
    finally:
        transport.close()


async def test_an_unauthenticated_invite_draws_one_challenge_per_datagram(server: Server) -> None:
    transport, attacker = await raw_udp(ATTACKER, server)
    ip, port = transport.get_extra_info("sockname")
    branch = f"z9hG4bK{uuid.uuid4().hex}"
    try:
        transport.sendto(invite(ip, port, branch))
        await asyncio.sleep(4)  # absence of retransmissions: Timer G would have fired at 0.5, 1.5 and 3.5 s
        answers = [SipMessage.parse(attacker.received.get_nowait()) for _ in range(attacker.received.qsize())]
        assert [m.status_code for m in answers if isinstance(m, SipResponse)] == [401]
        assert len(answers) == 1
        # A retransmitted INVITE (the phone lost the 401) gets it again, one for one.
        transport.sendto(invite(ip, port, branch))
        assert (await attacker.reply()).status_code == 401
        await asyncio.sleep(1)
        assert attacker.received.empty()
    finally:
        transport.close()


async def test_a_register_with_an_absurd_expires_is_answered(server: Server) -> None:
    transport, peer = await raw_udp(ATTACKER, server)
    ip, port = transport.get_extra_info("sockname")
    call_id = uuid.uuid4().hex
    try:
        transport.sendto(register(ip, port, "1001", call_id, 1))
        challenge = await peer.reply()
        assert challenge.status_code == 401
        md5 = next(v for v in challenge.headers.get("www-authenticate") if "MD5" in v)
        creds = build_credentials(SipDigestAuth("1001", PASSWORDS["1001"]), parse_auth(md5), "REGISTER", "sip:pbx.local")
        assert creds is not None
        absurd = register(ip, port, "1001", call_id, 2, stringify_auth(creds)).replace(b"Expires: 60", b"Expires: " + b"9" * 5000)
        transport.sendto(absurd)
        # Refused or failed, but answered: before, the registrar raised and the transaction hung.
        assert (await peer.reply(timeout=3)).status_code >= 400
    finally:
        transport.close()


# --- in-process: the stack with handlers that fail ---


async def stack_answering(handler: Callable[[SipRequest, Flow, ServerTransaction], None]) -> tuple[SipStack, int]:
    stack = SipStack(events=EventBus(), advertised_host="127.0.0.1", user_agent="test")
    stack.on_request = handler
    transport = await stack.listen("udp", "127.0.0.1", 0)
    return stack, stack.local_port(transport)


async def ask(port: int, request: Callable[[str, int], bytes], timeout: float = 2.0) -> SipResponse:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(request(*transport.get_extra_info("sockname")))
        while True:
            msg = SipMessage.parse(await asyncio.wait_for(received.get(), timeout))
            assert isinstance(msg, SipResponse)
            if msg.status_code >= 200:
                return msg
    finally:
        transport.close()


def raises(request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
    raise RuntimeError("handler bug")


async def failing(txn: ServerTransaction) -> None:
    await asyncio.sleep(0.01)
    raise ValueError("handler bug in a task")


@pytest.mark.parametrize(
    "make_request",
    [options, lambda ip, port: invite(ip, port, f"z9hG4bK{uuid.uuid4().hex}")],
    ids=["OPTIONS", "INVITE"],
)
async def test_a_handler_that_raises_ends_its_transaction_with_500(make_request: Callable[[str, int], bytes]) -> None:
    stack, port = await stack_answering(raises)
    try:
        assert (await ask(port, make_request)).status_code == 500
    finally:
        await stack.close()


async def test_a_handler_task_that_raises_ends_its_transaction_with_500() -> None:
    stack: SipStack

    def spawns(request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        stack.spawn(txn, failing(txn))

    stack, port = await stack_answering(spawns)
    try:
        assert (await ask(port, options)).status_code == 500
    finally:
        await stack.close()


async def test_a_request_no_handler_answers_gets_500_once_its_client_gave_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transactions_module, "TIMER_B", 0.5)
    stack, port = await stack_answering(lambda request, flow, txn: None)
    try:
        assert (await ask(port, options)).status_code == 500
        assert not stack._server  # the transaction is gone, not absorbing retransmissions forever
    finally:
        await stack.close()


async def test_connections_over_the_total_cap_are_refused_from_any_address() -> None:
    events = EventBus()
    refusals: list[dict[str, object]] = []
    events.subscribe("security", lambda **fields: refusals.append(fields))
    stack = SipStack(events=events, advertised_host="127.0.0.1", user_agent="test")
    transport = await stack.listen("tcp", "127.0.0.1", 0)
    assert isinstance(transport, BoundedTcp)
    transport.max_connections = 2
    port = stack.local_port(transport)
    try:
        opened = [await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{n}", 0)) for n in (11, 12, 13, 13)]
        assert await closed_by_server(opened[2][0], 2) and await closed_by_server(opened[3][0], 2)
        assert not await closed_by_server(opened[0][0], 0.2)
        # One line for the first refusal of an address; the next is folded into its next line.
        assert refusals == [{"kind": "connection_refused", "src": "127.0.0.13", "limit": "total", "refused": 1}]
        for _, writer in opened:
            writer.close()
    finally:
        await stack.close()


def test_an_ipv6_slash_64_counts_as_one_address() -> None:
    assert address_key("2001:db8:1:2::a") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::a") != address_key("2001:db8:1:2::a")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"


async def test_a_call_whose_own_task_fails_gets_500_and_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the call application (here: destination dispatch raising)
    ends the call with a 500 to the caller, not with an INVITE left ringing."""
    folder = tmp_path / "pbx"
    (folder / "ivr_flows").mkdir(parents=True)
    sip_port = free_port()
    cfg = base_config(sip_port, free_port(socket.SOCK_STREAM), folder)
    cfg["sounds"] = {"dir": str(Path(__file__).parents[1] / "config" / "sounds"), "tts": None}
    cfg["ivr"] = {"dir": str(folder / "ivr_flows")}
    cfg["trunks"] = {"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.1/32"]}}
    cfg["inbound"] = {"1002": "extension:1002"}
    path = folder / "pbx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pbx = Pbx(*load_setup(path))

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the call's task")

    monkeypatch.setattr(pbx.calls, "_go", broken)
    await pbx.start()
    try:
        response = await ask(sip_port, lambda ip, port: invite(ip, port, f"z9hG4bK{uuid.uuid4().hex}"))
        assert response.status_code == 500
        assert not pbx.calls.calls
    finally:
        await pbx.stop()
