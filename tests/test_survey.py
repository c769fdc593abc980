"""End to end: the post-call survey on `pbx serve` (issue 17, point 4). A
pjsua2 caller reaches a pjsua2 agent through a queue with `survey: csat`;
when the agent hangs up first the caller stays on the line in the flow,
presses a score (RFC 4733), and the score is in GET /api/surveys,
pbx_csat_score and the queue's today figures. A caller who hangs up first
gets no survey."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pbx.config.model import Destination
from pbx.events import EventBus
from pbx.ivr.engine import IvrSession
from pbx.ivr.nodes import Flow, PlayNode, Prompt, RateNode
from tests.support.audio import duration, rms
from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, queue_settings, start_server
from tests.test_ivr_engine import ScriptedCaller

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
QUEUE_NUMBER = "7000"
AGENT, CALLER = "1001", "1002"

SURVEY = """
start: ask
nodes:
  ask: {type: rate, prompt: welcome, timeout: 10, retries: 1, invalid: invalid, next: thanks}
  thanks: {type: play, prompt: goodbye, next: hangup}
"""


async def survey_server(folder: Path) -> Server:
    """A server whose queue `support` (at 7000, agent 1001) sends callers into flow `csat` when the agent hangs up first."""
    (folder / "ivr_flows").mkdir(parents=True)
    (folder / "ivr_flows" / "csat.yaml").write_text(SURVEY)
    return await start_server(
        folder,
        sounds={"dir": str(SOUNDS)},
        ivr={"dir": str(folder / "ivr_flows")},
        inbound={QUEUE_NUMBER: "queue:support"},
        queues={"support": queue_settings([AGENT], survey="csat", record=False)},
        log_level="INFO",
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for([AGENT, CALLER]) as started:
        yield started


async def api(server: Server, path: str) -> Any:
    status, body = await server.http(path)
    assert status == 200, body
    return json.loads(body)


async def until[T](probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0) -> T:
    """The first answer of ``probe`` that is not None: the server's state, polled until it shows ``what``."""
    try:
        async with asyncio.timeout(timeout):
            while (found := await probe()) is None:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None
    return found


async def call_in_state(server: Server, state: str) -> dict[str, Any] | None:
    """The one call in progress when it is in ``state``, else None."""
    calls = (await api(server, "/api/calls"))["items"]
    return calls[0] if len(calls) == 1 and calls[0]["state"] == state else None


async def connect_through_queue(server: Server, phones: dict[str, Phone]) -> tuple[int, int]:
    """The caller dials the queue and the agent answers: the caller's call handle and the agent's."""
    await asyncio.gather(*(phones[ext].register(server.sip, ext, PASSWORDS[ext]) for ext in (AGENT, CALLER)))
    caller, agent = phones[CALLER], phones[AGENT]
    call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
    await caller.wait_event("call_state", call=call, state="confirmed")
    incoming = await agent.wait_event("incoming")
    await agent.answer(incoming["call"])
    await agent.wait_event("call_state", call=incoming["call"], state="confirmed")
    await until(lambda: call_in_state(server, "answered"), "the call bridged")
    return call, incoming["call"]


async def test_the_caller_rates_the_call_after_the_agent_hangs_up_and_every_figure_has_the_score(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await survey_server(tmp_path / "pbx")
    caller = phones[CALLER]
    try:
        call, agent_call = await connect_through_queue(server, phones)
        await phones[AGENT].hangup(agent_call)
        await phones[AGENT].wait_event("call_state", call=agent_call, state="disconnected")

        # The caller is still on the line, now in the survey flow, and the agent is free for the next call.
        surveyed = await until(lambda: call_in_state(server, "ivr"), "the caller in the survey")
        assert (surveyed["queue"], surveyed["agent"]) == ("support", AGENT)
        queue = await api(server, "/api/queues/support")
        assert [(a["extension"], a["state"]) for a in queue["agents"]] == [(AGENT, "available")]
        assert (queue["stats"]["surveys"], queue["stats"]["csat"]) == (0, None)

        await caller.record(call, tmp_path / "survey.wav")
        await asyncio.sleep(duration(SOUNDS / "welcome.wav") + 0.5)  # the recording's length, not synchronisation
        await caller.stop_record(call)
        heard = tmp_path / "survey.wav"
        assert rms(heard, skip_seconds=0.2) > 0.01, f"the caller heard no survey prompt in {duration(heard):.1f} s"
        await caller.dtmf(call, "4")  # after the prompt, within the rate node's timeout
        # The score is stored before the flow goes on: once the goodbye is over and the server hung up, it is everywhere.
        await caller.wait_event("call_state", call=call, state="disconnected", timeout=15)

        cdr = await server.cdr_row()  # one row for the whole call
        assert (cdr["disposition"], cdr["queue"], cdr["agent"], cdr["hangup"]) == ("answered", "support", AGENT, "callee")

        page = await api(server, "/api/surveys")
        assert page["total"] == 1
        (row,) = page["items"]
        assert {k: row[k] for k in ("call_id", "queue", "agent", "score")} == {
            "call_id": cdr["call_id"], "queue": "support", "agent": AGENT, "score": 4,
        }  # fmt: skip
        answered = datetime.fromisoformat(row["time"])
        assert datetime.fromisoformat(cdr["answered"]) < answered < datetime.fromisoformat(cdr["ended"])
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        for query, total in [("?queue=support&agent=1001", 1), ("?agent=1002", 0), ("?queue=sales", 0), (f"?from={tomorrow}", 0),
                             (f"?to={tomorrow}", 1)]:  # fmt: skip
            assert (await api(server, f"/api/surveys{query}"))["total"] == total, query

        assert await server.metric("pbx_csat_score_count", queue="support") == 1
        assert await server.metric("pbx_csat_score_sum", queue="support") == 4
        assert await server.metric("pbx_csat_score_bucket", queue="support", le="3.0") == 0
        assert await server.metric("pbx_csat_score_bucket", queue="support", le="4.0") == 1

        stats = (await api(server, "/api/queues/support"))["stats"]
        assert (stats["surveys"], stats["csat"]) == (1, 4.0)
    finally:
        assert await server.stop() == 0


async def test_a_caller_who_hangs_up_first_gets_no_survey(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await survey_server(tmp_path / "pbx")
    try:
        call, agent_call = await connect_through_queue(server, phones)
        await phones[CALLER].hangup(call)
        await phones[AGENT].wait_event("call_state", call=agent_call, state="disconnected")

        cdr = await server.cdr_row()
        assert (cdr["disposition"], cdr["agent"], cdr["hangup"]) == ("answered", AGENT, "caller")
        assert (await api(server, "/api/surveys"))["total"] == 0
        assert (await api(server, "/api/queues/support"))["stats"]["surveys"] == 0
        assert await server.metric("pbx_csat_score_count", queue="support") == 0
    finally:
        assert await server.stop() == 0


@pytest.mark.parametrize(
    ("keys", "scores", "heard", "ended"),
    [
        ("4", [4], ["rate-us", "goodbye"], Destination("hangup", "")),
        ("703", [3], ["rate-us", "invalid", "rate-us", "invalid", "rate-us", "goodbye"], Destination("hangup", "")),
        ("", [], ["rate-us", "rate-us", "rate-us"], Destination("voicemail", "1001")),
    ],
    ids=["first-key", "wrong-keys-then-a-score", "no-key"],
)
async def test_a_rate_node_takes_one_key_in_its_range_as_the_score(
    keys: str, scores: list[int], heard: list[str], ended: Destination
) -> None:
    nodes = {
        "ask": RateNode("ask", 3, Prompt(("rate-us",)), "thanks", timeout=0.05, retries=2, invalid=Prompt(("invalid",)),
                        on_fail=Destination("voicemail", "1001")),
        "thanks": PlayNode("thanks", 4, Prompt(("goodbye",)), Destination("hangup", "")),
    }  # fmt: skip
    rated: list[int] = []

    async def store(score: int) -> None:
        rated.append(score)

    caller = ScriptedCaller(keys)
    async with aiohttp.ClientSession() as http:
        session = IvrSession(
            {"csat": Flow("csat", Path("csat.yaml"), "ask", nodes)}, "csat", caller, variables={}, timezone="UTC", http=http,
            events=EventBus(), rated=store,
        )  # fmt: skip
        assert await session.run() == ended
    assert (rated, caller.heard) == (scores, heard)
