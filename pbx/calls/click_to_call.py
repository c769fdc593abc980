"""Click-to-call: the server rings an extension, and once it answers, rings
a destination for it (``POST /api/calls``, pbx.calls.http).

Until the ``from`` extension answers, a click-to-call is a :class:`Placing`
here (state ``originating`` in the API); from then on it is a call of the
call service under the same id, with direction ``click-to-call``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pbx.calls.control import CallControl
from pbx.calls.journal import CallJournal
from pbx.calls.model import Unreachable
from pbx.config.model import Config, Destination
from pbx.tasks import Background

logger = logging.getLogger(__name__)

CLICK_TO_CALL = "click-to-call"  # the direction of such calls (CDR, metrics)


@dataclass
class Placing:
    """A click-to-call whose ``from`` extension is still ringing."""

    id: str
    from_ext: str
    to: str
    destination: Destination
    started: float


class ClickToCalls:
    """Click-to-call requests until their ``from`` extension answers; from
    then on the call is the call service's, under the same id."""

    def __init__(self, calls: CallControl, journal: CallJournal, config: Callable[[], Config]) -> None:
        self.calls = calls
        self.journal = journal
        self.config = config
        self.placing: dict[str, Placing] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background = Background("click-to-call")

    async def start(self, from_ext: str, to: str, destination: Destination) -> Placing:
        """Ring ``from_ext`` to connect it to ``destination``; returns once the call's row is stored."""
        placing = Placing(f"c2c-{uuid.uuid4().hex[:16]}", from_ext, to, destination, time.time())
        self.placing[placing.id] = placing  # from now on `from_ext` counts as ringing
        try:
            await self.journal.placed(placing.id, CLICK_TO_CALL, from_ext, destination.target, placing.started)
        except BaseException:
            del self.placing[placing.id]
            raise
        self._tasks[placing.id] = self._background.spawn(self._originate(placing))
        logger.info("click-to-call %s: ringing %s to connect it to %s", placing.id, from_ext, destination)
        return placing

    def ringing(self, extension: str) -> bool:
        """Whether a click-to-call is ringing ``extension`` as its ``from``."""
        return any(placing.from_ext == extension for placing in self.placing.values())

    async def _originate(self, placing: Placing) -> None:
        try:
            result = await self.calls.originate(
                placing.from_ext,
                placing.destination,
                caller_id=placing.destination.target or placing.to,
                timeout=self.config().sip.ring_timeout,
                direction=CLICK_TO_CALL,
                call_id=placing.id,
                party=placing.from_ext,  # a number outside is dialed for `from`, by its class of service
            )
        finally:
            self.placing.pop(placing.id, None)
            self._tasks.pop(placing.id, None)
        if isinstance(result, Unreachable):
            logger.info("click-to-call %s: %s was not reached (%s)", placing.id, placing.from_ext, result.disposition)

    async def cancel(self, placing_id: str) -> bool:
        """Stop ringing the ``from`` extension of a click-to-call, and return
        once that is done (its CDR row on its way); False when there is no such one."""
        task = self._tasks.get(placing_id)
        if task is None:
            return False
        self.placing.pop(placing_id, None)
        task.cancel()
        await asyncio.wait([task])
        return True

    async def close(self) -> None:
        await self._background.close()
