"""The background tasks of one service, so none is lost or forgotten.

asyncio keeps only weak references to tasks: a service holds its own, logs
the ones that fail, and at stop lets them finish for a while, then cancels
the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
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
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s task failed", self.name, exc_info=task.exception())

    async def close(self, grace: float = 0.0) -> None:
        """Give the tasks up to ``grace`` seconds to finish, then cancel the rest."""
        if grace and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
