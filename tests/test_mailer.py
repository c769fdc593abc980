"""Voicemail e-mail against a real SMTP server (aiosmtpd on loopback): what
arrives, and how a refused, silent or absent server is reported."""

from __future__ import annotations

import asyncio
import socket
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from aiosmtpd.smtp import SMTP as SMTPServer

from pbx.config.model import SmtpConfig
from pbx.voicemail.mailer import MailError, send_voicemail
from tests.support.server import free_port
from tests.support.smtp import SmtpServer, start_smtp

SENDER = "pbx@example.org"
TO = "alice@example.org"


@pytest.fixture
def smtpd() -> Iterator[SmtpServer]:
    """A plain SMTP server: no STARTTLS, no AUTH."""
    yield from start_smtp()


def _login(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"pbx", b"right-password")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers the 535 itself


@pytest.fixture
def smtpd_auth() -> Iterator[SmtpServer]:
    """An SMTP server that wants a login (allowed without TLS, this being loopback)."""
    yield from start_smtp(authenticator=_login, auth_required=True, auth_require_tls=False)


def config(port: int, *, starttls: bool = False, username: str | None = None, password: str | None = None) -> SmtpConfig:
    return SmtpConfig("127.0.0.1", port, username, password, SENDER, starttls)


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "msg0001.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(range(256)) * 64)  # every byte value, so any mangling shows
    return path


async def send(smtp: SmtpConfig, wav: Path, *, to: str = TO, caller: str = "+15550100", timeout: float = 5) -> None:
    await send_voicemail(
        smtp, to, mailbox="1001", caller=caller, received="2025-03-04 10:15", seconds=12.4, wav=wav, timeout=timeout
    )


async def test_voicemail_arrives_with_headers_body_and_intact_wav(smtpd: SmtpServer, wav: Path) -> None:
    await send(config(smtpd.port, starttls=False), wav)

    envelope = smtpd.mailbox.received[0] if smtpd.mailbox.received else None
    assert envelope is not None and envelope.mail_from == SENDER and envelope.rcpt_tos == [TO]
    message = smtpd.mailbox.only_message()
    assert message["From"] == SENDER
    assert message["To"] == TO
    assert message["Subject"] == "New voicemail from +15550100 in mailbox 1001 (12 s)"
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "+15550100" in text and "2025-03-04 10:15" in text and "12 s" in text
    attachments = list(message.iter_attachments())
    assert len(attachments) == 1
    (attachment,) = attachments
    assert attachment.get_content_type() == "audio/wav"
    assert attachment.get_filename() == "msg0001.wav"
    assert attachment.get_payload(decode=True) == wav.read_bytes()


async def test_starttls_required_but_not_offered_fails_without_sending(smtpd: SmtpServer, wav: Path) -> None:
    with pytest.raises(MailError, match="STARTTLS"):
        await send(config(smtpd.port, starttls=True), wav)
    assert smtpd.mailbox.received == []


async def test_closed_port_fails_quickly(wav: Path) -> None:
    port = free_port(socket.SOCK_STREAM)  # nothing listens there
    started = time.monotonic()
    with pytest.raises(MailError, match=f"127.0.0.1:{port}"):
        await send(config(port), wav, timeout=10)
    assert time.monotonic() - started < 2


async def test_refused_recipient_fails_naming_it(smtpd: SmtpServer, wav: Path) -> None:
    smtpd.mailbox.refuse.add("nobody@example.org")
    with pytest.raises(MailError, match=r"nobody@example\.org.*550"):
        await send(config(smtpd.port), wav, to="nobody@example.org")
    assert smtpd.mailbox.received == []


async def test_silent_server_times_out(wav: Path) -> None:
    # Accepts the connection and never greets.
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(MailError, match="within 0.5 s"):
            await send(config(port), wav, timeout=0.5)
        assert time.monotonic() - started < 2
        assert connections, "the client never connected"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_login_with_username_and_password(smtpd_auth: SmtpServer, wav: Path) -> None:
    await send(config(smtpd_auth.port, username="pbx", password="right-password"), wav)
    assert smtpd_auth.mailbox.only_message()["To"] == TO


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_wrong_password_fails_as_login_error(smtpd_auth: SmtpServer, wav: Path) -> None:
    with pytest.raises(MailError, match="login of pbx"):
        await send(config(smtpd_auth.port, username="pbx", password="wrong-password"), wav)
    assert smtpd_auth.mailbox.received == []


async def test_username_without_password_does_not_log_in(smtpd: SmtpServer, wav: Path) -> None:
    # The plain server offers no AUTH: trying to log in would fail the send.
    await send(config(smtpd.port, username="pbx"), wav)
    assert len(smtpd.mailbox.received) == 1


async def test_caller_id_cannot_inject_headers(smtpd: SmtpServer, wav: Path) -> None:
    await send(config(smtpd.port), wav, caller="Mallory\r\nBcc: victim@example.org")
    message = smtpd.mailbox.only_message()
    assert message["Bcc"] is None
    # Long enough to be folded; the parser keeps the space after "Subject:".
    assert message["Subject"].strip() == "New voicemail from Mallory Bcc: victim@example.org in mailbox 1001 (12 s)"
    assert smtpd.mailbox.received[0].rcpt_tos == [TO]
