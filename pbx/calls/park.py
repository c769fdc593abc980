"""Call park: a party transferred to ``features.park`` (``70``) waits in
the lowest free slot of ``park.slots`` (71-79) with music, until someone
dials the slot or ``park.timeout`` passes.

Parking is a blind transfer (pbx.calls.transfer) whose target is the park:
the parker leaves the call as in any transfer (pbx.calls.moves), and the
party that stays goes on in a new piece whose callee is the slot, in state
``parked`` (so ``GET /api/calls`` shows it, ``to`` the slot). Before the
parker is released, it hears the slot's number in the media it still
sends to (as Asterisk says the space to the parker, then hangs it up): a
REFER's final NOTIFY comes once that is said. A parker that is gone
already (the API's transfer releases it at once) or talks SRTP, whose keys
left with it, hears nothing; the slot is in the log line
``event=parked slot=N`` and in the API.

Dialing the slot takes the call as a pickup does (pbx.calls.pickup). When
``park.timeout`` passes first, the parked party hears ringback and the
parker's extension rings again, with the extension's own routing when it
does not answer (its voicemail, by default, when it has a mailbox; else the
call ends). A slot dialed empty, or ``70`` dialed itself, gets 404.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pbx.calls.extension_states import ExtensionStates
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.moves import Moves
from pbx.calls.pickup import Pickup
from pbx.config.model import Destination
from pbx.ivr.audio import CallAudio
from pbx.media.codecs import Codec
from pbx.media.prompts import PromptLibrary, number_parts
from pbx.media.relay_side import RelaySide
from pbx.media.rtp_packet import Address
from pbx.media.tones import ringback
from pbx.sip.dialog import Leg
from pbx.sip.sdp import SdpCodec

logger = logging.getLogger(__name__)

Go = Callable[[Call, Destination, str | None], Coroutine[Any, Any, None]]  # send a call on, a number dialed for the party
Run = Callable[[Call, Coroutine[Any, Any, None]], None]  # run work as the call's own task
Answer = Callable[[Call], SdpCodec]  # answer the caller here (once); the codec it talks


@dataclass(frozen=True)
class Parker:
    """Who parked a call: its extension (None for a party outside, who is
    never rung back) and where its media went, to tell it the slot."""

    extension: str | None
    leg: Leg
    media: tuple[Address, Codec, int | None, str | None] | None  # address, codec, DTMF type, signalling IP; None: SRTP


class Parking:
    def __init__(
        self, moves: Moves, states: ExtensionStates, prompts: Callable[[], PromptLibrary], answer: Answer, go: Go, run: Run
    ) -> None:
        """``moves``: how parties move between calls (pbx.calls.moves);
        ``states``: the extensions' busy lamps; ``answer``, ``go``, ``run``: the
        call service's own. :attr:`pickup` takes a slot's call, and serves the
        pickup codes too."""
        self.config = moves.config
        self.moves = moves
        self.pickup = Pickup(moves, states)
        self.prompts = prompts
        self.answer = answer
        self.go = go
        self.run = run
        self.slots: dict[int, Call] = {}  # the calls parked now, by slot
        self._music: set[asyncio.Task[None]] = set()  # music still loading for a parked party

    def handles(self, code: str) -> bool:
        """Whether dialing ``code`` is the park's: the park itself or a slot."""
        cfg = self.config()
        return code == cfg.features.park or cfg.park.holds(code)

    def parks(self, destination: Destination) -> bool:
        """Whether a transfer to ``destination`` parks."""
        return destination == Destination("feature", self.config().features.park)

    def free_slot(self) -> int | None:
        """The lowest slot no call waits in, if any."""
        for slot, call in list(self.slots.items()):
            if call.ended:  # hung up while parked
                del self.slots[slot]
        return next((slot for slot in self.config().park.slots if slot not in self.slots), None)

    def park(self, call: Call, leaving: Leg) -> Call:
        """Park ``call``'s party other than ``leaving`` (``call`` answered and
        bridged, and :meth:`free_slot` has one): the piece it waits in.
        ``leaving`` is the caller's to release, which a REFER does once
        the piece is parked (when ``leaving`` has heard the slot)."""
        slot = self.free_slot()
        relay = call.bridge.relay
        assert slot is not None and relay is not None
        side = relay.b if leaving is call.b else relay.a  # the parker's, as the transfer moves it to side b
        media = None
        if side.remote is not None and side.codec is not None and call.bridge.srtp.crypto(side) is None:
            media = (side.remote, side.codec, side.dtmf_pt, side.signalling_ip)
        parker = Parker(self.moves.party_of(call, leaving), leaving, media)
        piece = self.moves.take_out(call, leaving, to=str(slot), outside=False)
        self.slots[slot] = piece
        self.run(piece, self._wait(piece, slot, parker))
        return piece

    async def dialed(self, call: Call, code: str) -> None:
        """``call``'s caller dialed the park or a slot: take the slot's call, or 404."""
        parked = self.slots.get(int(code)) if code.isdigit() and code != self.config().features.park else None
        if parked is None or parked.state is not CallState.PARKED:
            why = "the park takes transfers only" if code == self.config().features.park else "nothing parked there"
            call_event(call.id, "park_failed", code=code, reason=why)
            self.pickup.fail(call, 404, "unavailable")
            return
        del self.slots[int(code)]
        self._stop_music(parked)
        if not self.pickup.take(parked, call):
            self._start_music(parked)
            self.slots[int(code)] = parked

    async def _wait(self, piece: Call, slot: int, parker: Parker) -> None:
        """The parked piece's own task: music, the slot said to the parker, then ringing it again after ``park.timeout``."""
        self.answer(piece)
        self._start_music(piece)
        timeout = self.config().park.timeout
        call_event(piece.id, "parked", slot=slot, by=parker.extension or piece.transferred_by, timeout=timeout)
        await self._tell(piece, slot, parker)
        if piece.state is not CallState.RINGING:
            return
        piece.move(CallState.PARKED)  # a REFER's final NOTIFY, and the parker's release, follow
        await asyncio.sleep(timeout)
        if piece.state is not CallState.PARKED or self.slots.get(slot) is not piece:
            return
        del self.slots[slot]
        self._stop_music(piece)
        call_event(piece.id, "park_timeout", slot=slot, to=parker.extension)
        if parker.extension is None:  # a party outside is not rung
            piece.hangup_by = "pbx"
            piece.a.bye()
            self.moves.end(piece, "answered")
            return
        relay = piece.bridge.relay
        assert relay is not None
        if relay.a.codec is not None:
            relay.a.play(ringback(relay.a.codec.name), loop=True)  # until the parker's media takes over
        piece.move(CallState.RINGING)
        await self.go(piece, Destination("extension", parker.extension), None)

    async def _tell(self, piece: Call, slot: int, parker: Parker) -> None:
        """Say ``slot`` to the parker, in the stream it still hears from side b."""
        relay = piece.bridge.relay
        if parker.media is None or parker.leg.ended or relay is None:
            return
        address, codec, dtmf_pt, signalling_ip = parker.media
        side = relay.b
        side.set_remote(address, codec, dtmf_pt, signalling_ip)
        side.start_filling()  # nothing of the parked party reaches the parker meanwhile
        audio = CallAudio(side, self.prompts(), codec.name)
        try:
            await audio.play(["parked", *_number(slot)], interruptible=False)
        finally:
            audio.stop()
            _forget(side)

    def _start_music(self, call: Call) -> None:
        bridge = call.bridge
        relay = bridge.relay
        if bridge.music is not None and relay is not None and relay.a.codec is not None:
            joining = asyncio.ensure_future(bridge.music.join(bridge.moh_class, relay.a, relay.a.codec.name))
            self._music.add(joining)
            joining.add_done_callback(self._music.discard)

    def _stop_music(self, call: Call) -> None:
        relay = call.bridge.relay
        if call.bridge.music is not None and relay is not None:
            call.bridge.music.leave(relay.a)


def _forget(side: RelaySide) -> None:
    """Side b's peer (the parker) is gone: send it nothing more, until someone takes the call."""
    side.hand_over()
    if side.codec is not None:
        side.set_remote(("0.0.0.0", 0), side.codec, side.dtmf_pt)


def _number(slot: int) -> list[str]:
    """Sound names that say ``slot``: as a number up to 999, else digit by digit."""
    return number_parts(slot) if slot <= 999 else [f"digits/{digit}" for digit in str(slot)]
