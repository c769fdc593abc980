"""A real SMTP server for tests: aiosmtpd on loopback, keeping what it receives."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from tests.support.server import free_port


@dataclass
class Mailbox:
    """aiosmtpd handler keeping what it receives; refuses recipients in ``refuse``."""

    refuse: set[str] = field(default_factory=set)
    received: list[Envelope] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.received.append(envelope)
        return "250 Message accepted"

    def only_message(self) -> EmailMessage:
        assert len(self.received) == 1, f"{len(self.received)} messages arrived"
        content = self.received[0].content
        assert isinstance(content, bytes)
        parsed = message_from_bytes(content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class SmtpServer:
    mailbox: Mailbox
    port: int


def start_smtp(**kwargs: Any) -> Iterator[SmtpServer]:
    """Run a server (``kwargs`` go to aiosmtpd's Controller) until the generator is closed."""
    mailbox = Mailbox()
    port = free_port(socket.SOCK_STREAM)
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield SmtpServer(mailbox, port)
    finally:
        controller.stop()
