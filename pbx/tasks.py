"""The background tasks of one service, so none is lost or forgotten.

asyncio keeps only weak references to tasks: a service holds its own, logs
the ones that fail, and at stop lets them finish for a while, then cancels
the rest. :class:`Shared` runs a load once for everyone who wants it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


class Background:
    """Tasks spawned by the service called ``name`` (used in log lines)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn[T](self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        """The tasks still running."""
        return iter(list(self._tasks))

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            _let_go(task)
        elif task.exception() is not None:
            logger.error("%s task failed", self.name, exc_info=task.exception())

    async def close(self, grace: float = 0.0) -> None:
        """Give the tasks up to ``grace`` seconds to finish, then cancel the rest."""
        if grace and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _let_go(task: asyncio.Task[Any]) -> None:
    """Drop the CancelledError a cancelled task keeps (asking for the result
    hands it over). Its traceback holds the task's frames, whose locals
    (a call, its legs) hold the task: kept, the cycle left a whole call to
    the garbage collector's full collections, the server's longest pauses."""
    try:
        task.result()
    except asyncio.CancelledError:
        pass


class Shared:
    """Loads in progress, by key: one run of the load for every caller awaiting it meanwhile."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def run[T](self, key: Hashable, start: Callable[[], Awaitable[T]]) -> T:
        """Run ``start()`` unless a run for ``key`` is in progress, and await its result.

        A caller that is cancelled (its caller hung up) does not cancel the
        load for the others; the result is theirs to use or to cache.
        """
        task = self._running.get(key)
        if task is None:
            task = self._running[key] = asyncio.ensure_future(start())
            task.add_done_callback(lambda t: self._done(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if task.cancelled():
            _let_go(task)
        else:
            task.exception()  # retrieved: callers that went away must not leave it "never retrieved"
