"""SIP written by hand over UDP, for tests that must control every header.

:class:`RawTrunk` stands in for a provider: it keeps every request the server
sends it and answers like a minimal UAS (ringing, or a final status), so a
test can show that an INVITE reached the trunk, or that none did.
:class:`RawCaller` is a caller that sends exactly the INVITE an attack needs
(a reused Call-ID, a foreign From tag) and ACKs and hangs up its dialogs.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from aiosipua import SipMessage, SipRequest, SipResponse

NL = "\n"
REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 482: "Loop Detected", 486: "Busy Here", 487: "Request Terminated"}


def options_probe(port: int) -> bytes:
    """An out-of-dialog OPTIONS to the server's SIP port on loopback: any
    answer shows the server listens (start-up measurements, readiness)."""
    branch = uuid.uuid4().hex
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bK{branch}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag={branch[:8]}\r\nTo: <sip:127.0.0.1>\r\n"
        f"Call-ID: {branch}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class _Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that queues every SIP message it receives (unparsable datagrams are dropped)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.inbox: asyncio.Queue[tuple[SipMessage, tuple[str, int]]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = SipMessage.parse(data)
        except ValueError:
            return
        self.on_message(message, addr)

    def on_message(self, message: SipMessage, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait((message, addr))

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def send(self, text: str, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(text.replace("\n", "\r\n").encode(), addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def response_to(request: SipRequest, status: int, to_tag: str) -> str:
    """A bodiless response to ``request``, with ``to_tag`` unless its To has a tag."""
    headers = request.headers
    to = headers.get_first("to") or ""
    if ";tag=" not in to:
        to += f";tag={to_tag}"
    vias = "".join(f"Via: {via}\n" for via in headers.get("via"))
    return (
        f"SIP/2.0 {status} {REASONS.get(status, 'Unknown')}\n{vias}"
        f"From: {headers.get_first('from')}\nTo: {to}\nCall-ID: {request.call_id}\n"
        f"CSeq: {headers.get_first('cseq')}\nContent-Length: 0\n\n"
    )


class RawTrunk(_Endpoint):
    """A provider that never connects a call: INVITEs get 180 (then ``final``
    when set), CANCEL gets 200 and 487, BYE and OPTIONS 200. Every request
    it receives is in :attr:`requests`; new INVITEs also in :attr:`invites`."""

    def __init__(self, final: int | None = None) -> None:
        super().__init__()
        self.final = final
        self.requests: list[SipRequest] = []
        self.invites: asyncio.Queue[SipRequest] = asyncio.Queue()
        self._pending: dict[str, SipRequest] = {}  # INVITEs still ringing, by Call-ID
        self._seen: set[str] = set()

    def on_message(self, message: SipMessage, addr: tuple[str, int]) -> None:
        if not isinstance(message, SipRequest):
            return
        self.requests.append(message)
        call_id = message.call_id or ""
        tag = f"trunk{abs(hash(call_id)) % 10**8}"
        method = message.method.upper()
        if method == "INVITE":
            if call_id not in self._seen:  # a retransmission is no new call
                self._seen.add(call_id)
                self.invites.put_nowait(message)
            if self.final is None:
                self._pending[call_id] = message
                self.send(response_to(message, 180, tag), addr)
            else:
                self.send(response_to(message, self.final, tag), addr)
        elif method == "CANCEL":
            self.send(response_to(message, 200, tag), addr)
            invite = self._pending.pop(call_id, None)
            if invite is not None:
                self.send(response_to(invite, 487, tag), addr)
        elif method in ("BYE", "OPTIONS"):
            self.send(response_to(message, 200, tag), addr)

    async def next_invite(self, timeout: float) -> SipRequest:
        """The next new INVITE; TimeoutError when none comes within ``timeout`` seconds."""
        return await asyncio.wait_for(self.invites.get(), timeout)


async def open_trunk(host: str = "127.0.0.1", final: int | None = None) -> RawTrunk:
    _, trunk = await asyncio.get_running_loop().create_datagram_endpoint(lambda: RawTrunk(final), local_addr=(host, 0))
    return trunk


@dataclass
class Dialog:
    """What a raw caller needs to go on with a call the server answered."""

    call_id: str
    from_header: str
    to_header: str  # with the server's tag
    cseq: int = 1


class RawCaller(_Endpoint):
    """A caller whose every header the test chooses."""

    def __init__(self, server: tuple[str, int]) -> None:
        super().__init__()
        self.server = server

    def on_message(self, message: SipMessage, addr: tuple[str, int]) -> None:
        if isinstance(message, SipRequest) and message.method.upper() in ("BYE", "OPTIONS", "NOTIFY"):
            self.send(response_to(message, 200, "caller"), addr)  # the server hangs up (or tells of a transfer): agree
        super().on_message(message, addr)

    def _via(self) -> str:
        host, port = self.address
        return f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport"

    def _sdp(self, media_port: int, direction: str = "sendrecv") -> str:
        host = self.address[0]
        return (
            f"v=0\no=- 1 1 IN IP4 {host}\ns=-\nc=IN IP4 {host}\nt=0 0\n"
            f"m=audio {media_port} RTP/AVP 0 101\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\na={direction}\n"
        )

    def invite(
        self, number: str, *, call_id: str, caller: str, from_tag: str, cseq: int = 1, media_port: int = 40000, extra: str = ""
    ) -> None:
        """Send an INVITE for ``number`` from ``caller`` with the given Call-ID,
        From tag and CSeq (and ``extra``, header lines ending in a newline)."""
        host, port = self.address
        sdp = self._sdp(media_port)
        # Sent with CRLF line ends (send): one more byte per line.
        self.send(
            f"INVITE sip:{number}@{self.server[0]}:{self.server[1]} SIP/2.0\n{self._via()}\n"
            f"From: <sip:{caller}@{host}>;tag={from_tag}\nTo: <sip:{number}@{self.server[0]}>\n"
            f"Call-ID: {call_id}\nCSeq: {cseq} INVITE\nContact: <sip:{caller}@{host}:{port}>\nMax-Forwards: 70\n{extra}"
            f"Content-Type: application/sdp\nContent-Length: {len(sdp) + sdp.count(NL)}\n\n{sdp}",
            self.server,
        )

    async def reinvite(
        self, dialog: Dialog, number: str, *, from_tag: str, media_port: int, direction: str, ack: bool = True
    ) -> SipResponse:
        """Offer ``direction`` (``sendonly``: hold; ``sendrecv``: resume) in a
        re-INVITE and return its final response, ACKed unless ``ack`` is False
        (then :meth:`ack_reinvite` does it later)."""
        dialog.cseq += 1
        host, port = self.address
        sdp = self._sdp(media_port, direction)
        self.send(
            f"INVITE sip:{number}@{self.server[0]}:{self.server[1]} SIP/2.0\n{self._via()}\n"
            f"From: {dialog.from_header}\nTo: {dialog.to_header}\nCall-ID: {dialog.call_id}\n"
            f"CSeq: {dialog.cseq} INVITE\nContact: <sip:caller@{host}:{port}>\nMax-Forwards: 70\n"
            f"Content-Type: application/sdp\nContent-Length: {len(sdp) + sdp.count(NL)}\n\n{sdp}",
            self.server,
        )
        response = await self.final(dialog.call_id, from_tag)
        if ack:
            self.ack_reinvite(dialog, number)
        return response

    def ack_reinvite(self, dialog: Dialog, number: str) -> None:
        self._in_dialog("ACK", dialog, number, cseq=dialog.cseq)

    async def final(self, call_id: str, from_tag: str, timeout: float = 5.0) -> SipResponse:
        """The next final response to this caller's INVITE with ``call_id`` and ``from_tag``."""
        async with asyncio.timeout(timeout):
            while True:
                message, _ = await self.inbox.get()
                if (
                    isinstance(message, SipResponse)
                    and message.status_code >= 200
                    and message.call_id == call_id
                    and f"tag={from_tag}" in (message.headers.get_first("from") or "")
                ):
                    return message

    def ack(self, response: SipResponse, number: str) -> Dialog:
        """ACK a final response (2xx: a new request, as RFC 3261 says) and return its dialog."""
        headers = response.headers
        dialog = Dialog(response.call_id or "", headers.get_first("from") or "", headers.get_first("to") or "")
        self._in_dialog("ACK", dialog, number, cseq=dialog.cseq)
        return dialog

    def bye(self, dialog: Dialog, number: str) -> None:
        dialog.cseq += 1
        self._in_dialog("BYE", dialog, number, cseq=dialog.cseq)

    def _in_dialog(self, method: str, dialog: Dialog, number: str, *, cseq: int) -> None:
        self.send(
            f"{method} sip:{number}@{self.server[0]}:{self.server[1]} SIP/2.0\n{self._via()}\n"
            f"From: {dialog.from_header}\nTo: {dialog.to_header}\nCall-ID: {dialog.call_id}\n"
            f"CSeq: {cseq} {method}\nMax-Forwards: 70\nContent-Length: 0\n\n",
            self.server,
        )


async def open_caller(server: tuple[str, int], host: str = "127.0.0.1") -> RawCaller:
    _, caller = await asyncio.get_running_loop().create_datagram_endpoint(lambda: RawCaller(server), local_addr=(host, 0))
    return caller
