"""A supervisor listening in on a bridged call (``POST /api/calls/{id}/monitor``):
``listen`` (hears both parties, neither hears it), ``whisper`` (the agent
hears it too, the customer does not) or ``barge`` (all three hear each other).

The server rings the supervisor's extension as a call it places (direction
``monitor``, showing ``monitor-<call id>`` as the caller, its CDR row's
``to`` the id of the call listened to), so that call has everything any call
has: its row, its place in ``GET /api/calls`` (``DELETE`` ends it), the
watchdog, session timers, hold, the supervisor counted busy. Once the
supervisor answers, the call service hands that call here (:meth:`Monitors.attend`,
which makes it ``answered``, with nobody on its bridge's side b)
and the media of both calls meet in a :class:`~pbx.media.mixer.Mixer`: its
inputs are what the customer, the agent and (unless it only listens) the
supervisor say; the supervisor's side gets customer and agent mixed, and in
whisper and barge the agent's side (and in barge the customer's) gets the
mix of the other two instead of the plain relay. Whoever is not spoken to
keeps the relay as it was (the customer in whisper: the agent's voice is
still relayed packet by packet).

The customer is side a of the call's bridge, the agent side b; for calls the
server placed (callbacks, click-to-call: its first phone is the agent) the
other way round, as recordings have them. The supervisor hanging up ends its
call alone: the parties' media are as before (a side the server has sent
frames to keeps relaying in its own stream). The call listened to ending
(a transfer ends its piece too) hangs the supervisor up. One monitor per
call at a time: two supervisors whispering into one agent would need a
mixer both share, and nobody asked for one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pbx.calls.control import CallControl
from pbx.calls.model import Call, CallState, Unreachable, call_event, new_call_id
from pbx.config.model import Config, Destination
from pbx.errors import CallError
from pbx.media.mixer import Mixer
from pbx.sip.outbound_leg import OutboundLeg

logger = logging.getLogger(__name__)

MODES = ("listen", "whisper", "barge")
MONITOR = "monitor"  # the direction of a supervisor's call (CDR, metrics), and the kind of its destination

Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]


@dataclass(eq=False)
class Monitor:
    """One supervisor listening in on ``call``; ``id`` is the supervisor's call's."""

    id: str
    call: Call  # the call listened to
    extension: str  # the supervisor's
    mode: str


class Monitors:
    """The monitors ringing or under way, by the id of the supervisor's call."""

    def __init__(self, calls: CallControl, config: Callable[[], Config], spawn: Spawn) -> None:
        self.calls = calls
        self.config = config
        self.spawn = spawn
        self.by_id: dict[str, Monitor] = {}

    def check(self, call: Call) -> None:
        """CallError (409) when ``call`` cannot be listened in on now: it is
        not bridged (``not-bridged``) or already is (``already-monitored``)."""
        if call.state is not CallState.ANSWERED or call.b is None or call.bridge.relay is None:
            raise CallError(f"call {call.id} is not bridged", code="not-bridged")
        if any(monitor.call is call for monitor in self.by_id.values()):
            raise CallError(f"call {call.id} is already monitored", code="already-monitored")

    def start(self, call: Call, extension: str, mode: str) -> Monitor:
        """Ring ``extension`` to listen in on ``call`` in ``mode``; returns at
        once, the ringing goes on. CallError as :meth:`check` says."""
        if mode not in MODES:
            raise ValueError(f"unknown monitor mode {mode!r}")  # the API's schema refuses it first
        self.check(call)
        monitor = Monitor(new_call_id(), call, extension, mode)
        self.by_id[monitor.id] = monitor
        self.spawn(self._ring(monitor))
        call_event(call.id, "monitor", monitor=monitor.id, extension=extension, mode=mode)
        return monitor

    async def _ring(self, monitor: Monitor) -> None:
        """Place the supervisor's call; stop ringing when the call listened to ends first."""
        ringing = asyncio.ensure_future(
            self.calls.originate(
                monitor.extension,
                Destination(MONITOR, monitor.call.id),
                caller_id=f"{MONITOR}-{monitor.call.id}",
                timeout=self.config().sip.ring_timeout,
                direction=MONITOR,
                call_id=monitor.id,
            )
        )
        first: list[asyncio.Future[Any]] = [ringing, monitor.call.done]
        result: Call | Unreachable | None = None
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ringing.done():
                ringing.cancel()  # its row says cancelled
                await asyncio.wait([ringing])
            if ringing.done() and not ringing.cancelled() and ringing.exception() is None:
                result = ringing.result()
            if isinstance(result, Call):  # the monitor lasts as long as the supervisor's call
                result.done.add_done_callback(lambda _: self.by_id.pop(monitor.id, None))
            else:
                self.by_id.pop(monitor.id, None)
        if isinstance(result, Unreachable) or ringing.cancelled():
            reason = result.disposition if isinstance(result, Unreachable) else "the call ended first"
            logger.info("call=%s monitor %s: %s was not reached (%s)", monitor.call.id, monitor.id, monitor.extension, reason)
        elif result is None:
            ringing.result()  # its error, for the log of failed tasks

    async def attend(self, own: Call) -> None:
        """The supervisor answered ``own``, the call placed to it: let it hear
        (and speak, by its mode) until either call ends. The call service runs
        this as ``own``'s task, which it cancels when ``own`` ends."""
        monitor = self.by_id.get(own.id)
        listened = monitor.call if monitor is not None else None
        if monitor is None or listened is None or listened.ended or listened.bridge.relay is None or own.bridge.relay is None:
            self.calls.hang_up(own, "answered")
            return
        own.move(CallState.ANSWERED)
        relay = listened.bridge.relay
        customer, agent = (relay.b, relay.a) if isinstance(listened.a, OutboundLeg) else (relay.a, relay.b)
        supervisor = own.bridge.relay.a
        mixer = Mixer()
        mixer.add_input("customer", customer)
        mixer.add_input("agent", agent)
        mixer.add_output(supervisor, ("customer", "agent"))
        if monitor.mode != "listen":
            mixer.add_input("supervisor", supervisor)
            mixer.add_output(agent, ("customer", "supervisor"))
        if monitor.mode == "barge":
            mixer.add_output(customer, ("agent", "supervisor"))
        call_event(listened.id, "monitored", monitor=own.id, extension=monitor.extension, mode=monitor.mode)
        try:
            await asyncio.wait([listened.done])  # not awaited directly: cancelling us must not cancel it
        finally:
            mixer.close()  # the relay's sides live on in a transfer's next piece: they go back to relaying
            call_event(listened.id, "unmonitored", monitor=own.id)
        self.calls.hang_up(own, "answered")
