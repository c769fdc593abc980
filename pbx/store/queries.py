"""The reads behind the admin API's lists (CONTRACT §4): one page of a
table's rows, newest or oldest first, with how many match in all; and the one
row an id names. Each runs on the store thread, off the event loop.

Times in the filters are written as the rows store them (UTC ISO 8601 to the
millisecond, pbx.store.db.iso_time), so comparing the text compares the times.
"""

from __future__ import annotations

from typing import Any

from pbx.store.db import SCHEMA, Store

Row = dict[str, Any]
Page = tuple[list[Row], int]  # the rows of one page, and how many match in all


async def _page(
    store: Store,
    table: str,
    conditions: list[tuple[str, list[Any]]],
    order: str,
    limit: int,
    offset: int,
    columns: str = "*",
) -> Page:
    """A page of ``table``'s rows matching every ``(clause, args)`` of ``conditions``."""
    where = " and ".join(clause for clause, _ in conditions) or None
    args = [arg for _, values in conditions for arg in values]

    def run() -> Page:
        rows = store.db.table(table)
        page = rows.rows_where(where, args, order_by=order, select=columns, limit=limit, offset=offset)
        return list(page), rows.count_where(where, args)

    result: Page = await store.run(run)
    return result


def _since_until(start: str | None, end: str | None, column: str = "started") -> list[tuple[str, list[Any]]]:
    """``column`` from ``start`` (inclusive) until ``end`` (exclusive), either left open when None."""
    bounds = ((f"{column} >= ?", start), (f"{column} < ?", end))
    return [(clause, [value]) for clause, value in bounds if value is not None]


async def callback_page(store: Store, *, status: str, queue: str | None, limit: int, offset: int) -> Page:
    """Callbacks in ``status`` (of ``queue`` only, unless None), in line order."""
    conditions: list[tuple[str, list[Any]]] = [("status = ?", [status])]
    if queue is not None:
        conditions.append(("queue = ?", [queue]))
    return await _page(store, "callbacks", conditions, "entered, id", limit, offset)


async def message_page(store: Store, mailbox: str, *, limit: int, offset: int) -> Page:
    """A mailbox's messages, newest first."""
    return await _page(store, "voicemail", [("mailbox = ?", [mailbox])], "received desc, id", limit, offset)


async def message_row(store: Store, mailbox: str, message_id: str) -> Row | None:
    rows = await store.rows("voicemail", "mailbox = ? and id = ?", [mailbox, message_id])
    return rows[0] if rows else None


async def recording_page(
    store: Store, *, start: str | None, end: str | None, queue: str | None, extension: str | None, limit: int, offset: int
) -> Page:
    """Recordings started in ``[start, end)``, of ``queue``, with ``extension``
    as agent, caller or callee (each filter left out when None), newest first."""
    conditions = _since_until(start, end)
    if queue is not None:
        conditions.append(("queue = ?", [queue]))
    if extension is not None:
        conditions.append(("(agent = ? or caller = ? or callee = ?)", [extension] * 3))
    return await _page(store, "recordings", conditions, "started desc, id", limit, offset)


async def recording_row(store: Store, recording_id: str) -> Row | None:
    rows = await store.rows("recordings", "id = ?", [recording_id])
    return rows[0] if rows else None


async def survey_page(
    store: Store, *, start: str | None, end: str | None, queue: str | None, agent: str | None, limit: int, offset: int
) -> Page:
    """Survey scores given in ``[start, end)``, of ``queue``, for ``agent`` (each filter left out when None), newest first."""
    conditions = _since_until(start, end, "time")
    if queue is not None:
        conditions.append(("queue = ?", [queue]))
    if agent is not None:
        conditions.append(("agent = ?", [agent]))
    return await _page(store, "surveys", conditions, "time desc, id desc", limit, offset)


def _cdr_columns(store: Store) -> list[str]:
    """The cdr table's columns: the schema's in its order, then any the table has besides."""
    actual = [column.name for column in store.db["cdr"].columns]
    known = [name for name in SCHEMA["cdr"][0] if name in actual]
    return known + [name for name in actual if name not in known]


async def cdr_page(store: Store, *, start: str | None, end: str | None, limit: int, offset: int) -> tuple[list[str], Page]:
    """The cdr table's columns, and a page of the calls started in ``[start, end)``, oldest first.

    Finished calls only, as Asterisk writes a CDR when a call ends: the
    journal's rows of calls in progress (no ``ended`` yet) are GET /api/calls's."""
    columns: list[str] = await store.run(_cdr_columns, store)
    selected = ", ".join(f"[{name}]" for name in columns)
    conditions = [*_since_until(start, end), ("ended is not null", [])]
    return columns, await _page(store, "cdr", conditions, "started, call_id", limit, offset, selected)
