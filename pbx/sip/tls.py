"""SIP over TLS (RFC 3261 §26.3.1, RFC 5630): ``tls:HOST:PORT`` in ``sip.listen``.

aiosipua has no TLS transport; its TCP one reads and writes asyncio streams,
which take an ``ssl.SSLContext`` as they are opened. So TLS is the server's
TCP transport (with its connection limits and timeouts) whose connections,
accepted or opened, are wrapped in TLS; framing, dispatch and sending are
unchanged.

Phones connect to us and present no certificate (as with Asterisk's and
Kamailio's defaults, ``verify_client`` off); they authenticate with digest as
over UDP. Connections we open (to a trunk with ``;transport=tls``) verify
the provider's certificate and host name against the system's CAs, or the
``sip.tls.ca`` bundle when one is configured.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pbx.sip.transport import TcpTransport

logger = logging.getLogger(__name__)

# For the TLS connections we open (to trunks).
HANDSHAKE_TIMEOUT = 10.0


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context for our listening socket: our certificate chain, TLS 1.2 or newer.

    Raises OSError or ssl.SSLError when the files cannot be read or do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_context(ca: Path | None = None) -> ssl.SSLContext:
    """The context for connections we open: the peer's certificate and host
    name are verified against ``ca`` (a PEM bundle), else the system's CAs."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class TlsSipTransport(TcpTransport):
    """The TCP transport with TLS on every connection, both ways."""

    secure: ClassVar[bool] = True  # SipStack names its flows "tls" and writes TLS in Via

    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext = field(default_factory=client_context)
    _connecting: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def start(self) -> None:
        if self.server_ssl is None:
            raise RuntimeError("a TLS listener needs sip.tls: {cert, key}")
        await super().start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, addr: tuple[str, int]) -> None:
        # The listening socket is plain TCP and each connection turns TLS here,
        # inside the TCP transport's accounting: a connection still in its
        # handshake counts against the caps, and one that does not finish it
        # within the read timeout (a half-sent message) is dropped.
        assert self.server_ssl is not None
        try:
            await writer.start_tls(self.server_ssl, ssl_handshake_timeout=self.read_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            logger.info("closing TLS connection from %s:%d: no handshake: %s", addr[0], addr[1], exc or type(exc).__name__)
            return
        await super()._serve(reader, writer, addr)

    async def connect(self, remote_addr: tuple[str, int], server_hostname: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TLS connection to ``remote_addr`` (an IP address), checking
        the certificate against ``server_hostname`` (default: that address);
        messages on it are read in the background like any other."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                remote_addr[0],
                remote_addr[1],
                ssl=self.client_ssl,
                server_hostname=server_hostname or remote_addr[0],
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ),
            HANDSHAKE_TIMEOUT + 5,
        )
        self._connections[remote_addr] = (reader, writer)
        self._spawn(self._handle_incoming(reader, writer, remote_addr))
        return reader, writer

    async def ensure_connection(self, remote_addr: tuple[str, int], server_hostname: str) -> None:
        """Have a connection to ``remote_addr``: the open one, or a new one
        (one attempt at a time, so calls placed together share it). Raises
        OSError (ssl.SSLError included) or TimeoutError when it cannot be opened."""
        async with self._connecting:
            if remote_addr not in self._connections:
                await self.connect(remote_addr, server_hostname)
