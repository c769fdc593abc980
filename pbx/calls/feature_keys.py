"""Transfer by keys, for phones without REFER (Asterisk's ``features.conf``
``blindxfer`` and ``atxfer``).

In a bridged call, an extension's phone that presses
``features.blind_transfer`` (``##``) and then a number sends its other
party there, as a REFER would (:meth:`Transfers.blind`: ringback, the
target's own busy and no-answer routing, one ``linked_id``), and is hung
up: at once when the target rings (Asterisk's blindxfer), else once the
server took the call (a queue, a flow, a mailbox; the park says its slot).
``features.attended_transfer`` (``*2``) and a number first lets it talk to
the target while its other party hears music (:mod:`pbx.calls.consult`). The
number ends with ``#`` or when no key comes for :data:`NUMBER_TIMEOUT`; a
number that leads nowhere, or that the phone's extension may not dial,
plays ``invalid`` or ``forward-refused`` to it and the call goes on.

The keys are RFC 4733 events on the phone's relay side; keys sent by SIP
INFO in a bridged call are not taken for codes. A press that may
still begin a code is kept from the other party; once the presses so far
begin no code, or no key followed for :data:`CODE_TIMEOUT` (Asterisk's
``featuredigittimeout``), they are given back to it, late, as presses of the
server's own (:meth:`PeerStream.send_key`). So a bank's menu behind a trunk
still gets its ``#`` and ``*``, a second later; every other key passes at
once, untouched. A trunk's caller or callee has no keys here: features are
for the server's own phones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pbx.calls.consult import Consults, Placing
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.routing import DialRefused
from pbx.calls.transfer import RINGING_KINDS, Transfers
from pbx.errors import PbxError
from pbx.media.prompts import PromptLibrary, PromptNotFound
from pbx.media.relay_side import RelaySide
from pbx.sip.dialog import Leg, LegState

logger = logging.getLogger(__name__)

CODE_TIMEOUT = 1.0  # seconds a press that may begin a code is kept back (Asterisk's featuredigittimeout: 1000 ms)
NUMBER_TIMEOUT = 3.0  # seconds after the last key of a transfer's number: it is complete (Asterisk's transferdigittimeout)
KEYS = "0123456789*#ABCD"  # RFC 4733 events 0-15


class FeatureKeys:
    """Listens to the keys of the extensions' phones in bridged calls."""

    def __init__(self, transfers: Transfers, prompts: Callable[[], PromptLibrary], placing: Placing) -> None:
        """``placing``: the call service, which an attended transfer's consult call needs."""
        self.config = transfers.config
        self.transfers = transfers
        self.prompts = prompts
        self.spawn = transfers.spawn
        self.consult = Consults(transfers, placing).start

    def arm(self, call: Call) -> None:
        """``call`` is bridged (again): listen to each party that is an
        extension's phone, and to nobody else on these relay sides."""
        relay = call.bridge.relay
        if relay is None or call.b is None:
            return
        for leg, side in ((call.a, relay.a), (call.b, relay.b)):
            party = self.transfers.moves.party_of(call, leg)
            side.on_dtmf = KeyPad(self, call, leg, side, party).press if party is not None else None

    def say(self, side: RelaySide, prompt: str) -> None:
        """Play ``prompt`` to ``side``'s peer (a refusal)."""
        codec = side.codec
        if codec is None:
            return

        async def play() -> None:
            try:
                side.play(await self.prompts().frames(prompt, codec.name))
            except (PromptNotFound, RuntimeError) as exc:
                logger.error("prompt %s: %s", prompt, exc)

        self.spawn(play())


class KeyPad:
    """The keys one party of one bridged call pressed: a code being
    recognised, then a transfer's number."""

    def __init__(self, keys: FeatureKeys, call: Call, leg: Leg, side: RelaySide, party: str) -> None:
        self.keys = keys
        self.call = call
        self.leg = leg
        self.side = side
        self.party = party
        self.kept = ""  # presses kept from the other party: they may begin a code
        self.kind: str | None = None  # "blind" or "attended" once a code was pressed: its number is being dialed
        self.number = ""
        self._timer: asyncio.TimerHandle | None = None

    def press(self, key: str) -> bool:
        """A key ``leg``'s phone pressed; True keeps it from the other party."""
        if self.call.state is not CallState.ANSWERED or self.leg.state is not LegState.ANSWERED:
            return False  # the call has moved on (a transfer's piece arms its own pads)
        if self.kind is not None:
            if key == "#":
                self._dial()
            else:
                self.number += key if key.isdigit() else ""
                self._wait(NUMBER_TIMEOUT, self._dial)
            return True
        features = self.keys.config().features
        codes = {features.blind_transfer: "blind", features.attended_transfer: "attended"}
        pressed = self.kept + key
        if pressed in codes:
            self.kept, self.kind, self.number = "", codes[pressed], ""
            self._wait(NUMBER_TIMEOUT, self._dial)
            return True
        if any(code.startswith(pressed) for code in codes):
            self.kept = pressed
            self._wait(CODE_TIMEOUT, self._give_back)
            return True
        if self.kept:
            self._give_back()
            return self.press(key)  # it may begin a code itself
        return False

    def _wait(self, seconds: float, then: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, then)

    def _give_back(self) -> None:
        """The kept presses began no code: the other party gets them now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        kept, self.kept = self.kept, ""
        other = self.side.other
        if other.dtmf_pt is None or self.call.state is not CallState.ANSWERED:
            return
        for key in kept:
            other.send_key(KEYS.index(key), other.dtmf_pt)

    def _dial(self) -> None:
        """The number is complete: transfer, or say why not."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        kind, number, self.kind, self.number = self.kind, self.number, None, ""
        call, leg = self.call, self.leg
        if kind is None or call.state is not CallState.ANSWERED or leg.state is not LegState.ANSWERED:
            return
        transfers = self.keys.transfers
        try:
            if not number:
                raise DialRefused("no-number", 404, f"no number to transfer to after the {kind} transfer code")
            destination = transfers.destination(number, self.party, src=leg.flow.addr[0])
            if kind == "attended" and destination.kind in ("extension", "external"):
                self.keys.consult(call, leg, destination, self.party)
                return
            piece = transfers.blind(call, leg, destination, self.party)  # also *2 to what rings nobody to consult
        except PbxError as exc:
            call_event(call.id, "transfer-refused", by=self.party, to=number, reason=exc.code, keys=kind)
            self.keys.say(self.side, "forward-refused" if exc.code in ("number-not-allowed", "call-limit") else "invalid")
            return
        if destination.kind in RINGING_KINDS:
            leg.bye()  # as Asterisk's blindxfer: at once, while the target rings
        else:
            self.keys.spawn(_release(piece, leg))


async def _release(piece: Call, transferor: Leg) -> None:
    """Hang up the transferor once the server took the piece (a queue, a
    flow, a mailbox, the park, which says its slot to the transferor first)."""
    ends: list[asyncio.Future[Any]] = [piece.taken, piece.done]
    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    transferor.bye()
