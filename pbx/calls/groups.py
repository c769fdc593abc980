"""Ring groups: ``group:NAME`` rings the group's members, and when nobody
answers the call goes to the group's ``on_fail``.

- ``ringall``: every member's phones at once for ``ring_timeout`` seconds;
  the first to answer gets the call, the others stop ringing.
- ``hunt``: the members one after another, in the order listed, each for
  ``ring_timeout`` seconds (as FreePBX's hunt gives each member the group's
  ring time); a member that is busy, rejects or is not registered is passed
  at once.

Members in do-not-disturb or in their ``max_calls`` calls are skipped, and
so is the caller. A member's own forwarding is not followed: a group rings
people, not where they sent their calls. ``on_fail`` counts as a forward
(pbx.calls.forwarding.MAX_FORWARDS), so a group that fails over to itself
or to a group failing back rings a few rounds, not forever.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from pbx.calls.forwarding import Forwarding
from pbx.calls.model import Call
from pbx.calls.steps import Refuse, Ring, Step
from pbx.config.model import Config, Group


class RingGroups:
    """The ``groups`` of the running config."""

    def __init__(self, config: Callable[[], Config], forwarding: Forwarding) -> None:
        self.config = config
        self.forwarding = forwarding

    def route(self, call: Call, name: str) -> Step:
        """The first step of ``call`` to ``group:NAME``."""
        group = self.config().groups.get(name)
        if group is None:  # a reload removed it while the call came
            return Refuse(404, "failed")
        if group.strategy == "hunt":
            step = self._hunt(call, group, 0)
        else:
            free = tuple(m for m in group.members if self._free(call, m))
            step = Ring(free, group.ring_timeout, lambda failed: self._failed(call, group, failed)) if free else self._failed(call, group, "busy")
        return step or Refuse(486, "busy")

    def _hunt(self, call: Call, group: Group, start: int, disposition: str = "busy") -> Step | None:
        """Ring the first free member from ``start`` on; after the last, ``on_fail``
        (``disposition``: how the last member rung failed)."""
        for index in range(start, len(group.members)):
            if self._free(call, group.members[index]):
                return Ring((group.members[index],), group.ring_timeout, functools.partial(self._hunt, call, group, index + 1))
        return self._failed(call, group, disposition)

    def _failed(self, call: Call, group: Group, disposition: str) -> Step | None:
        """Nobody answered: ``on_fail``, placed as the server's own call (None: the caller gets the failure)."""
        return self.forwarding.redirect(call, None, group.on_fail, disposition, f"group:{group.name}")

    def _free(self, call: Call, member: str) -> bool:
        return member != call.caller and not self.forwarding.dnd(member) and not self.forwarding.busy(member)
