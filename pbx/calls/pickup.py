"""Call pickup: answering, from one's own phone, a call that rings someone else.

``features.pickup`` (``*8``) takes the oldest call ringing an extension of
the caller's ``pickup_group`` (its own calls aside); ``features.directed_pickup``
followed by an extension (``**1002``) takes the oldest call ringing that
extension. The caller's INVITE for the code is not answered for a feature
of its own: its leg joins the ringing call on side b of that call's bridge
with its own offer (as an INVITE with Replaces joins in pbx.calls.replaces),
the ringing legs get CANCEL, and the call goes on as if the picker had
answered it: the caller is answered, recording starts, the CDR row says
``picked_up_by``. The picker's own call (the code it dialed) ends there,
``answered`` with ``reason`` ``pickup``. With nothing ringing, the code gets
404 (as a number that leads nowhere does), which phones show at once.

:meth:`Pickup.take` is also how a parked call is taken from its slot
(pbx.calls.park): the same join, from a call that waits with music instead
of ringing.
"""

from __future__ import annotations

import logging
import time

from aiosipua import SdpNegotiationError

from pbx.calls.extension_states import ExtensionStates
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.moves import Moves
from pbx.sip.dialog import InboundLeg, LegState

logger = logging.getLogger(__name__)


class Pickup:
    def __init__(self, moves: Moves, states: ExtensionStates) -> None:
        """``moves``: the call service's calls and legs, and how a call ends or
        gets bridged (pbx.calls.moves); ``states``: the extensions' busy lamps."""
        self.config = moves.config
        self.calls = moves.calls
        self.legs = moves.legs
        self.end = moves.end
        self.bridged = moves.bridged
        self.states = states

    def fail(self, call: Call, status: int, disposition: str) -> None:
        """End ``call``, whose caller's INVITE is not answered yet, with ``status``."""
        call.a.drop(status)
        self.end(call, disposition)

    def handles(self, code: str) -> bool:
        """Whether dialing ``code`` picks up a call."""
        return self.config().features.picks_up(code)

    async def pick(self, call: Call, code: str) -> None:
        """``call``'s caller dialed a pickup code: join it to the oldest call
        ringing the extensions the code names, or refuse it (404)."""
        cfg = self.config()
        features = cfg.features
        if code == features.pickup:
            own = cfg.extensions.get(call.caller)
            group = own.pickup_group if own is not None else None
            targets = {number for number, ext in cfg.extensions.items() if group is not None and ext.pickup_group == group}
        else:
            targets = {code[len(features.directed_pickup) :]}
        targets.discard(call.caller)
        waiting = self.ringing(targets)
        if waiting is None:
            call_event(call.id, "pickup_failed", code=code, reason="nothing rings")
            self.fail(call, 404, "unavailable")
            return
        self.take(waiting, call)

    def ringing(self, extensions: set[str]) -> Call | None:
        """The oldest call ringing one of ``extensions`` now, if any."""
        ringing = [
            c for c in self.calls.values() if c.state is CallState.RINGING and c.forks and extensions.intersection(c.rung)
        ]  # fmt: skip
        return min(ringing, key=lambda c: c.started, default=None)

    def take(self, waiting: Call, taker: Call) -> bool:
        """Join the caller of ``taker`` (a call not yet answered, whose INVITE
        carries an offer) to ``waiting`` on side b, as whoever answers it;
        ``taker`` ends there. False (and ``taker`` refused) when the offer
        cannot meet ``waiting``'s media (488), or ``taker`` is no new call
        (404: a party transferred to the code)."""
        leg = taker.a
        if not isinstance(leg, InboundLeg) or leg.state is LegState.ANSWERED:
            call_event(taker.id, "pickup_failed", code=taker.callee, reason="not a new call")
            self.fail(taker, 404, "unavailable")
            return False
        bridge = waiting.bridge
        assert bridge.relay is not None
        caller_sdp = ""
        if isinstance(waiting.a, InboundLeg) and waiting.a.state is not LegState.ANSWERED:
            _, caller_sdp = bridge.answer_here(waiting.a.flow.addr[0])  # the ringing caller's codec settles here
        try:
            answer = bridge.answer_b(leg.invite.text, leg.flow.addr[0])
        except SdpNegotiationError as exc:
            logger.warning("call=%s offer of %s unusable to take it: %s", waiting.id, taker.caller, exc)
            self.fail(taker, 488, "failed")
            return False
        self._stop_ringing(waiting)
        who = taker.caller
        self.states.track(leg, who, "recipient", waiting.caller)
        leg.answer(answer)
        # The code's own call ends: its leg goes on in ``waiting``.
        taker.answered_at = taker.answered_at or time.time()
        taker.transfer_to, taker.end_reason, taker.hangup_by = waiting.caller, "pickup", "pbx"
        self.end(taker, "answered")
        self.legs[leg.key] = (waiting, leg)
        waiting.extensions.add(who)
        waiting.picked_up_by = who
        call_event(waiting.id, "picked_up", by=who, state=waiting.state.value, code=taker.callee, from_call=taker.id)
        self.bridged(waiting, leg, caller_sdp)
        return True

    def _stop_ringing(self, call: Call) -> None:
        """CANCEL the legs ringing for ``call``; nobody it rang is in it any more,
        and no fallback (forwarding, a group's next member) follows."""
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        for fork in call.forks:
            self.legs.pop(fork.key, None)  # so that its 487 is nobody's failure
            fork.cancel()
        call.extensions.difference_update(ext for ext in call.rung if ext != call.caller)
        call.forks, call.rung, call.fallback = [], (), None
