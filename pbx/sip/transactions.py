"""SIP transactions (RFC 3261 §17): the server and client state machines
that retransmit, absorb retransmissions and time out, over the transports
of :mod:`pbx.sip.stack`, which they know only as a :class:`TransactionOwner`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from aiosipua import SipRequest, SipResponse

from pbx.sip.messages import make_response
from pbx.sip.transport import Flow, UdpTransport

logger = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
T4 = 5.0  # RFC 3261 §17.1.2.2: Timer K, how long a non-INVITE transaction absorbs retransmitted answers
TIMER_B = 64 * T1
# RFC 3261 §17.2.1: a 100 (Trying) only when the answer takes longer than this.
TRYING_DELAY = 0.2

ResponseHandler = Callable[[SipResponse], None]


class TransactionOwner(Protocol):
    """What a transaction needs of the SIP stack (:class:`pbx.sip.stack.SipStack`):
    sending on a flow, and its tables that route messages to live transactions."""

    def send_request(self, request: SipRequest, flow: Flow) -> None: ...

    def send_response(self, response: SipResponse, flow: Flow) -> None: ...

    def client_started(self, txn: ClientTransaction) -> None:
        """Route responses to ``txn`` from now on."""

    def client_ended(self, key: tuple[str, str]) -> None:
        """Stop routing responses to the client transaction of ``key``."""

    def server_ended(self, key: tuple[str, str]) -> None:
        """Stop routing requests to the server transaction of ``key``."""

    def answered(self, key: tuple[str, str], response: SipResponse, flow: Flow) -> None:
        """Answer retransmissions of the request of the ended transaction ``key`` with ``response`` for 64*T1."""


class AnsweredRequests:
    """Requests answered over UDP whose retransmissions still get the answer
    again for 64*T1 (a non-INVITE's Timer J, an accepted INVITE's Timer L of
    RFC 6026), kept as the answer's bytes alone.

    At 500 registrations a second that is 32,000 answers at any moment, and
    100 calls a second keep 3,200 INVITEs. Kept as transactions, with both
    parsed messages and a timer each, they made every full garbage collection
    walk close to a million objects and stall the event loop; as bytes they
    are a few objects each, swept by one timer."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], tuple[bytes, UdpTransport, tuple[str, int]]] = {}
        self._expiry: deque[tuple[float, tuple[str, str]]] = deque()  # in the order kept: the same linger for all
        self._sweeper: asyncio.TimerHandle | None = None

    def keep(self, key: tuple[str, str], response: SipResponse, transport: UdpTransport, dest: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self._answers[key] = (bytes(response), transport, dest)
        self._expiry.append((loop.time() + TIMER_B, key))
        if self._sweeper is None:
            self._sweeper = loop.call_later(TIMER_B, self._sweep)

    def resend(self, key: tuple[str, str]) -> bool:
        """Send the answer kept for ``key`` again; False when there is none."""
        answer = self._answers.get(key)
        if answer is None:
            return False
        raw, transport, dest = answer
        transport.send_bytes(raw, dest)
        return True

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._expiry and self._expiry[0][0] <= now:
            self._answers.pop(self._expiry.popleft()[1], None)
        self._sweeper = loop.call_later(max(self._expiry[0][0] - now, 1.0), self._sweep) if self._expiry else None

    def clear(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._answers.clear()
        self._expiry.clear()


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

    def __init__(self, stack: TransactionOwner, request: SipRequest, flow: Flow, key: tuple[str, str]) -> None:
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
        elif not self.flow.transport.reliable:
            # Timer J, or an INVITE's Timer L (RFC 6026): retransmissions of
            # the request get the answer again from its bytes alone.
            self.terminate()
            self.stack.answered(self.key, response, self.flow)
        else:
            self._schedule_end(1.0)

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
        self.stack.server_ended(self.key)


class ClientTransaction:
    """One request we sent: retransmitted over UDP, timed out after
    ``timeout`` seconds (64*T1 unless told), and (for INVITE) ACKed when the
    final answer is not a 2xx. On timeout ``on_response`` gets a 408 of our
    own, and :attr:`final_response` stays None: nothing answered."""

    def __init__(
        self, stack: TransactionOwner, request: SipRequest, flow: Flow, on_response: ResponseHandler, timeout: float = TIMER_B
    ) -> None:
        self.stack = stack
        self.request = request
        self.flow = flow
        self.on_response = on_response
        self.timeout = timeout
        self.branch = request.via[0].branch or ""
        self.key = (self.branch, request.method)
        self.final_response: SipResponse | None = None
        self._provisional = False
        self._retrans: asyncio.TimerHandle | None = None
        self._timeout: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stack.client_started(self)
        self.stack.send_request(self.request, self.flow)
        if not self.flow.transport.reliable:
            self._retrans = loop.call_later(T1, self._retransmit, T1)
        self._timeout = loop.call_later(self.timeout, self._timed_out)

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
        self.stack.client_ended(self.key)
        self.on_response(make_response(self.request, 408))

    def received(self, response: SipResponse) -> bool:
        """Take a response to the request; False for a 2xx to an INVITE
        after the first final answer (our ACK was lost, or another fork
        answered), which is the dialog's to ACK, not the transaction's
        (RFC 3261 §13.2.2.4): ``on_response`` gets one final answer only.

        It is let go with that answer, so a transaction that lingers to
        absorb repeats (64*T1 after an INVITE's non-2xx) does not keep
        whoever it called (a leg, and its call) alive that long after."""
        status = response.status_code
        invite = self.request.method == "INVITE"
        if status < 200:
            if self.final_response is None:
                self._provisional = True
                self.on_response(response)
            return True
        if invite and status >= 300:
            self._send_ack(response)
        if self.final_response is not None:
            return not (invite and status < 300)
        self.final_response = response
        self._stop()
        # Over UDP the transaction stays to absorb the answer's repeats: an
        # INVITE's non-2xx for 64*T1, ACKing each (Timer D), a non-INVITE's
        # answer for T4 (Timer K). Repeats of a 2xx are the dialog's to ACK,
        # with the transaction there or not: it ends at once.
        if self.flow.transport.reliable or (invite and status < 300):
            self.stack.client_ended(self.key)
        else:
            asyncio.get_running_loop().call_later(TIMER_B if invite else T4, self.stack.client_ended, self.key)
        on_response, self.on_response = self.on_response, _answered
        on_response(response)
        return True

    def _stop(self) -> None:
        for handle in (self._retrans, self._timeout):
            if handle is not None:
                handle.cancel()

    def _send_ack(self, response: SipResponse) -> None:
        """ACK for a non-2xx final response: same branch, To from the response (§17.1.1.3)."""
        ack = invite_sibling(self.request, "ACK", to=response.headers.get_first("to") or "")
        self.stack.send_request(ack, self.flow)


def _answered(response: SipResponse) -> None:
    """A client transaction's handler once its final answer was handled."""


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


class NoTransaction(ServerTransaction):
    """ACKs for 2xx have no transaction; handlers get a stand-in that never answers."""

    def __init__(self, stack: TransactionOwner, request: SipRequest, flow: Flow) -> None:
        super().__init__(stack, request, flow, ("", "ACK"))
        self._terminated = True
