"""End to end: SIP over TLS and SRTP with SDES keys (RFC 4568) through `pbx serve`.

pjsua2 phones register over TLS and call with SRTP; the relay decrypts with one
leg's key and encrypts with the other's (or not at all for a plain RTP leg).
A trunk over TLS is played by a small ssl server in the test, which reads the
INVITE and the RTP the server sends it off the wire: that RTP is SRTP, and only
the key the server offered turns it back into the caller's tone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pylibsrtp
import pytest

from tests.support.audio import dominant_frequency, write_tone
from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, Server, free_port, start_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # as in pbx.media.codecs
    import audioop

SOUNDS = Path(__file__).resolve().parent.parent / "config" / "sounds"


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, made now (openssl, from `make test-deps`)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


def make_certificate(folder: Path) -> Certificate:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Certificate(cert, key)


@dataclass
class TlsServer:
    server: Server
    tls_port: int

    @property
    def tls(self) -> str:
        """What a phone registers to over TLS."""
        return f"127.0.0.1:{self.tls_port}"


async def start_tls_server(folder: Path, certificate: Certificate, *, srtp: str = "optional", **overrides: object) -> TlsServer:
    udp = free_port()
    tls_port = free_port(socket.SOCK_STREAM)
    server = await start_server(
        folder,
        sip={
            "listen": [f"udp:127.0.0.1:{udp}", f"tls:127.0.0.1:{tls_port}"],
            "tls": {"cert": str(certificate.cert), "key": str(certificate.key), "ca": str(certificate.cert)},
            "ring_timeout": 10,
        },
        rtp={"srtp": srtp},
        **overrides,
    )
    # start_server picked its own UDP port for the base config; ours replaced the listen list.
    server.sip_port = udp
    return TlsServer(server, tls_port)


@pytest.fixture
async def pbx(tmp_path: Path, certificate: Certificate) -> AsyncIterator[TlsServer]:
    srv = await start_tls_server(tmp_path / "pbx", certificate)
    yield srv
    assert await srv.server.stop() == 0


async def tls_phone(pbx: TlsServer, ext: str, srtp: str = "mandatory") -> Phone:
    return await registered(await Phone.start(transport="tls", srtp=srtp, name=f"p{ext}"), pbx.tls, ext)


async def udp_phone(pbx: TlsServer, ext: str) -> Phone:
    return await registered(await Phone.start(name=f"p{ext}"), pbx.server.sip, ext)


async def registered(phone: Phone, registrar: str, ext: str) -> Phone:
    """``phone`` registered as ``ext``; stopped if it cannot register, so
    that no phone process outlives its test (the event loop's teardown
    would wait for it forever)."""
    try:
        await phone.register(registrar, ext, PASSWORDS[ext])
    except BaseException:
        await phone.close()
        raise
    return phone


async def connect(caller: Phone, callee: Phone, number: str) -> tuple[int, int, dict[str, object], dict[str, object]]:
    a = await caller.call(f"sip:{number}@pbx.local")
    incoming = await callee.wait_event("incoming")
    b = incoming["call"]
    await callee.answer(b)
    await caller.wait_event("call_state", call=a, state="confirmed")
    media_a = await caller.wait_event("media", call=a, active=True)
    media_b = await callee.wait_event("media", call=b, active=True)
    return a, b, media_a, media_b


async def test_tls_srtp_phones_register_and_hear_each_other(pbx: TlsServer, tmp_path: Path) -> None:
    async with await tls_phone(pbx, "1001") as alice, await tls_phone(pbx, "1002") as bob:
        a, b, media_a, media_b = await connect(alice, bob, "1002")
        # Both phones insist on SRTP: each got RTP/SAVP with a key it could use from the server.
        assert media_a["srtp"] and media_b["srtp"]
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        await alice.hangup(a)
        await bob.wait_event("call_state", call=b, state="disconnected")
    registrations = await pbx.server.http("/api/registrations")
    assert registrations[0] == 200


async def test_relay_decrypts_for_a_plain_udp_phone_and_encrypts_back(pbx: TlsServer, tmp_path: Path) -> None:
    async with await tls_phone(pbx, "1001") as alice, await udp_phone(pbx, "1002") as bob:
        a, b, media_a, media_b = await connect(alice, bob, "1002")
        assert media_a["srtp"] and not media_b["srtp"]  # keys only where SIP is encrypted
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        # And the other way round: the plain phone calls the SRTP one.
        await alice.hangup(a)
        await bob.wait_event("call_state", call=b, state="disconnected")
        b, a, media_b, media_a = await connect(bob, alice, "1001")
        assert media_a["srtp"] and not media_b["srtp"]
        heard_by_bob, heard_by_alice = await exchange_tones(tmp_path, bob, b, alice, a)
        assert heard_by_bob == pytest.approx(1000, abs=15)
        assert heard_by_alice == pytest.approx(440, abs=15)


async def test_tls_phone_without_srtp_is_offered_plain_rtp_after_its_488(pbx: TlsServer, tmp_path: Path) -> None:
    async with await tls_phone(pbx, "1001") as alice, await tls_phone(pbx, "1002", srtp="off") as bob:
        a, b, media_a, media_b = await connect(alice, bob, "1002")
        assert media_a["srtp"] and not media_b["srtp"]
        await pbx.server.wait_log(r"sip:1002@127\.0\.0\.1:\d+;transport=TLS.* refused our offer \(488\); offering it again without SRTP")
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)


async def test_ivr_prompt_reaches_an_srtp_caller(tmp_path: Path, certificate: Certificate) -> None:
    folder = tmp_path / "pbx"
    sounds = tmp_path / "sounds"
    shutil.copytree(SOUNDS, sounds)
    write_tone(sounds / "tone.wav", 700, 4.0)
    (folder / "ivr_flows").mkdir(parents=True)
    (folder / "ivr_flows" / "main.yaml").write_text("start: p\nnodes:\n  p: {type: play, prompt: tone, next: hangup}\n")
    srv = await start_tls_server(
        folder, certificate, ivr={"dir": str(folder / "ivr_flows")}, sounds={"dir": str(sounds)}, inbound={"8000": "ivr:main"}
    )
    try:
        async with await tls_phone(srv, "1001") as alice:
            call = await alice.call("sip:8000@pbx.local")
            await alice.wait_event("call_state", call=call, state="confirmed")
            media = await alice.wait_event("media", call=call, active=True)
            assert media["srtp"]
            await alice.record(call, tmp_path / "prompt.wav")
            await asyncio.sleep(2.0)  # the recording's length, not synchronisation
            await alice.stop_record(call)
        assert dominant_frequency(tmp_path / "prompt.wav") == pytest.approx(700, abs=15)
    finally:
        assert await srv.server.stop() == 0


async def test_mandatory_server_answers_a_plain_offer_with_488(tmp_path: Path, certificate: Certificate) -> None:
    srv = await start_tls_server(tmp_path / "pbx", certificate, srtp="mandatory")
    try:
        async with await udp_phone(srv, "1001") as plain, await tls_phone(srv, "1002") as secure:
            call = await plain.call("sip:1002@pbx.local")
            ended = await plain.wait_event("call_state", call=call, state="disconnected")
            assert ended["code"] == 488
            await srv.server.wait_log(r"event=refused status=488 .*rtp.srtp is mandatory")
            # An SRTP caller gets through, and the server offers the callee SRTP only.
            await plain.close()
            async with await tls_phone(srv, "1003") as carol:
                a, b, media_a, media_b = await connect(carol, secure, "1002")
                assert media_a["srtp"] and media_b["srtp"]
    finally:
        assert await srv.server.stop() == 0


async def test_server_with_srtp_off_answers_an_srtp_only_offer_with_488(tmp_path: Path, certificate: Certificate) -> None:
    srv = await start_tls_server(tmp_path / "pbx", certificate, srtp="off")
    try:
        async with await tls_phone(srv, "1001") as secure:
            call = await secure.call("sip:1002@pbx.local")
            ended = await secure.wait_event("call_state", call=call, state="disconnected")
            assert ended["code"] == 488
    finally:
        assert await srv.server.stop() == 0


# --- a trunk over TLS, played by the test ---------------------------------------


class TlsTrunk:
    """A provider reached over TLS: answers one INVITE with SRTP and keeps its RTP."""

    def __init__(self, certificate: Certificate) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificate.cert, certificate.key)
        self.invite: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.register: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp.setblocking(False)
        self.key = os.urandom(30)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.rtp.close()
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(re.search(r"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)[1])  # type: ignore[index]
                body = (await reader.readexactly(length)).decode() if length else ""
                method = head.split(" ", 1)[0]
                if method == "INVITE":
                    if not self.invite.done():
                        self.invite.set_result(head + body)
                    writer.write(self._response(head, self._answer()))
                elif method == "REGISTER":
                    if not self.register.done():
                        self.register.set_result(head)
                    writer.write(self._response(head, None, "Expires: 300"))
                elif method in ("BYE", "CANCEL", "OPTIONS"):
                    writer.write(self._response(head, None))

    def _answer(self) -> str:
        port = self.rtp.getsockname()[1]
        crypto = f"1 AES_CM_128_HMAC_SHA1_80 inline:{base64.b64encode(self.key).decode()}"
        return (
            "v=0\r\no=trunk 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"a=crypto:{crypto}\r\na=sendrecv\r\n"
        )

    def _response(self, request: str, sdp: str | None, *extra: str) -> bytes:
        lines = [line for line in request.split("\r\n") if line]
        keep = [line for line in lines[1:] if line.split(":", 1)[0].strip().lower() in ("via", "v", "from", "f", "call-id", "i", "cseq")]
        to = next(line for line in lines if line.lower().startswith(("to:", "t:")))
        if ";tag=" not in to:
            to += ";tag=trunk1"
        head = ["SIP/2.0 200 OK", *keep, to, f"Contact: <sip:trunk@127.0.0.1:{self.port};transport=tls>", *extra]
        body = sdp or ""
        if sdp:
            head.append("Content-Type: application/sdp")
        head.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


def sdp_of(message: str) -> str:
    return message.split("\r\n\r\n", 1)[1]


async def receive_rtp(sock: socket.socket, seconds: float) -> list[bytes]:
    loop = asyncio.get_running_loop()
    packets: list[bytes] = []
    deadline = loop.time() + seconds
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            while True:
                packets.append(await loop.sock_recv(sock, 2048))
    return packets


def tone_share(pcm: bytes, freq: float) -> float:
    """The share of the signal's energy within 25 Hz of ``freq``: near 1 for
    that tone, near 0.01 for noise (or ciphertext read as G.711)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    power = np.abs(np.fft.rfft((samples - samples.mean()) * np.hanning(samples.size))) ** 2
    hz = np.fft.rfftfreq(samples.size, 1 / 8000)
    return float(power[np.abs(hz - freq) <= 25].sum() / power.sum())


async def send_srtp_tone(sock: socket.socket, key: bytes, dest: tuple[str, int], freq: float, seconds: float) -> None:
    """A PCMU tone as SRTP under ``key``, one 20 ms packet per 20 ms."""
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    ssrc, seq, ts = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
    t = np.arange(160) / 8000
    start = time.monotonic()
    for n in range(int(seconds * 50)):
        pcm = np.round(12000 * np.sin(2 * np.pi * freq * (t + n * 0.02))).astype("<i2").tobytes()
        packet = struct.pack("!BBHII", 0x80, 0, (seq + n) & 0xFFFF, (ts + 160 * n) & 0xFFFFFFFF, ssrc) + audioop.lin2ulaw(pcm, 2)
        sock.sendto(tx.protect(packet), dest)
        await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))


async def test_outbound_call_to_a_tls_trunk_is_tls_and_srtp_on_the_wire(tmp_path: Path, certificate: Certificate) -> None:
    trunk = TlsTrunk(certificate)
    await trunk.start()
    srv = await start_tls_server(
        tmp_path / "pbx",
        certificate,
        trunks={"carrier": {"host": f"127.0.0.1:{trunk.port};transport=tls"}},
        outbound=[{"match": r"^\+1[0-9]{10}$", "trunk": "carrier"}],
    )
    try:
        async with await udp_phone(srv, "1001") as alice:
            call = await alice.call("sip:+15551230000@pbx.local")
            invite = await asyncio.wait_for(trunk.invite, 10)
            # The INVITE came over TLS (the server checked our certificate against sip.tls.ca) ...
            request_line, via = invite.split("\r\n")[0], re.search(r"(?im)^via:\s*(.*)$", invite)[1]  # type: ignore[index]
            assert request_line.startswith("INVITE sip:+15551230000@127.0.0.1:") and ";transport=tls" in request_line
            assert via.startswith("SIP/2.0/TLS ")
            # ... and offers SRTP although the caller's leg is plain UDP.
            offer = sdp_of(invite)
            assert re.search(r"(?m)^m=audio \d+ RTP/SAVP ", offer)
            crypto = re.search(r"(?m)^a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:([A-Za-z0-9+/=]+)", offer)
            assert crypto is not None
            server_key = base64.b64decode(crypto[1])
            server_rtp = ("127.0.0.1", int(re.search(r"(?m)^m=audio (\d+) ", offer)[1]))  # type: ignore[index]

            await alice.wait_event("call_state", call=call, state="confirmed")
            await alice.wait_event("media", call=call, active=True)
            await alice.play_tone(call, 440)
            await alice.record(call, tmp_path / "alice.wav")
            sending = asyncio.create_task(send_srtp_tone(trunk.rtp, trunk.key, server_rtp, 1000, 2.5))
            packets = await receive_rtp(trunk.rtp, 2.0)
            await sending
            await alice.stop_record(call)
            await alice.hangup(call)

        audio = [p for p in packets if len(p) > 12 and p[1] & 0x7F == 0]
        assert len(audio) > 50, f"only {len(audio)} RTP packets reached the trunk"
        # On the wire: each packet carries a 10-byte auth tag, and its payload is not the tone.
        assert all(len(p) == 12 + 160 + 10 for p in audio)
        wire = b"".join(audioop.ulaw2lin(p[12:172], 2) for p in audio[-50:])
        assert tone_share(wire, 440) < 0.1, "the trunk leg's RTP is plain G.711"
        # With the key the server offered, it is the caller's tone.
        rx = pylibsrtp.Session(pylibsrtp.Policy(key=server_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
        plain = b"".join(audioop.ulaw2lin(rx.unprotect(p)[12:], 2) for p in audio)
        assert tone_share(plain[-8000 * 2 :], 440) > 0.5
        # And the trunk's SRTP, decrypted with its key, reached the plain caller.
        assert dominant_frequency(tmp_path / "alice.wav") == pytest.approx(1000, abs=15)
    finally:
        assert await srv.server.stop() == 0
        await trunk.close()


async def test_trunk_with_a_certificate_nobody_vouches_for_gets_no_call(tmp_path: Path, certificate: Certificate) -> None:
    # A man in the middle with a self-signed certificate for the right address.
    impostor = TlsTrunk(make_certificate(tmp_path))
    await impostor.start()
    srv = await start_tls_server(
        tmp_path / "pbx",
        certificate,
        trunks={"carrier": {"host": f"127.0.0.1:{impostor.port};transport=tls"}},
        outbound=[{"match": r"^\+1[0-9]{10}$", "trunk": "carrier"}],
    )
    try:
        async with await udp_phone(srv, "1001") as alice:
            call = await alice.call("sip:+15551230000@pbx.local")
            ended = await alice.wait_event("call_state", call=call, state="disconnected")
            assert ended["code"] == 503
            await srv.server.wait_log(r"trunk carrier at 127\.0\.0\.1:\d+ over tls is unreachable: .*CERTIFICATE_VERIFY_FAILED")
        assert not impostor.invite.done()
    finally:
        assert await srv.server.stop() == 0
        await impostor.close()


async def test_trunk_registers_over_tls(tmp_path: Path, certificate: Certificate) -> None:
    trunk = TlsTrunk(certificate)
    await trunk.start()
    register = {"username": "acct", "password": "acct-secret", "expires": 300}
    srv = await start_tls_server(
        tmp_path / "pbx", certificate, trunks={"carrier": {"host": f"127.0.0.1:{trunk.port};transport=tls", "register": register}}
    )
    try:
        head = await asyncio.wait_for(trunk.register, 10)
        assert head.startswith(f"REGISTER sip:127.0.0.1:{trunk.port};transport=tls SIP/2.0")
        assert re.search(r"(?im)^via:\s*SIP/2\.0/TLS ", head)
        assert re.search(rf"(?im)^contact:\s*<sip:acct@127\.0\.0\.1:{srv.tls_port};transport=tls>", head)
        await srv.server.wait_log(r"trunk carrier: registered")
    finally:
        assert await srv.server.stop() == 0
        await trunk.close()


# --- the TLS port under attack ---------------------------------------------------


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def test_tls_handshakes_are_timed_and_capped_like_tcp_connections(
    tmp_path: Path, certificate: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PBX_SIP_TCP_READ_TIMEOUT", "2")
    srv = await start_tls_server(tmp_path / "pbx", certificate)
    loop = asyncio.get_running_loop()
    opened: list[asyncio.StreamWriter] = []
    try:
        # Connections that never finish their handshake hold their slots: the
        # per-address cap (32) refuses the next one while they do ...
        held = [await asyncio.open_connection("127.0.0.1", srv.tls_port) for _ in range(32)]
        opened += [writer for _, writer in held]
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.tls_port)
        opened.append(writer)
        assert await closed_by_server(reader, 1.0)
        await srv.server.wait_log(r"event=security kind=connection_refused src=127\.0\.0\.1")
        # ... and each is dropped once the read timeout has run out.
        start = loop.time()
        assert all(await asyncio.gather(*(closed_by_server(r, 4.0) for r, _ in held)))
        assert loop.time() - start < 3.5
        await srv.server.wait_log(r"closing TLS connection from 127\.0\.0\.1:\d+: no handshake")
        # Plain SIP on the TLS port is no handshake either; a real TLS client still gets in.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.tls_port)
        opened.append(writer)
        writer.write(b"OPTIONS sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKplain\r\n\r\n")
        assert await closed_by_server(reader, 3.5)
        async with await tls_phone(srv, "1001") as alice:
            assert alice.sip_port
    finally:
        for writer in opened:
            writer.close()
        assert await srv.server.stop() == 0
