"""The surveys table: one row per score a caller gave in a ``rate`` node
(the post-call survey of a queue, pbx.calls.survey), with the call, its
queue and agent.

A score is announced as the domain event ``survey_answered(call_id, queue,
agent, score)`` once its row is stored, so that whoever hears of it (the
queue's figures, metrics, the public event feed) finds the row in
``GET /api/surveys``; all of them count the same answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pbx.calls.model import call_event
from pbx.events import EventBus
from pbx.store.db import Store, iso_time
from pbx.tasks import Background


class Surveys:
    """Stores the scores callers give, and announces each."""

    def __init__(self, store: Store, events: EventBus) -> None:
        self.store = store
        self.events = events
        self._writes = Background("survey")  # rows on their way: awaited at stop, never cancelled by a hang-up

    async def answered(self, call_id: str, queue: str | None, agent: str | None, score: int) -> None:
        """Store ``score`` for the call (``queue`` and ``agent`` None for a call
        that met none), then announce it. Returns once stored; a caller who
        hangs up meanwhile does not stop the row or the event."""
        row = {"call_id": call_id, "queue": queue, "agent": agent, "score": score, "time": iso_time(time.time())}
        await asyncio.shield(self._writes.spawn(self._store(row)))

    async def _store(self, row: dict[str, Any]) -> None:
        await self.store.insert("surveys", row)
        call_event(row["call_id"], "rated", score=row["score"], queue=row["queue"], agent=row["agent"])
        self.events.emit("survey_answered", call_id=row["call_id"], queue=row["queue"], agent=row["agent"], score=row["score"])

    async def flush(self) -> None:
        """Wait for the rows on their way to the database."""
        await asyncio.gather(*self._writes, return_exceptions=True)
