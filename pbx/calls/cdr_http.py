"""``GET /api/cdr``: call detail records, as a JSON page or as CSV.

A CSV export carries the total in ``X-Total-Count`` and neutralises cells a
spreadsheet would run as formulas (:func:`csv_cell`).
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from aiohttp import web

from pbx.http.openapi import PAGINATION, TIME_RANGE, Operation, Reply, page_of, query
from pbx.http.requests import Query, page
from pbx.http.services import SERVICES
from pbx.store.queries import cdr_page

CSV_TYPE = "text/csv"

# A cell a spreadsheet would evaluate: a formula (= + - @) or one behind a
# tab or carriage return (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def csv_cell(value: Any) -> Any:
    """A CDR value as a CSV cell a spreadsheet shows as text, never runs.

    Caller ids and numbers come from outside (a SIP From header): text
    starting like a formula gets a leading ``'`` (OWASP), so
    ``=HYPERLINK(...)`` shows as written. A plain number such as
    ``+15551234567`` or ``-3`` is left alone: it can only ever be a number,
    and a quote would change the phone numbers of every exported call.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


async def list_cdr(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    timezone = services.config().timezone
    q = Query(request)
    start, end = q.instant("from", timezone), q.instant("to", timezone)
    form = q.choice("format", ("json", "csv"), "json")
    limit, offset = q.page()
    q.check()
    columns, (rows, total) = await cdr_page(services.store, start=start, end=end, limit=limit, offset=offset)
    if form == "json":
        return page(rows, total, limit, offset)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    writer.writerows([[csv_cell(row[name]) for name in columns] for row in rows])
    return web.Response(text=out.getvalue(), content_type=CSV_TYPE, charset="utf-8", headers={"X-Total-Count": str(total)})


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/cdr", "listCdr", "Call detail records, oldest first", list_cdr,
        {
            200: Reply(
                "a page of records (JSON), or the same page as CSV with a header row of the cdr table's columns; "
                "in CSV a text cell starting with = + - @, a tab or a carriage return (not a plain number) gets a "
                "leading ' so that no spreadsheet runs it as a formula",
                content={"application/json": page_of("CallRecord"), CSV_TYPE: {"type": "string"}},
                headers={"X-Total-Count": {"type": "integer"}},
            )
        },
        "cdr",
        parameters=(
            *TIME_RANGE,
            query("format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "json or csv"),
            *PAGINATION,
        ),
    ),
)  # fmt: skip
