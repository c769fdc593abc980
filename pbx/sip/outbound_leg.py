"""The legs we open: an INVITE we send to a phone or through a trunk (we are
the dialog's UAC), with what only that side does: CANCEL while it rings,
answering a provider's digest challenge, offering again without SRTP on a
488 or with a longer session interval on a 422 (pbx.sip.dialog has what
both sides of a leg share)."""

from __future__ import annotations

import logging

from aiosipua import (
    Dialog,
    DialogState,
    SipResponse,
    generate_call_id,
    generate_tag,
    stringify_uri,
)

from pbx.sip.credentials import Credentials
from pbx.sip.dialog import Leg, LegEvents, LegState
from pbx.sip.session_timer import listed
from pbx.sip.stack import SipStack
from pbx.sip.transactions import invite_sibling
from pbx.sip.transport import Flow

logger = logging.getLogger(__name__)


class OutboundLeg(Leg):
    """A dialog we open by sending an INVITE (to a phone or through a trunk)."""

    def __init__(
        self,
        stack: SipStack,
        flow: Flow,
        *,
        request_uri: str,
        from_uri: str,
        to_uri: str,
        from_name: str | None,
        body: str,
        events: LegEvents,
        auth: Credentials | None = None,
        fallback_offer: str | None = None,
        session_expires: int = 0,
    ) -> None:
        """``fallback_offer``: sent in a new INVITE once if ``body`` gets 488
        (an SRTP offer to a phone that does no SRTP); ``session_expires``: the
        session interval we offer (sip.session_expires; 0: no session timer)."""
        dialog = Dialog(
            call_id=generate_call_id(stack.advertised_host),
            local_tag=generate_tag(),
            local_uri=from_uri,
            remote_uri=to_uri,
            remote_target=request_uri,
            state=DialogState.EARLY,
        )
        super().__init__(stack, flow, dialog, events, session_expires)
        self.offer = body  # sent again when the INVITE is retried with credentials
        self.fallback_offer = fallback_offer
        self.from_name = from_name
        self.auth = auth
        self._auth_tries = 0
        self._cancel_wanted = False
        self._provisional_seen = False

    def start(self) -> None:
        self._send_invite(None)

    def _send_invite(self, credentials: tuple[str, str] | None) -> None:
        request = self.new_request("INVITE", self.offer)
        if self.from_name:
            request.headers.set_single("From", f'"{self.from_name}" <{self.dialog.local_uri}>;tag={self.dialog.local_tag}')
        if credentials is not None:
            request.headers.set_single(*credentials)
        self._invite = request
        self.stack.request(request, self.flow, self._on_response)

    def cancel(self) -> None:
        """Stop ringing: CANCEL once the far end has answered provisionally (RFC 3261 §9.1)."""
        if self.state in (LegState.CALLING, LegState.EARLY):
            if self._provisional_seen:
                self._send_cancel()
            else:
                self._cancel_wanted = True
        if self.state is not LegState.ANSWERED:
            self._finish()

    def _give_up(self, status: int) -> None:
        self.cancel()

    def _send_cancel(self) -> None:
        self.stack.request(invite_sibling(self._invite, "CANCEL"), self.flow, lambda r: None)

    def _on_response(self, resp: SipResponse) -> None:
        status = resp.status_code
        to = resp.to_addr
        if to is not None and to.tag and not self.dialog.remote_tag and 100 < status < 300:
            self.dialog.remote_tag = to.tag
        if status < 200:
            self._provisional_seen = True
            if self._cancel_wanted:
                self._cancel_wanted = False
                self._send_cancel()
                return
            if status == 100:
                return
            if self.state in (LegState.CALLING, LegState.EARLY):
                self._enter(LegState.EARLY)
                self.events.progress(self, resp)
            return
        if status < 300:
            self._on_2xx(resp)
            return
        if status in (401, 407) and self.auth is not None and self._auth_tries == 0 and not self.ended:
            credentials = self.auth.answer(resp, "INVITE", self._invite.uri)
            if credentials is not None:
                self._auth_tries += 1
                self._send_invite(credentials)
                return
        if status == 488 and self.fallback_offer is not None and not self.ended:
            # As FreeSWITCH does when optional SRTP is refused: offer again, plainly.
            logger.info("%s refused our offer (488); offering it again without SRTP", self.dialog.remote_target)
            self.offer, self.fallback_offer = self.fallback_offer, None
            self._invite_again()
            return
        if status == 422 and not self.ended and self.timer.raise_to(resp):
            logger.info("%s wants a longer session interval (422); asking for %d s", self.dialog.remote_target, self.timer.wanted)
            self._invite_again()
            return
        if not self.ended:
            self._finish()
            self.events.failed(self, status, resp)

    def _invite_again(self) -> None:
        """A new INVITE after a final refusal, outside the early dialog it ended."""
        self.dialog.remote_tag = ""
        self._auth_tries = 0
        self._provisional_seen = False
        self._send_invite(None)

    def _on_2xx(self, resp: SipResponse) -> None:
        """The INVITE's first final answer, a 2xx (the ones after it are
        the dialog's to ACK again: :meth:`MidCall.stray_response`)."""
        contact = resp.contact
        if contact:
            self.dialog.remote_target = stringify_uri(contact[0].uri)
        self.dialog.route_set = list(reversed(resp.headers.get("record-route")))
        self.dialog.confirm()
        self.ack(resp)
        if self.ended:
            # Answered after we gave up on it (CANCEL crossed the 200): hang up.
            self.state = LegState.ANSWERED
            self.bye()
            return
        self._enter(LegState.ANSWERED)
        self.sdp = self.offer
        self.peer_allows_update = "UPDATE" in listed(resp, "allow")
        self.timer.follow(resp)
        self.events.answered(self, resp)
