"""What each extension is doing, as a busy lamp shows it: idle, ringing,
calling out, or in a call.

An extension's phones are in calls through legs: the legs the dialer rings
its contacts with (for a call, a queue, a click-to-call), and the leg of each
call its phone places. Whoever makes such a leg hands it to
:meth:`ExtensionStates.track`; from then on every state change of the leg
(pbx.sip.dialog's ``Leg.on_state``) updates the extension's state, and each
time that changes an ``extension_state`` event says so: the ``dialog`` event
package (pbx.sip.blf) turns it into NOTIFYs for busy lamps.

Events: ``extension_state(extension, state, direction, remote)`` with
``state`` one of RFC 4235's dialog states: ``terminated`` (idle), ``early``
(ringing, or calling out while the other end rings) or ``confirmed`` (in a
call); ``direction`` ``initiator`` or ``recipient`` (None when idle);
``remote`` the number of the other party (None when idle).
"""

from __future__ import annotations

from dataclasses import dataclass

from pbx.events import EventBus
from pbx.sip.dialog import Leg, LegState


@dataclass(frozen=True)
class ExtensionState:
    """An extension's one state that its lamp shows."""

    state: str = "terminated"  # terminated | early | confirmed (RFC 4235 §3.7.1)
    direction: str | None = None  # initiator: it placed the call; recipient: it is called
    remote: str | None = None  # the number at the other end

    @property
    def rank(self) -> int:
        """Which state shows when an extension is in several calls: ringing
        first (so a lamp offers the call to whoever can pick it up), then in
        a call, then calling out."""
        if self.state == "early":
            return 3 if self.direction == "recipient" else 1
        return 2 if self.state == "confirmed" else 0


IDLE = ExtensionState()


@dataclass(frozen=True)
class _Party:
    """Whose leg it is, and who is on its other end."""

    extension: str
    direction: str
    remote: str


class ExtensionStates:
    def __init__(self, events: EventBus) -> None:
        self._events = events
        # Per extension, its legs that ring or talk now, by rank (index rank -
        # 1), each rank's in the order they got there: those that entered
        # EARLY or ANSWERED and have not ended. A leg that never got so far
        # (refused at once, never started) never shows. The first leg of the
        # highest rank shows, so an extension in many calls costs no more.
        self._legs: dict[str, tuple[dict[Leg, ExtensionState], ...]] = {}
        self._states: dict[str, ExtensionState] = {}

    def track(self, leg: Leg, extension: str, direction: str, remote: str) -> None:
        """Count ``leg`` for ``extension`` from now on: a leg ringing one of
        its phones (``recipient``), or the leg of a call its phone placed
        (``initiator``); ``remote`` is the number at the other end."""
        party = _Party(extension, direction, remote)
        leg.on_state = lambda changed: self._changed(changed, party)

    def of(self, extension: str) -> ExtensionState:
        return self._states.get(extension, IDLE)

    def _changed(self, leg: Leg, party: _Party) -> None:
        extension = party.extension
        ranks = self._legs.get(extension)
        if ranks is None:
            ranks = self._legs[extension] = ({}, {}, {})
        for legs in ranks:
            legs.pop(leg, None)
        if leg.state in (LegState.EARLY, LegState.ANSWERED):
            state = ExtensionState("confirmed" if leg.state is LegState.ANSWERED else "early", party.direction, party.remote)
            ranks[state.rank - 1][leg] = state
        now = next((next(iter(legs.values())) for legs in reversed(ranks) if legs), IDLE)
        if now == IDLE:
            del self._legs[extension]
        if now == self.of(extension):
            return
        if now == IDLE:
            self._states.pop(extension, None)
        else:
            self._states[extension] = now
        self._events.emit("extension_state", extension=extension, state=now.state, direction=now.direction, remote=now.remote)
