"""Call transfers, built on :mod:`pbx.calls.moves`.

- Blind (REFER, RFC 3515, or ``POST /api/calls/{id}/transfer``): the party
  that asks leaves the call; the other one goes on in a new piece, hearing
  ringback, to wherever the target leads for the transferring party (its
  outbound rules for a number; a queue, a flow, a mailbox, a group), with
  the target's own busy and no-answer routing. The REFER is answered 202
  and its NOTIFYs say ``100 Trying``, then ``200 OK`` once someone (a
  person, or the server for a flow, queue or mailbox) takes the call, or
  why nobody did; then the transferor is released (BYE). A transfer to
  ``features.park`` parks the other party (pbx.calls.park), its slot
  said to the transferor before that ``200 OK``.
- Attended (REFER with Replaces, RFC 3891): the transferor talks to the
  target in a second call, its first party on hold. The REFER in the first
  call names the second call's dialog; the server takes the transferor out
  of both and moves the target into the first call's bridge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiosipua import SipRequest

from pbx.calls.model import Call, CallState, call_event
from pbx.calls.moves import Moves
from pbx.calls.park import Parking
from pbx.calls.routing import DialPolicy, DialRefused, asked_destination
from pbx.config.model import Config, Destination
from pbx.errors import BadRequest, CallError
from pbx.media.tones import ringback
from pbx.sip.dialog import Leg, LegState
from pbx.sip.refer import ReferSubscription, ReferTo, parse_refer_to
from pbx.sip.transactions import ServerTransaction

logger = logging.getLogger(__name__)

Go = Callable[[Call, Destination, str | None], Coroutine[Any, Any, None]]  # send a call on, a number dialed for the party
Run = Callable[[Call, Coroutine[Any, Any, None]], None]  # run work as the call's own task
Spawn = Callable[[Coroutine[Any, Any, None]], object]  # run work in the background
HangUp = Callable[[Call, str], None]

# Destinations that ring someone: the transferee hears ringback meanwhile.
RINGING_KINDS = ("extension", "external", "group")

# How a transfer failed, as its final NOTIFY says it: by the piece's CDR disposition.
FAILED_STATUS = {
    "busy": (486, "Busy Here"),
    "no-answer": (480, "Temporarily Unavailable"),
    "unavailable": (480, "Temporarily Unavailable"),
    "rejected": (603, "Decline"),
    "cancelled": (487, "Request Terminated"),
}


class NotTransferable(CallError):
    """The call cannot be transferred now: nobody is bridged in it."""

    code = "not-bridged"


class Transfers:
    def __init__(
        self,
        config: Callable[[], Config],
        moves: Moves,
        dialing: DialPolicy,
        available: Callable[[Destination], bool],
        go: Go,
        run: Run,
        spawn: Spawn,
        hang_up: HangUp,
    ) -> None:
        """``available``: whether a destination can be taken now; ``go``: the
        call service's routing; ``run``: runs a call's task; ``hang_up``: how the server ends a call."""
        self.config = config
        self.moves = moves
        self.dialing = dialing
        self.available = available
        self.legs = moves.legs
        self.go = go
        self.run = run
        self.spawn = spawn
        self.hang_up = hang_up
        self.parking: Parking | None = None  # a transfer to features.park parks the call there

    def destination(self, text: str, party: str | None, *, src: str = "-") -> Destination:
        """Where a transfer to ``text`` leads when ``party`` (an extension,
        None for a party outside) asks for it. BadRequest when it leads
        nowhere, DialRefused when ``party`` may not dial that number. A party
        outside may not send its call out again (toll fraud through a
        transfer): it may transfer to what is inside only."""
        destination = asked_destination(self.config(), text)
        if destination.kind == "external" and party is None:
            raise DialRefused("number-not-allowed", 403, f"a party outside may not transfer to {destination.target}")
        if destination.kind == "external":
            self.dialing.outbound_trunk(destination, party, src=src)
        elif not self.available(destination):
            raise BadRequest(f"{destination} does not exist")
        return destination

    def blind(self, call: Call, leaving: Leg, destination: Destination, party: str | None) -> Call:
        """Send ``call``'s other party to ``destination`` without ``leaving``:
        the new piece it goes on in. ``leaving`` is the caller's to end."""
        if call.state is not CallState.ANSWERED or call.b is None or call.bridge.relay is None:
            raise NotTransferable(f"call {call.id} is not bridged")
        if self.parking is not None and self.parking.parks(destination):
            return self.parking.park(call, leaving)  # tells ``leaving`` the slot before the piece counts as taken
        piece = self.moves.take_out(call, leaving, to=destination.target, outside=destination.kind == "external")
        relay = piece.bridge.relay
        assert relay is not None
        if destination.kind in RINGING_KINDS and relay.a.codec is not None:
            relay.a.play(ringback(relay.a.codec.name), loop=True)  # until the target's media takes over (Bridge.join)
        self.run(piece, self.go(piece, destination, party))
        return piece

    def transfer(self, call: Call, text: str, *, leaving: str = "callee", src: str = "-") -> Call:
        """Blind transfer through the API: the ``leaving`` party (``callee``
        or ``caller``) is released and the other goes to ``text``, for the
        leaving party's outbound rules. BadRequest, DialRefused or
        NotTransferable say why not."""
        if call.state is not CallState.ANSWERED or call.b is None:
            raise NotTransferable(f"call {call.id} is not bridged")
        leaving_leg = call.b if leaving == "callee" else call.a
        party = self.moves.party_of(call, leaving_leg)
        destination = self.destination(text, party, src=src)
        piece = self.blind(call, leaving_leg, destination, party)
        leaving_leg.bye()
        return piece

    # --- REFER ---

    def refer(self, leg: Leg, request: SipRequest, txn: ServerTransaction) -> None:
        """A REFER from a party of a call: blind, or with Replaces attended."""
        found = self.legs.get(leg.key)
        call = found[0] if found else None
        values = request.headers.get("refer-to") or request.headers.get("r")
        refer_to = parse_refer_to(values[0]) if len(values) == 1 else None
        if refer_to is None:
            txn.reply(400, "Bad Refer-To")
            return
        if call is None or call.state is not CallState.ANSWERED or call.b is None or leg.state is not LegState.ANSWERED:
            txn.reply(603, "Declined")
            return
        if refer_to.replaces is not None:
            self._attended(call, leg, refer_to, txn)
            return
        party = self.moves.party_of(call, leg)
        try:
            destination = self.destination(refer_to.user, party, src=leg.flow.addr[0])
        except BadRequest as exc:
            call_event(call.id, "transfer-refused", by=party, to=refer_to.user, reason=str(exc))
            txn.reply(404)
            return
        except DialRefused as exc:
            call_event(call.id, "transfer-refused", by=party, to=refer_to.user, reason=exc.code)
            txn.reply(403)
            return
        txn.reply(202)
        subscription = ReferSubscription(leg)
        subscription.progress(100, "Trying")
        piece = self.blind(call, leg, destination, party)
        self.spawn(self._report(piece, subscription, leg))

    def _attended(self, call: Call, leg: Leg, refer_to: ReferTo, txn: ServerTransaction) -> None:
        """REFER with Replaces: ``leg``'s party (the transferor) asks to join
        ``call``'s other party to whoever it talks to in the dialog named."""
        replaces = refer_to.replaces
        assert replaces is not None
        found = self.legs.get((replaces.call_id, replaces.to_tag))
        if found is None or found[1].dialog.remote_tag != replaces.from_tag:
            txn.reply(481 if found is None else 403)
            return
        other, transferor_b = found
        target = other.b if transferor_b is other.a else other.a
        if other is call or target is None or other.state is not CallState.ANSWERED or target.state is not LegState.ANSWERED:
            txn.reply(603, "Declined")
            return
        txn.reply(202)
        subscription = ReferSubscription(leg)
        subscription.progress(100, "Trying")
        number = self.moves.number_of(other, target)
        piece = self.moves.take_out(call, leg, to=number, outside=False)
        transferor_b.bye()  # its call ends as the target moves
        self.moves.put_in(piece, target, other, lambda: self.hang_up(piece, "failed"))
        self.spawn(self._report(piece, subscription, leg))

    async def _report(self, piece: Call, subscription: ReferSubscription, transferor: Leg) -> None:
        """NOTIFY the transferor how it went once the piece is taken or over, then release it."""
        ends: list[asyncio.Future[Any]] = [piece.taken, piece.done]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        status, reason = (200, "OK") if piece.taken.done() else FAILED_STATUS.get(piece.done.result(), (503, "Service Unavailable"))
        subscription.final(status, reason, transferor.bye)
