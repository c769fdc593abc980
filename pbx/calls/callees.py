"""A call to an extension or a ring group, step by step: forwarding and
do-not-disturb (pbx.calls.forwarding) or the group's strategy
(pbx.calls.groups) choose each step, the forks ring (pbx.calls.forks), and
when nobody answers the step's fallback chooses the next one.

The call service hands calls here and hears back through ``go`` (send the
call to a destination) and ``fail`` (end it for the caller with a status);
the call's state moves only there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pbx.calls.forks import Forks
from pbx.calls.forwarding import Forwarding
from pbx.calls.groups import RingGroups
from pbx.calls.model import Call, call_event
from pbx.calls.steps import Redirect, Refuse, Step
from pbx.config.model import Destination

Go = Callable[[Call, Destination, str | None], Awaitable[None]]  # send the call on (a number outside dialed for the party)
Fail = Callable[[Call, int, str], None]  # end it for the caller: the status, the disposition
Run = Callable[[Call, Coroutine[Any, Any, None]], None]  # run work as the call's own task


class Callees:
    """Extensions and ring groups as destinations of calls."""

    def __init__(self, forwarding: Forwarding, groups: RingGroups, *, forks: Forks, go: Go, fail: Fail, run: Run) -> None:
        self.forwarding = forwarding
        self.groups = groups
        self.forks = forks
        self.go = go
        self.fail = fail
        self.run = run

    async def ring(self, call: Call, destination: Destination) -> None:
        """Send ``call`` to ``extension:NUM`` or ``group:NAME``."""
        if destination.kind == "group":
            await self._follow(call, self.groups.route(call, destination.target))
        else:
            await self._follow(call, self.forwarding.route(call, destination.target))

    def failed(self, call: Call, status: int, disposition: str) -> None:
        """Nobody took the call: where the rung extension forwards when busy,
        not answering or not registered (by default its mailbox), or a ring
        group's next member; else end it with ``status``."""
        fallback, call.fallback = call.fallback, None
        step = fallback(disposition) if fallback is not None else None
        if step is None:
            self.fail(call, status, disposition)
            return
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        call.extensions.difference_update(ext for ext in call.rung if ext != call.caller)
        call.rung, call.fork_codes, call.early_sdp = (), [], None
        self.run(call, self._follow(call, step))

    async def _follow(self, call: Call, step: Step) -> None:
        if isinstance(step, Refuse):
            self.fail(call, step.status, step.disposition)
        elif isinstance(step, Redirect):
            call.forwards += 1
            call_event(call.id, "forwarded", reason=step.reason, destination=step.destination, by=step.by)
            await self.go(call, step.destination, step.party)
        else:
            call.fallback = step.fallback
            await self.forks.ring(call, [Destination("extension", ext) for ext in step.extensions], None, step.timeout)
