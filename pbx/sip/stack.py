"""SIP transport glue and transactions (RFC 3261 §17) on aiosipua's message layer.

aiosipua parses and serialises messages and owns the UDP and TCP sockets. Its
UAS/UAC classes are built for an endpoint, not a B2BUA: they send no ACK for a
non-2xx final response, never retransmit a request over UDP, write ``UDP`` in
every Via and treat a retransmitted INVITE as a new call. So this module keeps
the transactions itself; dialogs and calls live in :mod:`pbx.sip.dialog` and
:mod:`pbx.sip.b2bua`.
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
    parse_via,
    stringify_via,
)
from aiosipua import SipMessage
from aiosipua.message import missing_required_headers
from aiosipua.transport import _stamp_via_received

from pbx.events import EventBus
from pbx.sip.messages import make_response
from pbx.sip.syntax import check_request_line, request_problem
from pbx.sip.tcp import BoundedTcp

logger = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
TIMER_B = 64 * T1
# RFC 3261 §17.2.1: a 100 (Trying) only when the answer takes longer than this.
TRYING_DELAY = 0.2
# One header line (name, colon, value) or Request-URI longer than this gets a
# 400, or is dropped when it is one a response would copy back. Apache and
# nginx refuse HTTP header fields past 8 KB; SIP headers are far shorter.
MAX_HEADER_LINE = 8 * 1024
# Headers a response copies from its request (RFC 3261 §8.2.6.2).
_ECHOED_HEADERS = frozenset({"via", "from", "to", "call-id", "cseq"})


@dataclass(frozen=True)
class Flow:
    """Where a peer is: the transport we reach it on and its address there."""

    transport: SipTransport
    addr: tuple[str, int]

    @property
    def name(self) -> str:
        """``udp``, ``tcp`` or ``tls``: as registrations store it and Via and Contact say it."""
        return transport_kind(self.transport)


RequestHandler = Callable[[SipRequest, Flow, "ServerTransaction"], None]
ResponseHandler = Callable[[SipResponse], None]


class ServerTransaction:
    """One incoming request and the responses we give it.

    A retransmitted request gets the last response again. An INVITE gets a
    100 (Trying) only if it is not answered within :data:`TRYING_DELAY`.
    A non-2xx final answer to an INVITE over UDP is retransmitted until its
    ACK arrives (Timer G) only when a provisional response went before it and
    it is no challenge (401, 407): a client that has had no provisional
    response still retransmits its INVITE (Timer A) and gets the answer again
    for each copy, so sending once loses nothing, and a spoofed source cannot
    draw eleven copies of a response out of one datagram. This is Kamailio's
    behaviour too: it challenges and refuses statelessly, once per request.
    A non-INVITE request unanswered after 64*T1, when its client has given
    up, gets a 500 and its transaction ends.
    """

    def __init__(self, stack: SipStack, request: SipRequest, flow: Flow, key: tuple[str, str]) -> None:
        self.stack = stack
        self.request = request
        self.flow = flow
        self.key = key
        self.last_response: SipResponse | None = None
        self.to_tag: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.TimerHandle | None = None  # the delayed 100, or the unanswered guard
        self._provisional_sent = False
        self._terminated = False

    def start(self) -> None:
        """Arm the delayed 100 (Trying) of an INVITE, or the guard that ends
        a non-INVITE transaction its handler never answered."""
        loop = asyncio.get_running_loop()
        if self.request.method.upper() == "INVITE":
            self._pending = loop.call_later(TRYING_DELAY, self._trying)
        else:
            self._pending = loop.call_later(TIMER_B, self._unanswered)

    def _trying(self) -> None:
        if self.last_response is None:
            self.reply(100)

    def _unanswered(self) -> None:
        logger.error("no answer to %s from %s:%d after %.0f s: 500", self.request.method, *self.flow.addr, TIMER_B)
        self.fail()
        self.terminate()

    def fail(self) -> None:
        """Its handler failed: end the transaction with a 500 unless a final answer went out."""
        if not self._terminated and not self.final:
            self.reply(500)

    @property
    def final(self) -> bool:
        return self.last_response is not None and self.last_response.status_code >= 200

    def respond(self, response: SipResponse) -> None:
        if self._terminated or self.final:
            return
        self.last_response = response
        self.stack.send_response(response, self.flow)
        if response.status_code < 200:
            self._provisional_sent = True
            return
        if self._pending is not None:
            self._pending.cancel()
        if self._timer_g(response.status_code):
            self._retransmit(T1, 0.0)
        else:
            # Linger to absorb retransmissions of the request (Timer J / H).
            self._schedule_end(TIMER_B if not self.flow.transport.reliable else 1.0)

    def _timer_g(self, status: int) -> bool:
        return (
            self.request.method == "INVITE"
            and status >= 300
            and status not in (401, 407)
            and self._provisional_sent
            and not self.flow.transport.reliable
        )

    def reply(self, status: int, reason: str | None = None, **kwargs: object) -> SipResponse:
        """Build a response to this request, send it and return it."""
        response = make_response(self.request, status, reason, to_tag=self.to_tag, **kwargs)  # type: ignore[arg-type]
        self.respond(response)
        return response

    def _retransmit(self, interval: float, elapsed: float) -> None:
        def fire() -> None:
            if self._terminated or self.last_response is None:
                return
            if elapsed + interval >= TIMER_B:
                self.terminate()
                return
            self.stack.send_response(self.last_response, self.flow)
            self._retransmit(min(interval * 2, T2), elapsed + interval)

        self._timer = asyncio.get_running_loop().call_later(interval, fire)

    def _schedule_end(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self.terminate)

    def acked(self) -> None:
        """The ACK for our non-2xx final response arrived."""
        if self._timer is not None:
            self._timer.cancel()
        self._schedule_end(T2 if not self.flow.transport.reliable else 0.0)

    def retransmission(self) -> None:
        if self.last_response is not None:
            self.stack.send_response(self.last_response, self.flow)

    def terminate(self) -> None:
        for handle in (self._timer, self._pending):
            if handle is not None:
                handle.cancel()
        self._terminated = True
        self.stack._server.pop(self.key, None)


class ClientTransaction:
    """One request we sent: retransmitted over UDP, timed out after 64*T1,
    and (for INVITE) ACKed when the final answer is not a 2xx."""

    def __init__(self, stack: SipStack, request: SipRequest, flow: Flow, on_response: ResponseHandler) -> None:
        self.stack = stack
        self.request = request
        self.flow = flow
        self.on_response = on_response
        self.branch = request.via[0].branch or ""
        self.key = (self.branch, request.method)
        self.final_response: SipResponse | None = None
        self._provisional = False
        self._retrans: asyncio.TimerHandle | None = None
        self._timeout: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stack._client[self.key] = self
        self.stack.send_request(self.request, self.flow)
        if not self.flow.transport.reliable:
            self._retrans = loop.call_later(T1, self._retransmit, T1)
        self._timeout = loop.call_later(TIMER_B, self._timed_out)

    def _retransmit(self, interval: float) -> None:
        if self.final_response is not None or (self._provisional and self.request.method == "INVITE"):
            return
        self.stack.send_request(self.request, self.flow)
        # Timer A doubles without bound; Timer E is capped at T2.
        next_interval = interval * 2 if self.request.method == "INVITE" else min(interval * 2, T2)
        self._retrans = asyncio.get_running_loop().call_later(next_interval, self._retransmit, next_interval)

    def _timed_out(self) -> None:
        if self.final_response is not None or (self._provisional and self.request.method == "INVITE"):
            return
        self._stop()
        self.on_response(make_response(self.request, 408))

    def received(self, response: SipResponse) -> None:
        status = response.status_code
        if status < 200:
            if self.final_response is None:
                self._provisional = True
                self.on_response(response)
            return
        first = self.final_response is None
        if self.request.method == "INVITE" and status >= 300:
            self._send_ack(response)
        if first:
            self.final_response = response
            self._stop()
            linger = 0.0 if self.flow.transport.reliable else TIMER_B
            asyncio.get_running_loop().call_later(linger, self.stack._client.pop, self.key, None)
            self.on_response(response)
        elif self.request.method == "INVITE" and status < 300:
            self.on_response(response)

    def _stop(self) -> None:
        for handle in (self._retrans, self._timeout):
            if handle is not None:
                handle.cancel()

    def _send_ack(self, response: SipResponse) -> None:
        """ACK for a non-2xx final response: same branch, To from the response (§17.1.1.3)."""
        ack = invite_sibling(self.request, "ACK", to=response.headers.get_first("to") or "")
        self.stack.send_request(ack, self.flow)


def invite_sibling(invite: SipRequest, method: str, *, to: str | None = None) -> SipRequest:
    """A CANCEL, or the ACK of a non-2xx answer, for ``invite`` (RFC 3261
    §9.1, §17.1.1.3): its Request-URI, top Via, From, Call-ID, Route and CSeq
    number; To as the INVITE's, or ``to`` (the answer's, with its tag)."""
    request = SipRequest(method=method, uri=invite.uri)
    request.headers.append("Via", invite.headers.get("via")[0])
    for name in ("From", "Call-ID", "Route"):
        for value in invite.headers.get(name):
            request.headers.append(name, value)
    request.headers.set_single("To", to if to is not None else invite.headers.get_first("to") or "")
    cseq = invite.cseq
    request.headers.set_single("CSeq", f"{cseq.seq if cseq else 1} {method}")
    request.headers.set_single("Max-Forwards", "70")
    return request


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
    _client: dict[tuple[str, str], ClientTransaction] = field(default_factory=dict)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen(
        self, transport_name: str, host: str, port: int, *, server_ssl: ssl.SSLContext | None = None, client_ssl: ssl.SSLContext | None = None
    ) -> SipTransport:
        """Start a transport; ``tls`` needs ``server_ssl`` (our certificate) and
        may take ``client_ssl`` (how trunks' certificates are verified)."""
        transport: SipTransport
        if transport_name == "tls":
            from pbx.sip.tls import TlsSipTransport, client_context  # it builds on _Tcp below

            transport = TlsSipTransport(local_addr=(host, port), server_ssl=server_ssl, client_ssl=client_ssl or client_context())
        else:
            transport = (_Tcp if transport_name == "tcp" else _Udp)(local_addr=(host, port))
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
            from pbx.sip.tls import TlsSipTransport

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

    def request(self, request: SipRequest, flow: Flow, on_response: ResponseHandler) -> ClientTransaction:
        """Send a request in a new client transaction; responses go to ``on_response``."""
        txn = ClientTransaction(self, request, flow, on_response)
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
        if txn is not None:
            txn.received(response)
        elif self.on_stray_response is not None:
            # A retransmitted 2xx after the transaction ended: the dialog re-ACKs it.
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
            txn: ServerTransaction = _NoTransaction(self, request, flow)
        else:
            key = (branch, method)
            existing = self._server.get(key)
            if existing is not None:
                existing.retransmission()
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


class _NoTransaction(ServerTransaction):
    """ACKs for 2xx have no transaction; handlers get a stand-in that never answers."""

    def __init__(self, stack: SipStack, request: SipRequest, flow: Flow) -> None:
        super().__init__(stack, request, flow, ("", "ACK"))
        self._terminated = True


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


class _Udp(_QuietDispatch, UdpSipTransport):
    pass


class _Tcp(_QuietDispatch, BoundedTcp):
    """SIP over TCP within the limits of :mod:`pbx.sip.tcp`; TLS subclasses it."""


def transport_kind(transport: SipTransport) -> str:
    """``tls`` for the TLS transport (it says so), else ``tcp`` or ``udp``."""
    if getattr(transport, "secure", False):
        return "tls"
    return "tcp" if transport.reliable else "udp"


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
