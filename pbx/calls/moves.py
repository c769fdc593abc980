"""Moving a party between calls: the one mechanism behind transfers (and
parking and pickup to come).

A call is a bridge with a party on each side. Moving never re-INVITEs the
party that stays: its leg keeps its relay side (its socket, codec, keys and
the recording's tap on it), and only what is on the other side changes.

- :meth:`Moves.take_out` takes one party out of an answered call. The call
  ends there as a *piece* (its CDR row, with ``transfer_to``), and the party
  that stays goes on in a new piece: a call in state ringing whose caller,
  on side a of the same bridge, is already answered, exactly like a call
  the server places (pbx.calls.service's ``originate``). Where it goes next
  is the call service's routing (``_go``): an extension, a number, a queue,
  a flow, a mailbox, a group, with the busy and no-answer routing a direct
  call gets.
- :meth:`Moves.put_in` moves an answered party of another call onto side b
  of such a piece: its leg is re-INVITEd to the piece's relay side, and the
  call it leaves ends.

Every piece of one conversation shares the first piece's ``linked_id``; a
recording goes on in the same file, its channels following the relay sides.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, MutableMapping

from aiosipua import SdpNegotiationError, SipResponse

from pbx.calls.journal import CallJournal
from pbx.calls.model import Call, CallState, call_event, new_call_id
from pbx.config.model import Config
from pbx.events import EventBus
from pbx.sip.dialog import Leg, LegState
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.messages import uri_user
from pbx.sip.sdp import plain_offer

logger = logging.getLogger(__name__)

End = Callable[[Call, str], None]  # end a call with a CDR disposition (its legs are the caller's business)
Bridged = Callable[[Call, Leg, str], None]  # the piece's caller now talks to the leg (with this SDP answer for it)


class Moves:
    def __init__(
        self,
        config: Callable[[], Config],
        calls: MutableMapping[str, Call],
        legs: MutableMapping[tuple[str, str], tuple[Call, Leg]],
        journal: CallJournal,
        events: EventBus,
        *,
        end: End,
        bridged: Bridged,
    ) -> None:
        """``calls`` and ``legs``: the call service's maps of calls in progress
        and of every leg to its call; ``end``: how a call ends (its row
        written); ``bridged``: how a piece's caller gets bridged to a leg."""
        self.config = config
        self.calls = calls
        self.legs = legs
        self.journal = journal
        self.events = events
        self.end = end
        self.bridged = bridged

    def party_of(self, call: Call, leg: Leg) -> str | None:
        """The extension ``leg`` of ``call`` is, None for a party outside (a
        trunk's caller or callee): whose outbound rules a transfer it asks for passes."""
        outside = call.direction == "inbound" if leg is call.a else call.direction == "outbound"
        number = uri_user(leg.dialog.remote_uri)
        return None if outside or number not in self.config().extensions else number

    def number_of(self, call: Call, leg: Leg) -> str:
        """The number that names ``leg``'s party in ``call``'s row."""
        if leg is call.a:
            return call.caller
        return call.agent or self.party_of(call, leg) or call.callee

    def take_out(self, call: Call, leaving: Leg, *, to: str, outside: bool) -> Call:
        """Take ``leaving`` out of ``call`` (answered, bridged): ``call`` ends
        (answered, ``transfer_to`` ``to``) and the other party goes on in the
        returned piece, ringing, for the caller to send on (``outside``: to a
        number outside). ``leaving`` is nobody's any more: the caller ends it."""
        staying = call.b if leaving is call.a else call.a
        bridge = call.bridge
        assert staying is not None and bridge.relay is not None and call.state is CallState.ANSWERED
        who = self.number_of(call, leaving)
        number = self.number_of(call, staying)
        staying_outside = call.direction == "inbound" if staying is call.a else call.direction == "outbound"
        if leaving is call.a:
            bridge.turn()
        bridge.vacate()
        piece = Call(
            id=new_call_id(), direction="inbound" if staying_outside else "outbound" if outside else "internal", caller=number,
            callee=to, a=staying, bridge=bridge, sip_call_id=staying.dialog.call_id, linked_id=call.linked_id, transferred_by=who,
        )  # fmt: skip
        if not staying_outside and number in self.config().extensions:
            piece.extensions.add(number)
        piece.recording, piece.recordings, call.recording = call.recording, call.recordings, None
        # The bridge and its relay go on in the piece: the call that ends closes nothing of them.
        call.bridge = dataclasses.replace(bridge, relay=None)
        call.transfer_to = to
        call.hangup_by = "caller" if leaving is call.a else "callee"
        call.end_reason = "transfer"
        self.end(call, "answered")
        self.calls[piece.id] = piece
        self.legs[staying.key] = (piece, staying)
        call_event(call.id, "transferred", by=who, party=number, to=to, piece=piece.id, linked_id=call.linked_id)
        self.events.emit("call_transferred", call_id=call.id, to=to, by=who)
        self.events.emit("call_started", call_id=piece.id, direction=piece.direction, from_=number, to=to)
        call_event(piece.id, "started", direction=piece.direction, **{"from": number, "to": to}, linked_id=piece.linked_id, transferred_by=who)
        self.journal.open(piece)
        return piece

    def put_in(self, piece: Call, leg: Leg, call: Call, on_failure: Callable[[], None], disposition: str = "answered") -> None:
        """Move ``leg``, an answered party of ``call``, onto side b of
        ``piece`` (ringing, its caller's media settled): ``call`` ends with
        ``disposition`` (its other leg is the caller's to end) and ``leg`` is re-INVITEd to the
        piece's relay side, continuing our SDP towards it. ``on_failure``
        when the party cannot be moved (the re-INVITE refused): the piece
        is then the caller's to end."""
        bridge = piece.bridge
        old = call.bridge
        side = "a" if leg is call.a else "b"
        assert bridge.relay is not None and old.relay is not None and leg.state is LegState.ANSWERED
        bridge.origins["b"] = old.origins[side]
        call.transfer_to = piece.caller
        call.end_reason = "transfer"
        call.hangup_by = "pbx"
        self.legs.pop(leg.key, None)
        if isinstance(leg, OutboundLeg) and leg in call.forks:
            call.forks.remove(leg)
        if call.b is leg:
            call.b = None
        self.end(call, disposition)
        self.legs[leg.key] = (piece, leg)
        call_event(piece.id, "moving", leg=leg.dialog.call_id, from_call=call.id)

        def answered(resp: SipResponse) -> None:
            if piece.ended or leg.ended:
                return
            if not 200 <= resp.status_code < 300:
                logger.warning("call=%s %s refused to move (%d)", piece.id, leg.dialog.remote_target, resp.status_code)
                on_failure()
                return
            try:
                answer = bridge.join(resp.text, leg.flow.addr[0], piece.a.flow.addr[0])
            except SdpNegotiationError as exc:
                logger.warning("call=%s answer from %s unusable: %s", piece.id, leg.dialog.remote_target, exc)
                on_failure()
                return
            if piece.ring_timer is not None:
                piece.ring_timer.cancel()
            self.bridged(piece, leg, answer)

        offer = bridge.offer()
        if self.config().rtp.srtp == "optional" and leg.flow.name != "tls":
            offer = plain_offer(offer)  # as the dialer offers: SDES keys only over TLS
        leg.reinvite(offer, answered)
