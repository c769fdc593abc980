"""``GET /api/surveys``: the scores callers gave in the post-call survey
(pbx.queues.surveys), newest first, by time, queue and agent."""

from __future__ import annotations

from aiohttp import web

from pbx.http.openapi import PAGINATION, TIME_RANGE, Operation, page_reply, query
from pbx.http.requests import Query, page
from pbx.http.services import SERVICES
from pbx.store.queries import survey_page


async def list_surveys(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    q = Query(request)
    start, end = q.instant("from", services.config().timezone), q.instant("to", services.config().timezone)
    queue, agent = q.text("queue"), q.text("agent")
    limit, offset = q.page()
    q.check()
    rows, total = await survey_page(services.store, start=start, end=end, queue=queue, agent=agent, limit=limit, offset=offset)
    return page(rows, total, limit, offset)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/api/surveys", "listSurveys", "Survey scores callers gave, newest first", list_surveys,
        {200: page_reply("Survey")}, "queues",
        parameters=(
            *TIME_RANGE,
            query("queue", {"type": "string"}, "only this queue's"),
            query("agent", {"type": "string"}, "only those of calls this agent took"),
            *PAGINATION,
        ),
        description="A queue with `survey: FLOW` sends its caller into that flow when the agent hangs up first; "
        "each key a `rate` node takes there is one item.",
    ),
)  # fmt: skip
