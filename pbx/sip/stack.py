"""SIP transport glue on aiosipua's message layer: the listening transports
(:mod:`pbx.sip.transport`), and the routing of every message to its
transaction (:mod:`pbx.sip.transactions`).

aiosipua parses and serialises messages and owns the UDP and TCP sockets. Its
UAS/UAC classes are built for an endpoint, not a B2BUA: they send no ACK for a
non-2xx final response, never retransmit a request over UDP, write ``UDP`` in
every Via and treat a retransmitted INVITE as a new call. So the project keeps
the transactions itself; dialogs and calls live in :mod:`pbx.sip.dialog` and
:mod:`pbx.calls.service`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiosipua import (
    SipRequest,
    SipResponse,
    SipTransport,
    UdpSipTransport,
    Via,
    generate_branch,
    generate_call_id,
    generate_tag,
    parse_via,
    stringify_via,
)
from aiosipua.message import missing_required_headers
from aiosipua.transport import _response_destination

from pbx.events import EventBus
from pbx.sip.messages import make_response
from pbx.sip.syntax import request_problem
from pbx.sip.tcp import BoundedTcp
from pbx.sip.tls import TlsSipTransport, client_context
from pbx.sip.transactions import TIMER_B, AnsweredRequests, ClientTransaction, NoTransaction, ResponseHandler, ServerTransaction
from pbx.sip.transport import Flow, TcpTransport, UdpTransport, transport_kind

logger = logging.getLogger(__name__)

# One header line (name, colon, value) or Request-URI longer than this gets a
# 400, or is dropped when it is one a response would copy back. Apache and
# nginx refuse HTTP header fields past 8 KB; SIP headers are far shorter.
MAX_HEADER_LINE = 8 * 1024
# Headers a response copies from its request (RFC 3261 §8.2.6.2).
_ECHOED_HEADERS = frozenset({"via", "from", "to", "call-id", "cseq"})


RequestHandler = Callable[[SipRequest, Flow, ServerTransaction], None]


@dataclass
class SipStack:
    """Owns the listening transports and routes every message to its transaction."""

    events: EventBus
    advertised_host: str
    user_agent: str
    on_request: RequestHandler | None = None
    on_stray_response: ResponseHandler | None = None
    is_blocked: Callable[[str], bool] = lambda ip: False
    transports: list[SipTransport] = field(default_factory=list)
    _server: dict[tuple[str, str], ServerTransaction] = field(default_factory=dict)
    _answered: AnsweredRequests = field(default_factory=AnsweredRequests)
    _client: dict[tuple[str, str], ClientTransaction] = field(default_factory=dict)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen(
        self, transport_name: str, host: str, port: int, *, server_ssl: ssl.SSLContext | None = None, client_ssl: ssl.SSLContext | None = None
    ) -> SipTransport:
        """Start a transport; ``tls`` needs ``server_ssl`` (our certificate) and
        may take ``client_ssl`` (how trunks' certificates are verified)."""
        transport: SipTransport
        if transport_name == "tls":
            transport = TlsSipTransport(local_addr=(host, port), server_ssl=server_ssl, client_ssl=client_ssl or client_context())
        else:
            transport = (TcpTransport if transport_name == "tcp" else UdpTransport)(local_addr=(host, port))
        if isinstance(transport, BoundedTcp):
            transport.events = self.events
        transport.on_message = lambda msg, addr, t=transport: self._received(msg, Flow(t, addr))
        await transport.start()
        if port == 0:
            transport.local_addr = (host, _bound_port(transport))
        self.transports.append(transport)
        logger.info("listening on %s:%s:%d", transport_name, host, transport.local_addr[1])
        return transport

    def spawn(self, txn: ServerTransaction, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Handle ``txn``'s request in the background: if ``work`` raises,
        the transaction ends with a 500 instead of waiting forever."""
        task = asyncio.get_running_loop().create_task(work)
        self._handlers.add(task)
        task.add_done_callback(lambda done: self._handled(done, txn))
        return task

    def _handled(self, task: asyncio.Task[None], txn: ServerTransaction) -> None:
        self._handlers.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        logger.error("handling %s from %s:%d failed", txn.request.method, *txn.flow.addr, exc_info=task.exception())
        txn.fail()

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self._answered.clear()
        for transport in self.transports:
            await transport.stop()
        self.transports.clear()

    def transport(self, name: str) -> SipTransport:
        """The first listening transport of that kind ("udp", "tcp" or "tls")."""
        for transport in self.transports:
            if transport_kind(transport) == name:
                return transport
        raise LookupError(f"no {name} transport is listening")

    async def flow_to(self, host: str, port: int, transport: str) -> Flow:
        """A flow to ``host:port`` (a trunk) over ``udp`` or ``tls``; for TLS a
        connection is opened (certificate checked against ``host``) unless one
        is up. Raises LookupError (no such transport listens), OSError
        (no address, refused, bad certificate) or TimeoutError."""
        sock_type = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=sock_type)
        addr = (str(infos[0][4][0]), int(infos[0][4][1]))
        sip_transport = self.transport(transport)
        if transport == "tls":
            assert isinstance(sip_transport, TlsSipTransport)
            await sip_transport.ensure_connection(addr, host)
        return Flow(sip_transport, addr)

    def local_port(self, transport: SipTransport) -> int:
        return transport.local_addr[1]

    # --- sending ---

    def new_via(self, flow: Flow) -> str:
        via = Via(
            transport=flow.name.upper(),
            host=self.advertised_host,
            port=self.local_port(flow.transport),
            params={"branch": generate_branch(), "rport": None},
        )
        return stringify_via(via)

    def out_of_dialog(self, method: str, uri: str, to: str, flow: Flow, domain: str) -> SipRequest:
        """A request outside any dialog (NOTIFY of message waiting, OPTIONS
        of qualify) from the server itself, ``sip:domain``, to ``to``."""
        request = SipRequest(method=method, uri=uri)
        request.headers.append("Via", self.new_via(flow))
        request.headers.set_single("From", f"<sip:{domain}>;tag={generate_tag()}")
        request.headers.set_single("To", f"<{to}>")
        request.headers.set_single("Call-ID", generate_call_id(self.advertised_host))
        request.headers.set_single("CSeq", f"1 {method}")
        request.headers.set_single("Max-Forwards", "70")
        return request

    def contact_uri(self, flow: Flow, user: str | None = None) -> str:
        userpart = f"{user}@" if user else ""
        params = f";transport={flow.name}" if flow.transport.reliable else ""
        return f"sip:{userpart}{self.advertised_host}:{self.local_port(flow.transport)}{params}"

    def send_request(self, request: SipRequest, flow: Flow) -> None:
        try:
            flow.transport.send(request, flow.addr)
        except (RuntimeError, OSError) as exc:
            logger.warning("cannot send %s to %s: %s", request.method, flow.addr, exc)

    def send_response(self, response: SipResponse, flow: Flow) -> None:
        response.headers.set_single("Server", self.user_agent)
        self.events.emit("sip_response", code=response.status_code)
        try:
            if flow.transport.reliable:
                flow.transport.send(response, flow.addr)
            else:
                flow.transport.send_reply(response)
        except (RuntimeError, OSError, ValueError) as exc:
            logger.warning("cannot send %d to %s: %s", response.status_code, flow.addr, exc)

    def request(self, request: SipRequest, flow: Flow, on_response: ResponseHandler, *, timeout: float = TIMER_B) -> ClientTransaction:
        """Send a request in a new client transaction; responses go to
        ``on_response``, a 408 of our own after ``timeout`` seconds without one."""
        txn = ClientTransaction(self, request, flow, on_response, timeout)
        txn.start()
        return txn

    # --- receiving ---

    def _received(self, msg: SipRequest | SipResponse, flow: Flow) -> None:
        if self.is_blocked(flow.addr[0]):
            return
        if isinstance(msg, SipResponse):
            if _oversized_header(msg) is None:
                self._response_received(msg)
            else:
                logger.warning("dropped a %d response from %s:%d: header over %d bytes", msg.status_code, *flow.addr, MAX_HEADER_LINE)
        else:
            self._request_received(msg, flow)

    def _response_received(self, response: SipResponse) -> None:
        vias = response.headers.get("via")
        try:
            cseq = response.cseq
            branch = parse_via(vias[0]).branch or "" if vias else ""
        except (ValueError, IndexError):
            return  # a malformed Via or CSeq: no transaction of ours sent it (RFC 3261 §18.1.2)
        if not vias or cseq is None:
            return
        txn = self._client.get((branch, cseq.method.upper()))
        if txn is not None and txn.received(response):
            return
        if self.on_stray_response is not None:
            # A 2xx to an INVITE after its first final answer: the dialog ACKs it again.
            self.on_stray_response(response)

    def _request_received(self, request: SipRequest, flow: Flow) -> None:
        self.events.emit("sip_request", method=request.method.upper())
        oversized = _oversized_header(request)
        if oversized is not None:
            echoed = oversized.lower() in _ECHOED_HEADERS
            logger.warning(
                "%s %s from %s:%d: %s over %d bytes",
                "dropped" if echoed else "400 to",
                request.method,
                *flow.addr,
                oversized,
                MAX_HEADER_LINE,
            )
            if not echoed and _via_valid(request):
                self.send_response(make_response(request, 400, "Header Too Long"), flow)
            return
        missing = missing_required_headers(request)
        if missing or not _cseq_valid(request) or not _via_valid(request):
            logger.warning(
                "bad %s from %s:%d: %s",
                request.method,
                *flow.addr,
                f"missing {', '.join(missing)}" if missing else "malformed CSeq or Via",
            )
            if "via" not in missing:
                self.send_response(make_response(request, 400, "Missing or malformed header"), flow)
            return
        problem = request_problem(request, reliable=flow.transport.reliable)
        if problem is not None:
            status, reason, headers = problem
            logger.warning("%d %s to %s from %s:%d", status, reason, request.method, *flow.addr)
            if request.method.upper() != "ACK":  # an ACK is never answered
                self.send_response(make_response(request, status, reason, headers=headers), flow)
            return
        branch = transaction_branch(request)
        method = request.method.upper()
        if method == "ACK":
            invite = self._server.get((branch, "INVITE"))
            if invite is not None and invite.last_response is not None and invite.last_response.status_code >= 300:
                invite.acked()
                return
            txn: ServerTransaction = NoTransaction(self, request, flow)
        else:
            key = (branch, method)
            existing = self._server.get(key)
            if existing is not None:
                existing.retransmission()
                return
            if self._answered.resend(key):
                return
            txn = ServerTransaction(self, request, flow, key)
            self._server[key] = txn
            txn.start()
        if self.on_request is None:
            return
        try:
            self.on_request(request, flow, txn)
        except Exception:
            logger.exception("handling %s from %s:%d failed", method, *flow.addr)
            txn.fail()

    def client_started(self, txn: ClientTransaction) -> None:
        self._client[txn.key] = txn

    def client_ended(self, key: tuple[str, str]) -> None:
        self._client.pop(key, None)

    def server_ended(self, key: tuple[str, str]) -> None:
        self._server.pop(key, None)

    def answered(self, key: tuple[str, str], response: SipResponse, flow: Flow) -> None:
        dest = _response_destination(response)
        if isinstance(flow.transport, UdpTransport) and dest is not None:
            self._answered.keep(key, response, flow.transport, dest)

    def server_transaction(self, branch: str, method: str) -> ServerTransaction | None:
        """The transaction of ``method`` whose request had ``branch`` (a
        :func:`transaction_branch`), if it is still alive."""
        return self._server.get((branch, method))


def transaction_branch(request: SipRequest) -> str:
    """What identifies a request's server transaction besides its method: the
    top Via's branch and sent-by (RFC 3261 §17.2.3). Two clients that pick the
    same branch (the RFC 4475 messages share one) are different transactions,
    and a CANCEL from one cannot end the other's INVITE."""
    via = parse_via(request.headers.get("via")[0])
    return f"{via.branch or ''} {via.host.lower()}:{via.port or ''}"


def _cseq_valid(request: SipRequest) -> bool:
    try:
        cseq = request.cseq
    except (ValueError, IndexError):
        return False
    return cseq is not None and cseq.method.upper() == request.method.upper() and 0 <= cseq.seq < 2**31


def _oversized_header(msg: SipRequest | SipResponse) -> str | None:
    """The name of a header line (or "Request-URI") longer than :data:`MAX_HEADER_LINE`."""
    if isinstance(msg, SipRequest) and len(msg.uri) > MAX_HEADER_LINE:
        return "Request-URI"
    for name, values in msg.headers.items():
        if any(len(name) + 2 + len(value) > MAX_HEADER_LINE for value in values):
            return name
    return None


def _via_valid(request: SipRequest) -> bool:
    try:
        via = parse_via(request.headers.get("via")[0])
    except (ValueError, IndexError):
        return False
    return bool(via.host)


def _bound_port(transport: SipTransport) -> int:
    if isinstance(transport, UdpSipTransport) and transport._udp_transport is not None:
        return int(transport._udp_transport.get_extra_info("sockname")[1])
    if isinstance(transport, BoundedTcp) and transport._server is not None:
        return int(transport._server.sockets[0].getsockname()[1])
    raise RuntimeError("transport is not bound")
