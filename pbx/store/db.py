"""The one SQLite database (CONTRACT §6), reached through a single worker thread.

Every read and write runs on one dedicated thread so the event loop never
blocks on disk and SQLite never sees two threads on one connection.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

logger = logging.getLogger(__name__)


def iso_time(ts: float) -> str:
    """A Unix time as the database and the API write times: UTC ISO 8601 to the millisecond."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")

SCHEMA: dict[str, tuple[dict[str, type], str | tuple[str, ...]]] = {
    "registrations": (
        {
            "extension": str,
            "contact": str,
            "source": str,
            "transport": str,
            "expires_at": float,
            "user_agent": str,
            "call_id": str,
        },
        ("extension", "contact"),
    ),
    "cdr": (
        {
            "call_id": str,
            "direction": str,
            "from_number": str,
            "to_number": str,
            "started": str,
            "answered": str,
            "ended": str,
            "disposition": str,  # one of pbx.calls.model.DISPOSITIONS
            "duration": float,
            "billsec": float,
            "queue": str,  # the queue the call waited in (or the callback's queue)
            "agent": str,  # the queue agent who took it
            "wait": float,  # seconds in the queue before an agent answered or the caller left
            "sip_call_id": str,  # the SIP Call-ID of the caller's INVITE; call_id is the server's own id
            "hangup": str,  # who hung up: caller | callee | pbx
            "reason": str,  # why the server did: rtp-timeout (no media), max-call-seconds, transfer
            # A transferred call is one row per piece (pbx.calls.moves): every piece has the
            # first piece's call_id as linked_id; transferred_by is who sent this piece's
            # caller here, transfer_to where the caller went when this piece ended.
            "linked_id": str,
            "transferred_by": str,
            "transfer_to": str,
            "picked_up_by": str,  # the extension that answered it by pickup (*8, **NUM) or from its park slot
        },
        "call_id",
    ),
    # One row (id 1): the last time the server's process was known alive, for
    # closing the calls a dead process left open (pbx.calls.journal).
    "heartbeat": ({"id": int, "time": str}, "id"),
    "callbacks": (
        {
            "id": str,
            "queue": str,
            "number": str,
            "entered": float,  # the caller's arrival in the queue: the callback's place in line
            "requested": str,
            "status": str,  # pending | completed | failed | cancelled
            "attempts": int,
            "next_attempt": float,
            "call_id": str,
            "ended": str,
            "message": str,  # voicemail work (pbx.queues.voicemail_work): the voicemail row's id; NULL for a callback asked for
        },
        "id",
    ),
    "recordings": (
        {
            "id": str,  # the call id
            "call_id": str,
            "queue": str,
            "agent": str,
            "caller": str,
            "callee": str,
            "started": str,
            "seconds": float,
            "bytes": int,
            "channels": int,
            "path": str,  # relative to storage.data_dir
        },
        "id",
    ),
    "voicemail": (
        {
            "id": str,
            "mailbox": str,
            "caller": str,
            "received": str,
            "seconds": float,
            "heard": int,  # 0: new (INBOX), 1: old
            "path": str,  # relative to storage.data_dir
            "email": str,  # "": none wanted, "pending": to send, "sent", "failed" (file gone)
            "handled": str,  # a queue's mailbox: when an agent heard it and its caller was called back; NULL until then
        },
        "id",
    ),
    "queue_log": (
        {"id": int, "time": str, "queue": str, "call_id": str, "agent": str, "event": str, "data": str},
        "id",
    ),
    # One row per score a caller gave in a rate node (the post-call survey, pbx.queues.surveys).
    "surveys": (
        {
            "id": int,
            "call_id": str,
            "queue": str,  # the queue the call waited in; NULL for a call that met none
            "agent": str,  # the agent who took it
            "score": int,
            "time": str,
        },
        "id",
    ),
    # What a phone set with feature codes (*72/*73, *78/*79), one row per extension that did.
    "extension_settings": (
        {
            "extension": str,
            "dnd": int,  # 1: do-not-disturb
            "forward_always": str,  # NULL: as pbx.yaml says; "": off (*73); else the number (*72NUMBER)
        },
        "extension",
    ),
}

# Indexes for the queries that would otherwise read a whole table: those of
# every start-up (the journal's open calls, recording retention, the agents'
# logins, pending callbacks, mailbox counts, live registrations), which must
# not grow with the site's history (bench/startup.py), and the API's pages
# of calls by time.
INDEXES = {
    "cdr_open": "cdr(call_id) where ended is null",  # partial: only calls in progress, so it stays tiny
    "cdr_started": "cdr(started, call_id)",
    "recordings_started": "recordings(started)",
    "queue_log_event": "queue_log(event)",
    "callbacks_status": "callbacks(status, entered)",
    "callbacks_message": "callbacks(message) where message is not null",  # voicemail work: a message's callback
    "voicemail_mailbox": "voicemail(mailbox, heard)",
    "registrations_expires": "registrations(expires_at)",
    "surveys_time": "surveys(time)",
}


class Store:
    """Owns the database connection and the thread that uses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite_utils.Database | None = None

    async def open(self) -> None:
        await self.run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False)
        self._db = sqlite_utils.Database(conn)
        self._db.enable_wal()
        for name, (columns, pk) in SCHEMA.items():
            table = self._db.table(name)
            table.create(columns, pk=pk, if_not_exists=True)
            # A database from an older version gains the columns added since.
            for column, kind in columns.items():
                if column not in table.columns_dict:
                    table.add_column(column, kind)
        for index, on in INDEXES.items():
            self._db.execute(f"create index if not exists {index} on {on}")

    async def close(self) -> None:
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    @property
    def db(self) -> sqlite_utils.Database:
        """The database; only for use inside :meth:`run`."""
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the store thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def ping(self) -> bool:
        """True while the database answers a trivial query."""
        try:
            await self.run(lambda: self.db.execute("select 1").fetchone())
        except (sqlite3.Error, RuntimeError):
            return False
        return True

    async def upsert(self, table: str, row: dict[str, Any]) -> None:
        pk = SCHEMA[table][1]
        await self.run(lambda: self.db.table(table).upsert(row, pk=pk))

    async def insert(self, table: str, row: dict[str, Any]) -> None:
        await self.run(lambda: self.db.table(table).insert(row))

    async def update(self, table: str, pk: str, values: dict[str, Any]) -> None:
        await self.run(lambda: self.db.table(table).update(pk, values, alter=True))

    async def delete_where(self, table: str, where: str, args: list[Any]) -> None:
        await self.run(lambda: self.db.table(table).delete_where(where, args))

    async def rows(self, table: str, where: str | None = None, args: list[Any] | None = None) -> list[dict[str, Any]]:
        return await self.run(lambda: list(self.db[table].rows_where(where, args or [])))
