"""Call legs: one SIP dialog each, seen from the server (RFC 3261 §12-§15).

An :class:`InboundLeg` is a dialog a peer opened with us (we are its UAS); an
:class:`~pbx.sip.outbound_leg.OutboundLeg` is one we opened (we are its UAC). Both are explicit state
machines: every change goes through :meth:`Leg._enter`, which refuses a
transition that the table does not allow. Each runs its own session timer
with its peer (:mod:`pbx.sip.session_timer`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from aiosipua import (
    Dialog,
    SipMessage,
    SipRequest,
    SipResponse,
    create_dialog_from_request,
    stringify_uri,
)

from pbx.sip.messages import make_response
from pbx.sip.methods import allow_header, refuse
from pbx.sip.session_timer import SessionTimer, listed
from pbx.sip.stack import SipStack
from pbx.sip.transactions import T1, T2, TIMER_B, ClientTransaction, ServerTransaction
from pbx.sip.transport import Flow

logger = logging.getLogger(__name__)


class LegState(enum.Enum):
    CALLING = "calling"  # outbound: INVITE sent, nothing back yet
    INCOMING = "incoming"  # inbound: INVITE received
    EARLY = "early"  # a provisional response went out or came in
    ANSWERED = "answered"
    ENDED = "ended"


_ALLOWED: dict[LegState, set[LegState]] = {
    LegState.CALLING: {LegState.EARLY, LegState.ANSWERED, LegState.ENDED},
    LegState.INCOMING: {LegState.EARLY, LegState.ANSWERED, LegState.ENDED},
    LegState.EARLY: {LegState.EARLY, LegState.ANSWERED, LegState.ENDED},
    LegState.ANSWERED: {LegState.ENDED},
    LegState.ENDED: set(),
}


class InvalidTransition(RuntimeError):
    def __init__(self, leg: Leg, new: LegState) -> None:
        super().__init__(f"leg {leg.dialog.call_id} cannot go from {leg.state.value} to {new.value}")


@dataclass
class LegEvents:
    """What a leg tells its call. Each callback gets the leg first."""

    progress: Callable[[Leg, SipResponse], None] = lambda leg, resp: None
    answered: Callable[[Leg, SipResponse], None] = lambda leg, resp: None
    failed: Callable[[Leg, int, SipResponse | None], None] = lambda leg, code, resp: None
    hangup: Callable[[Leg], None] = lambda leg: None
    reinvite: Callable[[Leg, SipRequest, ServerTransaction], None] = lambda leg, req, txn: None
    info: Callable[[Leg, SipRequest], None] = lambda leg, req: None
    expired: Callable[[Leg], None] = lambda leg: None  # its session was not refreshed (RFC 4028)
    refer: Callable[[Leg, SipRequest, ServerTransaction], None] = lambda leg, req, txn: txn.respond(make_response(req, 603))  # RFC 3515


class Leg:
    """What both kinds of leg share: the dialog, its flow, in-dialog requests."""

    def __init__(self, stack: SipStack, flow: Flow, dialog: Dialog, events: LegEvents, session_expires: int = 0) -> None:
        self.stack = stack
        self.flow = flow
        self.dialog = dialog
        self.events = events
        self.state = LegState.CALLING
        self._ok: SipResponse | None = None  # our 2xx to an INVITE, until its ACK
        self._ok_timer: asyncio.TimerHandle | None = None
        self.timer = SessionTimer(session_expires, self._refresh_session, self._session_expired)
        self.sdp: str | None = None  # our SDP as last agreed: what a refreshing re-INVITE offers again
        self.peer_allows_update = False  # its Allow lists UPDATE: refreshes need no SDP
        # Told of every state change after the first (busy lamps: pbx.calls.extension_states).
        self.on_state: Callable[[Leg], None] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.dialog.call_id, self.dialog.local_tag)

    @property
    def ended(self) -> bool:
        return self.state is LegState.ENDED

    def _enter(self, new: LegState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(self, new)
        self.state = new
        if self.on_state is not None:
            self.on_state(self)

    def _finish(self) -> None:
        if self.state is not LegState.ENDED:
            self._enter(LegState.ENDED)
            self.dialog.terminate()
            self.timer.end()

    def new_request(self, method: str, body: str | None = None) -> SipRequest:
        request = self.dialog.create_request(
            method,
            via_host=self.stack.advertised_host,
            via_port=self.stack.local_port(self.flow.transport),
            via_transport=self.flow.name.upper(),
        )
        request.headers.set_single("User-Agent", self.stack.user_agent)
        refreshes = method in ("INVITE", "UPDATE")  # target refreshes, and session refreshes (RFC 4028)
        self._stamp(request, body, contact=refreshes)
        for name, value in (self.timer.request_headers() if refreshes else {}).items():
            request.headers.set_single(name, value)
        return request

    def _stamp(self, msg: SipMessage, body: str | None, *, contact: bool) -> None:
        """Our Contact and Allow (for dialog-forming messages) and an SDP body."""
        if contact:
            msg.headers.set_single("Contact", f"<{self.stack.contact_uri(self.flow)}>")
            msg.headers.set_single("Allow", ALLOW)
        if body is not None:
            msg.text = body
            msg.headers.set_single("Content-Type", "application/sdp")

    def answer_reinvite(self, txn: ServerTransaction, body: str) -> None:
        """200 OK with our new SDP to a re-INVITE this leg received, retransmitted
        over UDP until the ACK; it refreshes the session."""
        response = make_response(txn.request, 200, to_tag=self.dialog.local_tag, headers=self.timer.answer(txn.request))
        self._stamp(response, body, contact=True)
        self.sdp = body
        self._send_ok(txn, response)

    def _send_ok(self, txn: ServerTransaction, ok: SipResponse) -> None:
        """Send our 2xx to an INVITE. Over UDP the core, not the transaction,
        repeats it (RFC 3261 §13.3.1.4) at T1, 2*T1, ... up to T2 until the
        ACK; without one in 64*T1 the leg's peer is taken for gone."""
        if self._ok_timer is not None:
            self._ok_timer.cancel()
        self._ok = ok
        txn.respond(ok)
        if not self.flow.transport.reliable:
            self._retransmit_ok(T1, 0.0)

    def _retransmit_ok(self, interval: float, elapsed: float) -> None:
        def fire() -> None:
            if self._ok is None or self.ended:
                return
            if elapsed + interval >= TIMER_B:
                logger.warning("no ACK for 200 OK on %s; ending the call", self.dialog.call_id)
                self._ok = None
                self.events.hangup(self)  # as if it had hung up: its call ends, BYE included
                return
            self.stack.send_response(self._ok, self.flow)
            self._retransmit_ok(min(interval * 2, T2), elapsed + interval)

        self._ok_timer = asyncio.get_running_loop().call_later(interval, fire)

    def send(self, method: str, body: str | None = None, on_response: Callable[[SipResponse], None] | None = None) -> ClientTransaction:
        return self.stack.request(self.new_request(method, body), self.flow, on_response or (lambda r: None))

    def bye(self) -> None:
        """Hang up an answered leg (BYE); the far end's answer does not matter."""
        if self.state is LegState.ANSWERED:
            self.send("BYE")
        self._finish()

    def drop(self, status: int) -> None:
        """Hang up whatever the state: BYE once answered, else a final
        ``status`` (a caller's INVITE) or CANCEL (a leg we are ringing)."""
        if self.state is LegState.ANSWERED:
            self.bye()
        else:
            self._give_up(status)

    def _give_up(self, status: int) -> None:
        """End the leg before it was answered (each side knows how)."""

    def reinvite(self, body: str, on_answer: Callable[[SipResponse], None]) -> None:
        """Send a re-INVITE with a new offer; ``on_answer`` gets the final
        response. Its 2xx refreshes the session."""

        def answered(resp: SipResponse) -> None:
            if resp.status_code < 200:
                return
            if resp.status_code < 300:
                self.ack(resp)
                self.sdp = body
                self.timer.follow(resp)
            on_answer(resp)

        self.send("INVITE", body, answered)

    def _refresh_session(self, on_answer: Callable[[SipResponse], None], by_invite: bool) -> None:
        """Refresh the session (RFC 4028 §10): an UPDATE without a body when
        the peer allows UPDATE (unless ``by_invite``), else a re-INVITE that offers
        our SDP as last agreed, byte for byte, so its o= version says nothing changed."""
        if self.state is not LegState.ANSWERED:
            return
        if (self.peer_allows_update and not by_invite) or self.sdp is None:
            self.send("UPDATE", on_response=on_answer)
        else:
            self.reinvite(self.sdp, on_answer)

    def _session_expired(self) -> None:
        if self.state is LegState.ANSWERED:
            logger.warning("session %s with %s expired (%d s)", self.dialog.call_id, self.dialog.remote_target, self.timer.interval)
            self.events.expired(self)

    def ack(self, resp: SipResponse) -> None:
        """ACK a 2xx: a new transaction-less request with the INVITE's CSeq number."""
        cseq = resp.cseq
        ack = self.dialog.create_request(
            "ACK",
            via_host=self.stack.advertised_host,
            via_port=self.stack.local_port(self.flow.transport),
            via_transport=self.flow.name.upper(),
        )
        self.dialog.local_cseq -= 1  # ACK does not consume a CSeq number
        ack.headers.set_single("CSeq", f"{cseq.seq if cseq else 1} ACK")
        self.stack.send_request(ack, self.flow)

    def in_dialog(self, request: SipRequest, txn: ServerTransaction) -> None:
        """A request inside this dialog: an ACK, or what :attr:`HANDLERS` has
        for its method; any other method gets 405 or 501 and changes nothing."""
        method = request.method.upper()
        if method == "ACK":
            self._acked()
            return
        handler = self.HANDLERS.get(method)
        if handler is None:
            refuse(txn, ALLOW)
            return
        cseq = request.cseq
        if cseq is not None:
            if self.dialog.remote_cseq and cseq.seq <= self.dialog.remote_cseq:
                txn.reply(500, "CSeq out of order")
                return
            self.dialog.remote_cseq = cseq.seq
        if method in ("INVITE", "UPDATE") and (brief := self.timer.too_brief(request)) is not None:
            txn.reply(422, headers={"Min-SE": str(brief)})  # a session refresh below our Min-SE (RFC 4028)
            return
        handler(self, request, txn)

    def _bye(self, request: SipRequest, txn: ServerTransaction) -> None:
        txn.reply(200)
        was_active = not self.ended
        self._finish()
        if was_active:
            self.events.hangup(self)

    def _reinvited(self, request: SipRequest, txn: ServerTransaction) -> None:
        if self.state is not LegState.ANSWERED:
            txn.reply(491, "Request Pending")
            return
        self._retarget(request)
        txn.to_tag = self.dialog.local_tag
        self.events.reinvite(self, request, txn)

    def _info(self, request: SipRequest, txn: ServerTransaction) -> None:
        txn.reply(200)
        self.events.info(self, request)

    def _options(self, request: SipRequest, txn: ServerTransaction) -> None:
        txn.reply(200, headers={"Allow": ALLOW, "Accept": "application/sdp"})

    def _retarget(self, request: SipRequest) -> None:
        """A target refresh request's Contact is where the peer is from now on."""
        contact = request.contact
        if contact:
            self.dialog.remote_target = stringify_uri(contact[0].uri)

    def _update(self, request: SipRequest, txn: ServerTransaction) -> None:
        """An UPDATE (RFC 3311). Without a body it refreshes the session (RFC
        4028); an SDP offer gets 488: offers after the answer come by
        re-INVITE here, the one request the call answers offers in."""
        if request.body:
            txn.reply(488, "Not Acceptable Here")
            return
        self._retarget(request)
        headers = self.timer.answer(request) if self.state is LegState.ANSWERED else {}
        response = make_response(request, 200, to_tag=self.dialog.local_tag, headers=headers)
        self._stamp(response, None, contact=True)
        txn.respond(response)

    def _acked(self) -> None:
        """An ACK for our 2xx: stop repeating it."""
        self._ok = None
        if self._ok_timer is not None:
            self._ok_timer.cancel()

    # The requests a dialog handles, by method (ACK and CANCEL go with their
    # INVITE): the one list that ALLOW, and with it every Allow header and the
    # 405 to any other method, is made of. A method is handled by adding it here.
    HANDLERS: ClassVar[dict[str, Callable[[Leg, SipRequest, ServerTransaction], None]]] = {
        "INVITE": _reinvited,
        "BYE": _bye,
        "OPTIONS": _options,
        "INFO": _info,
        "UPDATE": _update,
        "REFER": lambda leg, request, txn: leg.events.refer(leg, request, txn),
    }


# The methods a dialog allows, as every dialog-forming message and every refusal lists them.
DIALOG_METHODS = ("INVITE", "ACK", "CANCEL", *Leg.HANDLERS)
ALLOW = allow_header(DIALOG_METHODS)


def invite_key(request: SipRequest) -> tuple[str | None, str | None, int | None]:
    """What makes two INVITEs the same request (RFC 3261 §8.2.2.2): Call-ID, From tag and CSeq."""
    from_addr, cseq = request.from_addr, request.cseq
    return request.call_id, from_addr.tag if from_addr else None, cseq.seq if cseq else None


class InboundLeg(Leg):
    """A dialog a peer opened by sending us an INVITE."""

    def __init__(
        self, stack: SipStack, flow: Flow, invite: SipRequest, txn: ServerTransaction, events: LegEvents, session_expires: int = 0
    ) -> None:
        """``session_expires``: the session interval we want (sip.session_expires; 0: no session timer)."""
        super().__init__(stack, flow, create_dialog_from_request(invite), events, session_expires)
        self.state = LegState.INCOMING
        self.invite = invite
        self.invite_key = invite_key(invite)  # parsed once: every new INVITE is compared with it
        self.txn = txn
        self.peer_allows_update = "UPDATE" in listed(invite, "allow")
        txn.to_tag = self.dialog.local_tag

    def _response(
        self, status: int, reason: str | None = None, body: str | None = None, headers: dict[str, str] | None = None
    ) -> SipResponse:
        resp = make_response(self.invite, status, reason, to_tag=self.dialog.local_tag, headers=headers)
        self._stamp(resp, body, contact=100 < status < 300)
        return resp

    def ring(self, body: str | None = None) -> None:
        """180 Ringing, or 183 Session Progress when there is early media."""
        if self.state not in (LegState.INCOMING, LegState.EARLY):
            return
        self._enter(LegState.EARLY)
        self.txn.respond(self._response(183 if body else 180, body=body))

    def answer(self, body: str) -> None:
        """200 OK with our SDP answer, retransmitted over UDP until the ACK;
        the session timer starts as the caller asked and we agree."""
        self._enter(LegState.ANSWERED)
        self.dialog.confirm()
        self.sdp = body
        self._send_ok(self.txn, self._response(200, body=body, headers=self.timer.answer(self.invite)))

    def reject(self, status: int, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        if self.state in (LegState.ANSWERED, LegState.ENDED):
            return
        self.txn.respond(self._response(status, reason, headers=headers))
        self._finish()

    def _give_up(self, status: int) -> None:
        self.reject(status)

    def cancelled(self) -> None:
        """The caller sent CANCEL before we answered: 487 to the INVITE."""
        self.reject(487)

    def _finish(self) -> None:
        self._acked()
        super()._finish()
