"""The transports a :class:`~pbx.sip.stack.SipStack` listens on, and the
flows that name a peer on one of them.

aiosipua parses and serialises messages and owns the UDP and TCP sockets.
Its transports are used with a quieter dispatch, and TCP within the limits of
:mod:`pbx.sip.tcp`; TLS (:mod:`pbx.sip.tls`) is the TCP transport wrapped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiosipua import SipMessage, SipRequest, SipTransport, UdpSipTransport
from aiosipua.transport import _stamp_via_received

from pbx.sip.syntax import check_request_line
from pbx.sip.tcp import BoundedTcp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flow:
    """Where a peer is: the transport we reach it on and its address there."""

    transport: SipTransport
    addr: tuple[str, int]

    @property
    def name(self) -> str:
        """``udp``, ``tcp`` or ``tls``: as registrations store it and Via and Contact say it."""
        return transport_kind(self.transport)


def transport_kind(transport: SipTransport) -> str:
    """``tls`` for the TLS transport (it says so), else ``tcp`` or ``udp``."""
    if getattr(transport, "secure", False):
        return "tls"
    return "tcp" if transport.reliable else "udp"


class _QuietDispatch(SipTransport):
    """aiosipua's dispatch without its traceback per bad packet, and with
    RFC 5626 CRLF keep-alives ignored instead of logged as parse failures."""

    def _dispatch(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip(b"\r\n"):
            return
        try:
            check_request_line(data)
            msg = SipMessage.parse(data)
        except (ValueError, IndexError, UnicodeError) as exc:
            logger.warning("dropped an unparsable message from %s:%d: %s", addr[0], addr[1], exc)
            return
        if isinstance(msg, SipRequest):
            _stamp_via_received(msg, addr)
        if self.on_message is not None:
            self.on_message(msg, addr)


class UdpTransport(_QuietDispatch, UdpSipTransport):
    """SIP over UDP."""

    def send_bytes(self, raw: bytes, addr: tuple[str, int]) -> None:
        """Send a message serialised before (a kept answer)."""
        if self._udp_transport is not None:
            self._udp_transport.sendto(raw, addr)


class TcpTransport(_QuietDispatch, BoundedTcp):
    """SIP over TCP within the limits of :mod:`pbx.sip.tcp`; TLS subclasses it."""
