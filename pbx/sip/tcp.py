"""SIP over TCP with bounded resources (what Kamailio's tcp_max_connections,
tcp_connection_lifetime and tcp_conn_wq_max promise).

aiosipua's :class:`~aiosipua.TcpSipTransport` accepts any number of
connections, keeps them open forever and buffers whatever a peer does not
read. :class:`BoundedTcp` takes over its connection handling:

- at most :data:`MAX_CONNECTIONS` connections per listener and
  :data:`MAX_CONNECTIONS_PER_ADDRESS` per source address (an IPv6 /64 counts
  as one address, as bans do); a connection over either cap is closed at once
  and announced as a ``connection_refused`` security event, at most one line
  per address every :data:`REFUSAL_LOG_INTERVAL` seconds;
- a connection with no complete message (or RFC 5626 keep-alive) either way
  for :data:`IDLE_TIMEOUT` seconds is closed, and so is one whose message has
  not been completed :data:`READ_TIMEOUT` seconds after its first byte;
- a peer that lets more than :data:`MAX_WRITE_BUFFER` bytes of our messages
  pile up unread (beyond a kernel send buffer of :data:`SOCKET_SEND_BUFFER`)
  has its connection dropped instead of the process growing.

Tests shorten the two timeouts with the environment variables
``PBX_SIP_TCP_IDLE_TIMEOUT`` and ``PBX_SIP_TCP_READ_TIMEOUT`` (seconds); they
are not configuration an admin is meant to need.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass, field

from aiosipua import SipRequest, SipResponse, TcpSipTransport
from aiosipua.transport import MAX_BODY_BYTES, MAX_HEADER_BYTES

from pbx.events import EventBus
from pbx.security import address_key, security_event

logger = logging.getLogger(__name__)

# Kamailio's tcp_max_connections is 2048 for TCP and TLS together; we count
# per listener, so a TCP and a TLS listener together stay at that figure.
MAX_CONNECTIONS = 1024
# A phone needs one connection; 32 leaves room for an office of TCP phones
# behind one NAT address while one address cannot take the listener's share.
MAX_CONNECTIONS_PER_ADDRESS = 32
# Kamailio's tcp_connection_lifetime default. Phones registered over TCP send
# RFC 5626 CRLF keep-alives (pjsip every 90 s) or re-REGISTER well within it.
IDLE_TIMEOUT = 120.0
# From a message's first byte to its last: a phone writes one message at once.
READ_TIMEOUT = 10.0
# Unsent bytes a peer may leave unread before its connection is dropped
# (on top of the kernel's socket buffer); Kamailio's tcp_conn_wq_max is 32 KB.
MAX_WRITE_BUFFER = 256 * 1024
# The kernel's send buffer of each connection: what a peer that does not read
# can make us queue beyond MAX_WRITE_BUFFER. Loopback and LAN defaults grow to
# megabytes, thousands of responses whose requests would all be processed (and
# their transactions held) before the peer's silence shows; SIP messages are
# small, so 64 KB still holds a burst of NOTIFYs or a large INVITE.
SOCKET_SEND_BUFFER = 64 * 1024
# One connection_refused line per address this often; refusals in between are counted in the next.
REFUSAL_LOG_INTERVAL = 60.0

_READ_CHUNK = 16 * 1024
_KEEPALIVE_PING = b"\r\n\r\n"
_KEEPALIVE_PONG = b"\r\n"


class _Unframable(ValueError):
    """The peer's bytes cannot be cut into SIP messages within our limits."""


@dataclass
class BoundedTcp(TcpSipTransport):
    """aiosipua's TCP transport with capped connections, timeouts and write buffers.

    ``events`` receives the ``connection_refused`` security events; the limits
    default to the module constants.
    """

    events: EventBus | None = None
    max_connections: int = MAX_CONNECTIONS
    max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    idle_timeout: float = field(default_factory=lambda: _env_seconds("PBX_SIP_TCP_IDLE_TIMEOUT", IDLE_TIMEOUT))
    read_timeout: float = field(default_factory=lambda: _env_seconds("PBX_SIP_TCP_READ_TIMEOUT", READ_TIMEOUT))
    max_write_buffer: int = MAX_WRITE_BUFFER
    _per_address: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _open: int = field(default=0, init=False, repr=False)
    _last_sent: dict[tuple[str, int], float] = field(default_factory=dict, init=False, repr=False)
    _refusals: dict[str, tuple[float, int]] = field(default_factory=dict, init=False, repr=False)

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr = (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)
        key = address_key(addr[0])
        if self._open >= self.max_connections or self._per_address[key] >= self.max_per_address:
            writer.transport.abort()
            self._refused(addr[0], key, "total" if self._open >= self.max_connections else "per_address")
            return
        self._open += 1
        self._per_address[key] += 1
        self._connections[addr] = (reader, writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        try:
            await self._serve(reader, writer, addr)
        except (OSError, _Unframable) as exc:
            logger.info("closing TCP connection from %s:%d: %s", addr[0], addr[1], exc or type(exc).__name__)
        finally:
            self._open -= 1
            self._per_address[key] -= 1
            if not self._per_address[key]:
                del self._per_address[key]
            conn = self._connections.get(addr)
            if conn is not None and conn[1] is writer:
                del self._connections[addr]
            self._last_sent.pop(addr, None)
            _drop(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, addr: tuple[str, int]) -> None:
        """Read and dispatch messages until EOF, a timeout or a framing error."""
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        last_message = loop.time()
        first_byte = 0.0  # when the first byte of the message in ``buffer`` arrived
        while not writer.transport.is_closing():
            if buffer:
                deadline, what = first_byte + self.read_timeout, "message not completed"
            else:
                active = max(last_message, self._last_sent.get(addr, 0.0))
                deadline, what = active + self.idle_timeout, "idle"
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(_READ_CHUNK)
            except TimeoutError:
                if not buffer and self._last_sent.get(addr, 0.0) + self.idle_timeout > loop.time():
                    continue  # we sent on it meanwhile: that is activity too
                limit = self.read_timeout if buffer else self.idle_timeout
                logger.info("closing TCP connection from %s:%d: %s for %.0f s", addr[0], addr[1], what, limit)
                return
            if not chunk:
                return
            if not buffer:
                first_byte = loop.time()
            buffer += chunk
            while not writer.transport.is_closing():
                if _keepalive(buffer, writer):
                    last_message = first_byte = loop.time()
                length = _frame(buffer)
                if length is None:
                    break
                data = bytes(buffer[:length])
                del buffer[:length]
                last_message = first_byte = loop.time()
                self._dispatch(data, addr)

    def send(self, message: SipRequest | SipResponse, addr: tuple[str, int]) -> None:
        """Queue ``message`` on the connection from ``addr``; drop the
        connection when its peer has left too much of our output unread."""
        conn = self._connections.get(addr)
        if conn is None or conn[1].transport.is_closing():
            raise RuntimeError(f"No TCP connection to {addr}")
        writer = conn[1]
        writer.write(bytes(message))
        self._last_sent[addr] = asyncio.get_running_loop().time()
        unsent = writer.transport.get_write_buffer_size()
        if unsent > self.max_write_buffer:
            logger.warning(
                "closing TCP connection from %s:%d: %d bytes unsent (limit %d), the peer does not read",
                addr[0], addr[1], unsent, self.max_write_buffer,
            )
            del self._connections[addr]
            writer.transport.abort()

    async def stop(self) -> None:
        # A connection with unsent bytes would keep close() and the server's
        # wait_closed() waiting for a peer that does not read: abort them.
        for _, writer in self._connections.values():
            writer.transport.abort()
        await super().stop()

    def _refused(self, ip: str, key: str, limit: str) -> None:
        now = asyncio.get_running_loop().time()
        logged, folded = self._refusals.get(key, (float("-inf"), 0))
        if now - logged < REFUSAL_LOG_INTERVAL:
            self._refusals[key] = (logged, folded + 1)
            return
        if len(self._refusals) >= 4 * self.max_connections:  # an attacker with many addresses: forget old ones
            self._refusals = {k: v for k, v in self._refusals.items() if now - v[0] < REFUSAL_LOG_INTERVAL}
        self._refusals[key] = (now, 0)
        if self.events is not None:
            security_event(self.events, "connection_refused", ip, limit=limit, refused=folded + 1)


def _keepalive(buffer: bytearray, writer: asyncio.StreamWriter) -> bool:
    """Strip the CRLFs that lead ``buffer`` (RFC 5626 keep-alives, §3.5.1):
    answer a double-CRLF ping with a CRLF pong. True when any were there."""
    stripped = len(buffer) - len(buffer.lstrip(b"\r\n"))
    if not stripped:
        return False
    if _KEEPALIVE_PING in buffer[:stripped]:
        writer.write(_KEEPALIVE_PONG)
    del buffer[:stripped]
    return True


def _frame(buffer: bytearray) -> int | None:
    """The length of the first complete message in ``buffer`` (Content-Length
    framing, RFC 3261 §18.3), or None while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise _Unframable(f"header section over {MAX_HEADER_BYTES} bytes")
        return None
    head = end + 4
    if head > MAX_HEADER_BYTES:
        raise _Unframable(f"header section over {MAX_HEADER_BYTES} bytes")
    content_length = 0
    for line in bytes(buffer[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            try:
                content_length = max(0, int(value.strip()))
            except ValueError:
                raise _Unframable("unreadable Content-Length") from None
            break
    if content_length > MAX_BODY_BYTES:
        raise _Unframable(f"a {content_length}-byte body (limit {MAX_BODY_BYTES})")
    if len(buffer) < head + content_length:
        return None
    return head + content_length


def _drop(writer: asyncio.StreamWriter) -> None:
    """Close gracefully, or at once when unsent bytes would hold the socket open."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        logger.warning("ignoring %s=%r: not a positive number of seconds; using %.0f", name, text, default)
        return default
    return value
