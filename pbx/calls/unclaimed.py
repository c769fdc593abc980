"""Legs the dialer got answered that no call has taken yet, and the
requests their phones send in that moment.

Between a leg's 200 and the call that takes it (a queue's agent, a
consult's target, the first phone of a callback) lie a few awaits. A phone
that hangs up at once sends its BYE right after its ACK, and the BYE can
arrive in that gap: answered 481 there, the phone thought the call over and
the server kept it up. So a request for such a leg waits until a call takes
the leg (:meth:`UnclaimedLegs.claim`) and is then handled as if it had come
just after; one that no call takes within :data:`HOLD` goes to the leg alone.
"""

from __future__ import annotations

import asyncio
import weakref

from aiosipua import SipRequest

from pbx.sip.dialog import Leg
from pbx.sip.transactions import ServerTransaction

HOLD = 2.0  # seconds a request waits for its leg's call


class UnclaimedLegs:
    def __init__(self) -> None:
        # Weak: a leg no call took and nobody holds any more drops out by itself.
        self._legs: weakref.WeakValueDictionary[tuple[str, str], Leg] = weakref.WeakValueDictionary()
        self._held: dict[tuple[str, str], list[tuple[SipRequest, ServerTransaction]]] = {}

    def add(self, leg: Leg) -> None:
        """``leg`` rings for no call yet: its requests wait for :meth:`claim`."""
        self._legs[leg.key] = leg

    def hold(self, key: tuple[str, str], request: SipRequest, txn: ServerTransaction) -> bool:
        """Keep ``request`` for the unclaimed leg of dialog ``key``; False when there is none."""
        leg = self._legs.get(key)
        if leg is None:
            return False
        held = self._held.setdefault(key, [])
        held.append((request, txn))
        if len(held) == 1:
            asyncio.get_running_loop().call_later(HOLD, self.claim, leg)
        return True

    def claim(self, leg: Leg) -> None:
        """A call has ``leg`` now (with its own events): what its phone sent meanwhile is handled."""
        self._legs.pop(leg.key, None)
        for request, txn in self._held.pop(leg.key, []):
            leg.in_dialog(request, txn)
