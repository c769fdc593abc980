"""Malformed and hostile SIP while a real call is up: the server answers or drops
it, the call keeps its audio, and an address that floods wrong passwords is banned."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiosipua import SipDigestAuth, SipMessage, SipResponse, build_credentials, parse_auth, stringify_auth

from tests.support.phone import exchange_tones
from tests.support.server import Server, start_server
from tests.test_calls import connect, phone


class RawUdp(asyncio.DatagramProtocol):
    """A bare UDP socket that sends raw bytes and queues what comes back."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)

    async def reply(self, timeout: float = 2.0) -> SipResponse:
        msg = SipMessage.parse(await asyncio.wait_for(self.received.get(), timeout))
        assert isinstance(msg, SipResponse)
        return msg


async def raw_udp(local_ip: str, server: Server) -> tuple[asyncio.DatagramTransport, RawUdp]:
    return await asyncio.get_running_loop().create_datagram_endpoint(
        RawUdp, local_addr=(local_ip, 0), remote_addr=("127.0.0.1", server.sip_port)
    )


def register(ip: str, port: int, user: str, call_id: str, cseq: int, auth: str | None = None) -> bytes:
    lines = [
        "REGISTER sip:pbx.local SIP/2.0",
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
        f"From: <sip:{user}@pbx.local>;tag=attacker",
        f"To: <sip:{user}@pbx.local>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:{user}@{ip}:{port}>",
        "Max-Forwards: 70",
        "Expires: 60",
    ]
    if auth:
        lines.append(f"Authorization: {auth}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def options(ip: str, port: int, extra: str = "", cseq: str = "1 OPTIONS", content_length: str = "0", body: str = "") -> bytes:
    return (
        "OPTIONS sip:pbx.local SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
        "From: <sip:probe@pbx.local>;tag=1\r\nTo: <sip:pbx.local>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: {cseq}\r\n{extra}"
        f"Content-Length: {content_length}\r\n\r\n{body}"
    ).encode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx")
    yield srv
    assert await srv.stop() == 0


async def test_malformed_messages_are_answered_or_dropped_while_a_call_goes_on(server: Server, tmp_path: Path) -> None:
    async with await phone(server, "1001") as alice, await phone(server, "1002") as bob:
        a, b = await connect(alice, bob)
        transport, peer = await raw_udp("127.0.0.5", server)
        ip, port = transport.get_extra_info("sockname")
        try:
            # Garbage and a truncated request line: dropped without an answer.
            for junk in (b"\x00\xff" * 300, b"INVITE sip:1002@pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.5:5"):
                transport.sendto(junk)
            # Mandatory header missing (no Call-ID), a malformed CSeq: 400.
            transport.sendto(options(ip, port).replace(b"Call-ID", b"X-Call-ID"))
            assert (await peer.reply()).status_code == 400
            transport.sendto(options(ip, port, cseq="banana"))
            assert (await peer.reply()).status_code == 400
            # A huge header and lying Content-Lengths: still a well-formed answer.
            transport.sendto(options(ip, port, extra=f"X-Filler: {'a' * 40000}\r\n"))
            assert (await peer.reply()).status_code in (200, 400, 413)
            transport.sendto(options(ip, port, content_length="9999", body="short"))
            assert (await peer.reply()).status_code in (200, 400)
            transport.sendto(options(ip, port, content_length="-7"))
            assert (await peer.reply()).status_code in (200, 400)
            assert peer.received.empty()
        finally:
            transport.close()

        # Over TCP: a header section past the limit closes that connection only.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sip_port)
        writer.write(b"OPTIONS sip:pbx.local SIP/2.0\r\nX-Filler: " + b"b" * 70000 + b"\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        assert await server.metric("pbx_active_calls") == 1


async def test_flood_of_wrong_passwords_bans_the_address_but_not_others(server: Server) -> None:
    transport, attacker = await raw_udp("127.0.0.3", server)
    ip, port = transport.get_extra_info("sockname")
    call_id = uuid.uuid4().hex
    try:
        for cseq in range(1, 11):
            transport.sendto(register(ip, port, "1001", call_id, 2 * cseq - 1))
            challenge = await attacker.reply()
            assert challenge.status_code == 401
            md5 = next(v for v in challenge.headers.get("www-authenticate") if "MD5" in v)
            creds = build_credentials(SipDigestAuth("1001", "guessed-wrong"), parse_auth(md5), "REGISTER", "sip:pbx.local")
            assert creds is not None
            transport.sendto(register(ip, port, "1001", call_id, 2 * cseq, stringify_auth(creds)))
            assert (await attacker.reply()).status_code == 403
        await server.wait_log(r"blocking 127\.0\.0\.3 for 600 s after 10 failed authentications")
        transport.sendto(register(ip, port, "1001", call_id, 100))
        with pytest.raises(TimeoutError):
            await attacker.reply(timeout=1.0)
    finally:
        transport.close()
    assert await server.metric("pbx_auth_failures_total") == 10

    transport, neighbour = await raw_udp("127.0.0.4", server)
    ip, port = transport.get_extra_info("sockname")
    try:
        transport.sendto(register(ip, port, "1002", uuid.uuid4().hex, 1))
        assert (await neighbour.reply()).status_code == 401
    finally:
        transport.close()
