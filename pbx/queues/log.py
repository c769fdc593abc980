"""The queue_log table: one row per thing that happened in a queue (a caller
entering, an offer, an answer, an agent logging in, a callback dialed), in
the order it happened."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from pbx.store.db import Store, iso_time
from pbx.tasks import Background

logger = logging.getLogger(__name__)


class QueueLog:
    """Writes queue_log rows, and reads back what agents did."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._writes = Background("queue log")  # rows on their way: awaited, never cancelled

    def write(
        self,
        queue: str,
        event: str,
        *,
        call_id: str | None = None,
        agent: str | None = None,
        then: str | None = None,
        warn: bool = False,
        **data: Any,
    ) -> None:
        """One queue_log row, written in order by the store's single thread;
        ``then`` is logged (as a warning with ``warn``) once the row is stored,
        so whoever reads the log line finds the row."""
        row = {
            "time": iso_time(time.time()),
            "queue": queue,
            "call_id": call_id,
            "agent": agent,
            "event": event,
            "data": json.dumps(data) if data else None,
        }
        self._writes.spawn(self._write(row, then, logging.WARNING if warn else logging.INFO))

    async def _write(self, row: dict[str, Any], then: str | None, level: int) -> None:
        await self.store.insert("queue_log", row)
        if then:
            logger.log(level, "%s", then)

    async def agent_actions(self) -> list[dict[str, Any]]:
        """Every login, logout, pause and unpause ever logged, oldest first."""
        return await self.store.rows("queue_log", "event in ('login', 'logout', 'pause', 'unpause') order by id")

    async def flush(self) -> None:
        """Wait for the rows on their way to the database."""
        await asyncio.gather(*self._writes, return_exceptions=True)
