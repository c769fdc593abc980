"""Attended transfer by keys (``features.attended_transfer``, Asterisk's
``atxfer``): the transferor talks to the target first.

The transferor's other party goes on in a piece of its own
(:meth:`Moves.take_out`), hearing music on hold, as a transfer's caller
does, and waits there. The transferor's phone is re-INVITEd to a relay of a
new call, the *consult*, from which the target is rung directly (ringback
meanwhile; its busy and no-answer routing is not followed: someone is
talking to the transferor or nobody is, as with Asterisk's atxfer). Then:

- the transferor hangs up while talking to the target: the target moves
  into the waiting piece (:meth:`Moves.put_in`), which joins the two;
- the transferor hangs up while the target still rings: the consult is
  cancelled and the waiting piece rings the target itself, a blind transfer;
- the target is busy, does not answer or hangs up: the transferor moves
  back into the waiting piece and talks to its party again.

A number that rings nobody directly (a queue, a flow, a mailbox, a group,
the park) has nobody to consult: pbx.calls.feature_keys makes that
transfer blind. The consult call is a call
like any other: its own CDR row, the conversation's ``linked_id``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from aiosipua import SdpNegotiationError, SipResponse

from pbx.calls.bridge import Bridge, codec_of
from pbx.calls.hold import Hold
from pbx.calls.model import Answered, Call, CallState, Unreachable, call_event, new_call_id
from pbx.calls.transfer import Transfers
from pbx.config.model import Destination
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.media.srtp import SrtpSides
from pbx.media.tones import ringback
from pbx.sip.dialog import Leg, LegState
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.sdp import DTMF_PT, parse_media, plain_offer

logger = logging.getLogger(__name__)


class Placing(Protocol):
    """What a consult needs of the call service: ringing someone and bridging them."""

    ports: RtpPortPool
    clock: MediaClock
    events: EventBus
    media_ip: str

    async def dial(self, targets: Sequence[Destination], *, caller: str, offer: str, timeout: float) -> Answered | Unreachable: ...
    def connect(self, call: Call, leg: OutboundLeg, resp: SipResponse) -> bool: ...
    def hang_up(self, call: Call, disposition: str | None = None, ringing_status: int = 480) -> None: ...


class Consults:
    def __init__(self, transfers: Transfers, placing: Placing) -> None:
        self.transfers = transfers
        self.moves = transfers.moves
        self.placing = placing

    def start(self, call: Call, transferor: Leg, destination: Destination, party: str) -> None:
        """``transferor`` (extension ``party``'s phone, a party of ``call``)
        asked to talk to ``destination`` (an extension or a number outside)
        before its other party goes there."""
        bridge = call.bridge
        mine = "a" if transferor is call.a else "b"
        origin, codec = bridge.origins[mine], bridge.a_codec if mine == "a" else bridge.b_codec
        assert codec is not None
        waiting = self.moves.take_out(call, transferor, to=destination.target, outside=destination.kind == "external")
        held = waiting.bridge
        assert held.relay is not None
        held.hold.offered(held.relay.b, "inactive", bridged=True, music=held.music, moh_class=held.moh_class)
        call_event(waiting.id, "consulting", by=party, to=destination.target)
        cfg = self.moves.config()
        srtp = SrtpSides(cfg.rtp.srtp)

        async def consult() -> None:
            try:
                relay = await RtpRelay.create(self.placing.ports, self.placing.clock, self.placing.events)
            except OSError as exc:
                logger.error("call=%s no RTP port for the consult, so the transfer is blind: %s", waiting.id, exc)
                transferor.bye()
                self._blind(waiting, destination, party)
                return
            offer = origin.describe(self.placing.media_ip, relay.a.port, (codec,), DTMF_PT, crypto=srtp.offer(relay.a))
            if cfg.rtp.srtp == "optional" and transferor.flow.name != "tls":
                offer = plain_offer(offer)
            answered: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()
            transferor.reinvite(offer, lambda resp: None if answered.done() else answered.set_result(resp))
            resp = await answered
            try:
                if not 200 <= resp.status_code < 300:
                    raise SdpNegotiationError(f"re-INVITE answered {resp.status_code}")
                media = parse_media(resp.text, cfg.rtp.codecs)
                if not media.codecs or not srtp.take_answer(relay.a, media.secure, media.cryptos):
                    raise SdpNegotiationError("unusable answer")
            except SdpNegotiationError as exc:
                logger.warning("call=%s transferor cannot move to the consult, so the transfer is blind: %s", waiting.id, exc)
                relay.close()
                transferor.bye()
                self._blind(waiting, destination, party)
                return
            relay.a.set_remote(media.addr, codec_of(media.codecs[0]), media.dtmf_pt, transferor.flow.addr[0])
            relay.a.play(ringback(media.codecs[0].name), loop=True)
            consulting = Bridge(media, srtp, self.placing.media_ip, cfg.rtp.codecs, relay=relay, a_codec=media.codecs[0], music=held.music)
            consulting.origins["a"] = origin
            self._consult(waiting, transferor, destination, party, consulting)

        self.transfers.spawn(consult())

    def _consult(self, waiting: Call, transferor: Leg, destination: Destination, party: str, bridge: Bridge) -> None:
        """Ring ``destination`` for ``transferor``, whose media is ``bridge``'s side a now."""
        q = Call(
            id=new_call_id(), direction="outbound" if destination.kind == "external" else "internal", caller=party,
            callee=destination.target, a=transferor, bridge=bridge, sip_call_id=transferor.dialog.call_id,
            linked_id=waiting.linked_id, answered_at=time.time(),
        )  # fmt: skip
        q.extensions.add(party)
        self.moves.calls[q.id] = q
        self.moves.legs[transferor.key] = (q, transferor)
        self.moves.journal.open(q)
        self.moves.events.emit("call_started", call_id=q.id, direction=q.direction, from_=party, to=destination.target)
        call_event(q.id, "started", direction=q.direction, **{"from": party, "to": destination.target}, linked_id=q.linked_id, consult=waiting.id)
        hung_up = transferor.events.hangup  # the call service's: ends the call the leg is in
        transferor.events = dataclasses.replace(transferor.events, hangup=lambda _: self._transferor_left(waiting, q, destination, hung_up))
        if waiting.ended:  # the party on hold hung up meanwhile
            self.placing.hang_up(q, "cancelled")
            return

        async def ring() -> None:
            timeout = self.moves.config().sip.ring_timeout
            result = await self.placing.dial([destination], caller=party, offer=bridge.offer(), timeout=timeout)
            if isinstance(result, Unreachable):
                call_event(q.id, "consult-failed", status=result.status, disposition=result.disposition)
                self._back(waiting, q, hung_up, result.disposition)
                return
            leg, resp = result
            if self.placing.connect(q, leg, resp):
                leg.events = dataclasses.replace(leg.events, hangup=lambda _: self._back(waiting, q, hung_up))

        self.transfers.run(q, ring())

    def _transferor_left(self, waiting: Call, q: Call, destination: Destination, hung_up: Callable[[Leg], None]) -> None:
        """The transferor hung up in the consult: the transfer completes."""
        target = q.b
        q.hangup_by = "caller"
        if waiting.ended or q.ended:
            self._drop(q)
        elif target is None or q.state is not CallState.ANSWERED:
            self._drop(q)  # still ringing: the party on hold rings the target itself
            self._blind(waiting, destination, q.caller)
        else:
            self._unhold(waiting)
            target.events = dataclasses.replace(target.events, hangup=hung_up)
            self.moves.put_in(waiting, target, q, lambda: self.placing.hang_up(waiting, "failed"))

    def _back(self, waiting: Call, q: Call, hung_up: Callable[[Leg], None], disposition: str = "answered") -> None:
        """The target was not reached (the consult ends with ``disposition``)
        or left: the transferor talks to its party again."""
        transferor = q.a
        if q.b is not None and q.b.state is LegState.ANSWERED:
            q.b.bye()
        if waiting.ended or transferor.state is not LegState.ANSWERED:
            self._drop(q)
            if not waiting.ended:
                self.placing.hang_up(waiting)
            return
        self._unhold(waiting)
        transferor.events = dataclasses.replace(transferor.events, hangup=hung_up)
        self.moves.put_in(waiting, transferor, q, lambda: self.placing.hang_up(waiting, "failed"), disposition)

    def _blind(self, waiting: Call, destination: Destination, party: str) -> None:
        """The party on hold goes to the target itself, hearing ringback, as in a blind transfer."""
        self._unhold(waiting)
        relay = waiting.bridge.relay
        if relay is not None and relay.a.codec is not None:
            relay.a.play(ringback(relay.a.codec.name), loop=True)
        self.transfers.run(waiting, self.transfers.go(waiting, destination, party))

    def _drop(self, q: Call) -> None:
        """End the consult call, whose transferor has hung up or is moving."""
        if q.ended:
            return
        if q.state is CallState.RINGING:
            self.moves.end(q, "cancelled")  # its task, ringing the target, is cancelled with it
        else:
            self.placing.hang_up(q)

    def _unhold(self, waiting: Call) -> None:
        """No more music for the party on hold: someone joins it."""
        waiting.bridge.hold.end()
        waiting.bridge.hold = Hold()
