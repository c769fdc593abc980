"""Ringing the callee of a call: one leg per registered contact (or one to
a trunk), early media and 180s passed to the caller, the ring timeout. The
first leg to answer joins the caller in the call's bridge and the others get
CANCEL; when none does, the call service hears why."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiosipua import SdpNegotiationError, SipResponse

from pbx.calls.dialer import Dialer
from pbx.calls.model import Call, CallState, Unreachable, outcome
from pbx.config.model import Config, Destination
from pbx.sip.dialog import InboundLeg, Leg, LegEvents
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.messages import uri_user

logger = logging.getLogger(__name__)

Bridged = Callable[[Call, OutboundLeg, str], None]  # the call's caller now talks to the leg (with this SDP answer)
Failed = Callable[[Call, int, str], None]  # nobody took the call: the status for the caller, the disposition


class Forks:
    def __init__(
        self,
        config: Callable[[], Config],
        dialer: Dialer,
        legs: dict[tuple[str, str], tuple[Call, Leg]],
        leg_events: Callable[[], LegEvents],
        bridged: Bridged,
        failed: Failed,
    ) -> None:
        """``legs``: the call service's map of every leg (by dialog key) to its
        call, kept up to date here for forks; ``leg_events``: what a fork tells the call service."""
        self.config = config
        self.dialer = dialer
        self.legs = legs
        self.leg_events = leg_events
        self.bridged = bridged
        self.callee_failed = failed

    async def ring(self, call: Call, destinations: Sequence[Destination], party: str | None, timeout: float | None = None) -> None:
        """Ring extensions (every contact of each) or a number outside (dialed
        for ``party``) at once for ``call``'s caller, for ``timeout`` seconds
        (default ``sip.ring_timeout``); when none answers, the call service
        hears why (``call.fallback`` may know where the call goes then)."""
        legs: list[OutboundLeg] = []
        unreachable: list[Unreachable] = []
        for destination in destinations:
            try:
                legs += await self.dialer.make_legs(call.caller, destination, call.bridge.offer(), self.leg_events(), party)
            except Unreachable as exc:
                unreachable.append(exc)
        if call.ended:
            return
        if not legs:
            dispositions = {exc.disposition for exc in unreachable}
            if len(dispositions) == 1:
                self.callee_failed(call, unreachable[0].status, dispositions.pop())
            else:
                self.callee_failed(call, *outcome([exc.status for exc in unreachable]))
            return
        call.fork_codes += [exc.status for exc in unreachable]
        call.rung = tuple(d.target for d in destinations if d.kind == "extension")
        call.extensions.update(call.rung)
        for leg in legs:
            call.forks.append(leg)
            self.legs[leg.key] = (call, leg)
            leg.start()
        call.ring_timer = asyncio.get_running_loop().call_later(timeout or self.config().sip.ring_timeout, self._no_answer, call)

    def _call_of(self, leg: Leg) -> Call | None:
        found = self.legs.get(leg.key)
        return found[0] if found else None

    def progress(self, leg: Leg, resp: SipResponse) -> None:
        call = self._call_of(leg)
        if call is None or call.state is not CallState.RINGING:
            return
        if resp.body and call.early_sdp is None:
            try:
                call.early_sdp = call.bridge.join(resp.text, leg.flow.addr[0], call.a.flow.addr[0])
            except SdpNegotiationError as exc:
                logger.info("call=%s ignoring early media: %s", call.id, exc)
        if not isinstance(call.a, InboundLeg):
            return
        if call.early_sdp is not None:
            call.a.ring(call.early_sdp)
        elif not call.ringing_sent:
            call.a.ring()
        call.ringing_sent = True

    def answered(self, leg: Leg, resp: SipResponse) -> None:
        call = self._call_of(leg)
        assert isinstance(leg, OutboundLeg)
        if call is None or call.state is not CallState.RINGING:
            leg.bye()
            return
        try:
            answer = call.bridge.join(resp.text, leg.flow.addr[0], call.a.flow.addr[0])
        except SdpNegotiationError as exc:
            logger.warning("call=%s callee's answer unusable: %s", call.id, exc)
            leg.bye()
            self.failed(leg, 488, None)
            return
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        for other in call.forks:
            if other is not leg:
                other.cancel()
                self.legs.pop(other.key, None)
        # Of a ring group, only the member who answered stays in the call.
        call.extensions.difference_update(ext for ext in call.rung if ext not in (uri_user(leg.dialog.remote_uri), call.caller))
        call.rung, call.fallback = (), None
        self.bridged(call, leg, answer)

    def failed(self, leg: Leg, code: int, resp: SipResponse | None) -> None:
        call = self._call_of(leg)
        if call is None:
            return
        self.legs.pop(leg.key, None)
        if leg in call.forks:
            call.forks.remove(leg)
        call.fork_codes.append(code)
        if call.state is not CallState.RINGING or call.forks:
            return
        if call.b is None and call.direction == "outbound" and code in (401, 407):
            logger.warning("call=%s trunk refused our credentials (%d)", call.id, code)
        self.callee_failed(call, *outcome(call.fork_codes))

    def _no_answer(self, call: Call) -> None:
        if call.state is not CallState.RINGING:
            return
        for leg in call.forks:
            leg.cancel()
            self.legs.pop(leg.key, None)
        call.forks = []
        self.callee_failed(call, 480, "no-answer")
