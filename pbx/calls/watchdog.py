"""Calls never hang: a call whose media stopped, or that has lasted
``sip.max_call_seconds``, is ended by the server.

A phone that vanishes (battery, Wi-Fi, a crash) sends no BYE; without this
its call would hold its ports, its agent and its recording for ever. Once a
second the watchdog looks at every answered leg's count of RTP packets
received: a leg whose count has not moved for ``rtp.timeout`` seconds
(``rtp.hold_timeout`` while the call is on hold, when silence is normal) ends
its call with reason ``rtp-timeout``; any call older than
``sip.max_call_seconds`` ends with ``max-call-seconds``. Either way the call
ends as any other the server hangs up: BYE to both sides, ``hangup=pbx``
and the reason in its CDR row, the agent freed, the recording indexed.
Counting packets at each look costs the relay nothing per packet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from pbx.calls.model import Call, call_event
from pbx.config.model import Config
from pbx.tasks import Background

logger = logging.getLogger(__name__)

LOOK_INTERVAL = 1.0  # seconds between two looks: a timeout fires up to this late


class Watchdog:
    def __init__(self, config: Callable[[], Config], calls: Mapping[str, Call], hang_up: Callable[[Call], None]) -> None:
        self.config = config
        self.calls = calls
        self.hang_up = hang_up
        self._tasks = Background("watchdog")

    def start(self) -> None:
        self._tasks.spawn(self._run())

    async def stop(self) -> None:
        await self._tasks.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LOOK_INTERVAL)
            try:
                self.look(loop.time(), time.time())
            except Exception:  # a bug in one look must not leave every later call unwatched
                logger.exception("watchdog look failed")

    def look(self, now: float, wall: float) -> None:
        """End the calls that are overdue at loop time ``now`` (wall clock ``wall``)."""
        cfg = self.config()
        for call in list(self.calls.values()):
            reason = overdue(call, cfg, now, wall)
            if reason is not None:
                self.time_out(call, reason)

    def time_out(self, call: Call, reason: str) -> None:
        """End ``call`` for ``reason`` (rtp-timeout, max-call-seconds, and
        session-expired for the session timers of pbx.calls.midcall) as the
        server ends any call, the reason in its CDR row."""
        if not call.ended:
            call.end_reason = reason
            call_event(call.id, "timeout", reason=reason)
            self.hang_up(call)


def overdue(call: Call, cfg: Config, now: float, wall: float) -> str | None:
    """Why ``call`` must end now, if it must."""
    if wall - call.started >= cfg.sip.max_call_seconds:
        return "max-call-seconds"
    relay = call.bridge.relay
    if relay is None or call.answered_at is None:
        return None
    # The caller's side once answered (by a person or by the server itself), the callee's once bridged.
    sides = (relay.a, relay.b) if call.b is not None else (relay.a,)
    limit = cfg.rtp.hold_timeout if call.bridge.on_hold else cfg.rtp.timeout
    if limit and call.bridge.silence(sides, now) >= limit:
        return "rtp-timeout"
    return None
