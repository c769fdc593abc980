"""The process's one media clock: a 20 ms tick that drives every stream we send.

Each tick is scheduled at an absolute loop time (``origin + n * interval``),
so lateness never accumulates into drift. When the loop falls more than
``max_lag`` ticks behind (a blocking call, a GC pause), the clock jumps to the
current tick and counts the ones it skipped instead of firing them in a burst:
a burst would reach the phones as a clump of packets, which is worse than a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

TickCallback = Callable[[int], None]


class ClockSubscription:
    """Handle returned by MediaClock.subscribe(); pass it to unsubscribe()."""

    __slots__ = ("callback",)

    def __init__(self, callback: TickCallback) -> None:
        self.callback = callback


class MediaClock:
    """Calls every subscriber with the tick number once per ``interval`` seconds."""

    def __init__(self, interval: float = 0.020, max_lag: int = 3) -> None:
        self.interval = interval
        self.max_lag = max_lag
        self.tick = 0  # number of the last tick delivered
        self.skipped = 0  # ticks jumped over because the loop was late
        self._subscriptions: dict[ClockSubscription, None] = {}  # ordered set
        # Rebuilt on (un)subscribe so a tick iterates without allocating, and a
        # callback may (un)subscribe during the tick.
        self._callbacks: tuple[TickCallback, ...] = ()
        self._origin = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, callback: TickCallback) -> ClockSubscription:
        """Call ``callback(tick)`` on every tick from the next one on."""
        handle = ClockSubscription(callback)
        self._subscriptions[handle] = None
        self._callbacks = tuple(s.callback for s in self._subscriptions)
        return handle

    def unsubscribe(self, handle: ClockSubscription) -> None:
        """Stop calling the subscriber; unknown or repeated handles are ignored."""
        if handle in self._subscriptions:
            del self._subscriptions[handle]
            self._callbacks = tuple(s.callback for s in self._subscriptions)

    def start(self) -> None:
        """Start ticking on the running loop (tick 1 comes one interval from now)."""
        if self._timer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._origin = self._loop.time() - self.tick * self.interval
        self._schedule(self.tick + 1)

    async def stop(self) -> None:
        """Stop ticking; ``start()`` resumes with the following tick numbers."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, tick: int) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_at(self._origin + tick * self.interval, self._fire, tick)

    def tick_at(self, when: float | None) -> int:
        """The tick of loop time ``when`` (a packet's arrival): the current one, or
        as many before it as whole intervals have passed since; None: the current one."""
        if when is None or self._loop is None:
            return self.tick
        return self.tick - max(0, int((self._loop.time() - when) / self.interval))

    def _fire(self, tick: int) -> None:
        assert self._loop is not None
        behind = int((self._loop.time() - self._origin) / self.interval) - tick
        if behind > self.max_lag:
            logger.warning("media clock %.0f ms late: skipping %d ticks", behind * self.interval * 1000, behind)
            tick += behind
            self.skipped += behind
        self.tick = tick
        # Next tick first, so nothing a subscriber does can stop the clock.
        self._schedule(tick + 1)
        for callback in self._callbacks:
            try:
                callback(tick)
            except Exception:
                logger.exception("media clock subscriber %r failed on tick %d", callback, tick)
