"""An INVITE with Replaces (RFC 3891): a new dialog takes the place of a
leg of an answered call, whose party is hung up, as
:mod:`pbx.calls.moves` moves parties: the other party stays on its relay
side (never re-INVITEd) and goes on in a new piece of the call, the newcomer
joins on side b with its own offer.

Who may replace a leg: an extension that authenticates (digest), or a
trunk's caller by its source network, as for any INVITE (pbx.calls.admission).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiosipua import SdpNegotiationError, SipRequest

from pbx.calls.admission import Admission
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.moves import Moves
from pbx.config.model import Config
from pbx.sip.auth import authenticate_request
from pbx.sip.dialog import InboundLeg, LegEvents, LegState
from pbx.sip.messages import address_user
from pbx.sip.refer import parse_replaces
from pbx.sip.stack import SipStack
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow

logger = logging.getLogger(__name__)


class Replacing:
    def __init__(
        self,
        config: Callable[[], Config],
        admission: Admission,
        moves: Moves,
        stack: SipStack,
        leg_events: Callable[[], LegEvents],
        hang_up: Callable[[Call, str], None],
    ) -> None:
        """``leg_events``: what a caller's leg tells the call service; ``hang_up``: how the server ends a call."""
        self.config = config
        self.admission = admission
        self.moves = moves
        self.stack = stack
        self.leg_events = leg_events
        self.hang_up = hang_up

    def invite(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        """An INVITE carrying a Replaces header: replace the leg it names, or refuse (481 when there is none)."""
        ip = flow.addr[0]
        replaces = parse_replaces(request.headers.get_first("replaces") or "")
        if replaces is None:
            txn.reply(400, "Bad Replaces")
            return
        who = self._who(request, ip, txn)
        if who is None:
            return
        number, outside = who
        found = self.moves.legs.get((replaces.call_id, replaces.to_tag))
        if found is None or found[1].dialog.remote_tag != replaces.from_tag:
            call_event(request.call_id or "", "refused", status=481, reason="replaces no dialog", **{"from": number})
            txn.reply(481)
            return
        call, replaced = found
        if call.state is not CallState.ANSWERED or call.b is None or replaced.state is not LegState.ANSWERED:
            # Replacing a dialog still ringing (pickup of an early dialog) is not done here.
            txn.reply(486 if replaces.early_only else 481)
            return
        leg = InboundLeg(self.stack, flow, request, txn, self.leg_events(), session_expires=self.config().sip.session_expires)
        piece = self.moves.take_out(call, replaced, to=number, outside=outside)
        replaced.bye()
        try:
            answer = piece.bridge.answer_b(request.text, ip)
        except SdpNegotiationError as exc:
            logger.warning("call=%s replacing INVITE from %s unusable: %s", piece.id, number, exc)
            leg.reject(488)
            self.hang_up(piece, "failed")
            return
        leg.answer(answer)
        self.moves.legs[leg.key] = (piece, leg)
        if not outside and number in self.config().extensions:
            piece.extensions.add(number)
        self.moves.bridged(piece, leg, answer)
        call_event(piece.id, "replaced", leg=replaced.dialog.call_id, by=number)

    def _who(self, request: SipRequest, ip: str, txn: ServerTransaction) -> tuple[str, bool] | None:
        """Who sends the INVITE, and whether from outside (a trunk); None once it was answered (a challenge)."""
        if self.config().trunk_for_source(ip) is not None:
            return address_user(request.headers.get_first("from")) or "anonymous", True
        admission = self.admission
        extension = authenticate_request(
            request, ip, txn, authenticator=admission.authenticator, guard=admission.guard, events=admission.events,
            passwords=admission.registrar.passwords,
        )  # fmt: skip
        return None if extension is None else (extension, False)
