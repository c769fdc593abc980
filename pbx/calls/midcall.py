"""What the legs of a call bring up once it is under way: the requests
inside their dialogs (:meth:`MidCall.in_dialog`), re-INVITEs (hold,
unhold, a new address), keys sent by SIP INFO, sessions that expired, and
the events every leg tells its call (:meth:`MidCall.leg_events`), a REFER
among them (pbx.calls.transfer's).

A re-INVITE is answered here while the server itself talks to the caller
(the IVR), else by the call's bridge for the bridged party (``Bridge.reinvite_bridged``).
Session refreshes (RFC 4028) stay with each leg (pbx.sip.session_timer):
any re-INVITE or UPDATE that gets a 2xx refreshes the leg it went over. A
leg whose session was not refreshed ends its call as the watchdog ends
calls: BYE both ways, ``hangup=pbx`` and reason ``session-expired`` in the
CDR row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiosipua import SipRequest, SipResponse

from pbx.calls.forks import Forks
from pbx.calls.model import Call
from pbx.calls.unclaimed import UnclaimedLegs
from pbx.sip.dialog import ALLOW, Leg, LegEvents, LegState
from pbx.sip.messages import info_key
from pbx.sip.methods import refuse
from pbx.sip.transactions import ServerTransaction


class MidCall:
    def __init__(
        self,
        legs: Mapping[tuple[str, str], tuple[Call, Leg]],
        unclaimed: UnclaimedLegs,
        hangup: Callable[[Leg], None],
        time_out: Callable[[Call, str], None],
        refer: Callable[[Leg, SipRequest, ServerTransaction], None],
    ) -> None:
        """``legs``: the call service's map of every leg (by dialog key) to
        its call; ``unclaimed``: the dialer's answered legs no call has yet; ``hangup``: what to do when a leg hangs up; ``time_out``:
        how the server ends a call for a reason (the watchdog's); ``refer``:
        a transfer a party asks for (pbx.calls.transfer)."""
        self.legs = legs
        self.unclaimed = unclaimed
        self.hangup = hangup
        self.time_out = time_out
        self.refer = refer

    def leg_events(self, ringing: Forks | None = None) -> LegEvents:
        """What a leg tells its call: the caller's leg (keys by INFO), or with
        ``ringing`` a callee's leg, whose forks hear it ring, answer or fail."""
        if ringing is None:
            return LegEvents(hangup=self.hangup, reinvite=self.reinvite, info=self.info, expired=self.expired, refer=self.refer)
        return LegEvents(
            progress=ringing.progress, answered=ringing.answered, failed=ringing.failed, hangup=self.hangup, reinvite=self.reinvite,
            expired=self.expired, refer=self.refer,
        )  # fmt: skip

    def in_dialog(self, request: SipRequest, txn: ServerTransaction, to_tag: str) -> None:
        """A request inside a dialog (its To has a tag): its leg's to handle,
        kept for a leg answered for no call yet, else 481 or a refusal."""
        key = (request.call_id or "", to_tag)
        found = self.legs.get(key)
        method = request.method.upper()
        if found is not None:
            found[1].in_dialog(request, txn)
        elif self.unclaimed.hold(key, request, txn):
            return
        elif method in Leg.HANDLERS:
            txn.reply(481)
        elif method != "ACK":
            refuse(txn, ALLOW)  # a method no dialog handles: that is said first (RFC 3261 §8.2.1)

    def stray_response(self, response: SipResponse) -> None:
        """A 2xx to an INVITE of ours after its first final answer (our ACK was
        lost, or another fork answered too): ACK it again, if its leg is
        still up. A leg that has ended has sent its BYE; it ACKs nothing more."""
        from_addr = response.from_addr
        found = self.legs.get((response.call_id or "", from_addr.tag if from_addr and from_addr.tag else ""))
        cseq = response.cseq
        invite = cseq is not None and cseq.method.upper() == "INVITE"
        if found is not None and found[1].state is LegState.ANSWERED and invite and 200 <= response.status_code < 300:
            found[1].ack(response)

    def call_of(self, leg: Leg) -> Call | None:
        found = self.legs.get(leg.key)
        return found[0] if found else None

    def info(self, leg: Leg, request: SipRequest) -> None:
        """DTMF by SIP INFO (application/dtmf-relay or application/dtmf) for the IVR."""
        call = self.call_of(leg)
        key = info_key(request)
        if call is not None and call.audio is not None and key is not None:
            call.audio.press(key)

    def expired(self, leg: Leg) -> None:
        """``leg``'s session was not refreshed in time, or our refresh of it
        failed (RFC 4028 §10): its call ends."""
        call = self.call_of(leg)
        if call is None:
            leg.bye()
        else:
            self.time_out(call, "session-expired")

    def reinvite(self, leg: Leg, request: SipRequest, txn: ServerTransaction) -> None:
        """A re-INVITE (hold, unhold, new address): answered here while the
        server talks to the caller, else the bridge's to handle between both legs."""
        call = self.call_of(leg)
        bridge = call.bridge if call is not None else None
        if call is None or bridge is None or bridge.relay is None or bridge.a_codec is None:
            txn.reply(491, "Request Pending")
        elif call.b is None and leg is call.a:
            bridge.reinvite_to_us(leg, request, txn)
        elif call.b is None or bridge.b_codec is None:
            txn.reply(491, "Request Pending")
        else:
            bridge.reinvite_bridged(leg, leg is call.a, request, txn)
