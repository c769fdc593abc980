"""The call journal: a call's CDR row exists from the moment the call is
accepted until it ends, and a heartbeat says until when the server was alive.

A process that dies (power cut, SIGKILL, OOM) cannot finish its calls' rows;
the next one closes each row left open as ``interrupted`` at the last time
the dead process was known alive, so billing and queue figures keep the call.
Every write also moves the heartbeat forward in the same transaction, taking
the time on the store's thread after the call's own times were taken: the
heartbeat is never older than any time a row holds, so an interrupted call
never ends before it started or was answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

from sqlite_utils import Database

from pbx.calls.cdr import log_ended, open_row
from pbx.calls.model import Call
from pbx.events import EventBus
from pbx.store.db import Store, iso_time
from pbx.tasks import Background

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


class CallJournal:
    """Writes calls' rows as they go; closes those a dead process left open.

    Writes are committed in the order they are asked for, so a call's end
    never overtakes its opening; the end writes the whole row, opened or not.
    The writes asked for while one transaction commits go together in the
    next (group commit): at 100 calls a second, three commits a call each
    waiting for its fsync kept the store's thread busy and the calls' 200s
    waiting behind each other.
    """

    def __init__(self, store: Store, events: EventBus) -> None:
        self.store = store
        self.events = events
        self._writes = Background("journal")
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing: dict[str, asyncio.Task[None]] = {}
        self._pending: list[tuple[str, dict[str, Any], asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Close the rows a dead process left open, then keep the heartbeat; before serving."""
        rows: list[dict[str, Any]] = await self.store.run(self._close_open)
        for row in rows:
            log_ended(row)
            self.events.emit("call_interrupted", call_id=row["call_id"], direction=row["direction"])
        if rows:
            logger.warning("closed %d calls cut by the previous process's end as interrupted", len(rows))
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        """Let the rows being written finish (a few seconds at most), then stop the heartbeat."""
        await self._writes.close(grace=5)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    def open(self, call: Call) -> asyncio.Future[None]:
        """Store ``call``'s row as in progress; await the future before confirming anything to its caller.
        A call the server placed has a row from before it rang (:meth:`placed`): this completes it."""
        return self._write_soon("upsert", open_row(call))

    async def placed(self, call_id: str, direction: str, caller: str, callee: str, started: float) -> None:
        """Store the row of a call the server is about to place, and return once it is committed."""
        row = {"call_id": call_id, "direction": direction, "from_number": caller, "to_number": callee, "started": iso_time(started)}
        await self._write_soon("upsert", row)

    def answered(self, call: Call) -> None:
        if call.answered_at:
            self._write_soon("update", {"call_id": call.id, "answered": iso_time(call.answered_at)}, awaited=False)

    def close(self, row: dict[str, Any]) -> None:
        """Store a call's final row, then log ``event=ended``; :meth:`stored` awaits it."""
        task = self._writes.spawn(self._close(row))
        self._closing[row["call_id"]] = task
        task.add_done_callback(lambda _: self._closing.pop(row["call_id"], None))

    async def stored(self, call_id: str) -> None:
        """Return once the final row of ``call_id`` (if it is being written) is committed."""
        task = self._closing.get(call_id)
        if task is not None:
            await asyncio.shield(task)

    async def _close(self, row: dict[str, Any]) -> None:
        await self._write_soon("upsert", row)
        log_ended(row)

    async def _beat(self) -> None:
        while True:
            await self.store.run(self._write, [])
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def _write_soon(self, how: str, row: dict[str, Any], *, awaited: bool = True) -> asyncio.Future[None]:
        """Queue ``row`` to be written ``how`` in the next transaction; the
        future is done once it is committed (``awaited``: someone will look)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((how, row, done if awaited else None))
        if self._writer is None:
            self._writer = self._writes.spawn(self._write_pending())
        return done

    async def _write_pending(self) -> None:
        """Commit what is queued, one transaction for all that waited, until nothing is."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self.store.run(self._write, [(how, row) for how, row, _ in batch])
                except Exception as exc:
                    logger.exception("call journal: %d rows not written", len(batch))
                    for *_, done in batch:
                        if done is not None and not done.done():
                            done.set_exception(exc)
                    continue
                for *_, done in batch:
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            self._writer = None

    def _write(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """On the store's thread: each row written as it says, with the heartbeat, in one transaction."""
        db = self.store.db
        with db.conn:
            db.execute("insert or replace into heartbeat (id, time) values (1, ?)", [iso_time(time.time())])
            for how, row in rows:
                _write_row(db, how, row)

    def _close_open(self) -> list[dict[str, Any]]:
        """On the store's thread: every row without an end, closed as ``interrupted``."""
        db = self.store.db
        beat = next(db["heartbeat"].rows_where("id = 1"), None)
        closed = []
        with db.conn:
            for row in list(db["cdr"].rows_where("ended is null")):
                times = [t for t in (beat and beat["time"], row["started"], row["answered"]) if t]
                ended = max(times)
                row.update(
                    ended=ended, disposition="interrupted", duration=round(_seconds(ended, row["started"]), 3),
                    billsec=round(_seconds(ended, row["answered"]), 3) if row["answered"] else 0.0,
                )  # fmt: skip
                db.table("cdr").update(row["call_id"], row)
                closed.append(row)
        return closed


def _write_row(db: Database, how: str, row: dict[str, Any]) -> None:
    """``row`` into ``cdr``: an ``update`` of some columns, or an ``upsert`` of the row.
    Plain SQL: sqlite-utils' upsert reads the table's schema on every call, 2 ms of CPU a call at 100 calls/s."""
    columns = [column for column in row if column != "call_id"]
    if how == "update":
        assignments = ", ".join(f"[{column}] = ?" for column in columns)
        db.execute(f"update cdr set {assignments} where call_id = ?", [*(row[c] for c in columns), row["call_id"]])
    else:
        names, marks = ", ".join(f"[{column}]" for column in row), ", ".join("?" * len(row))
        updates = ", ".join(f"[{column}] = excluded.[{column}]" for column in columns)
        db.execute(f"insert into cdr ({names}) values ({marks}) on conflict(call_id) do update set {updates}", list(row.values()))


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()
