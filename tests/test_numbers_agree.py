"""End to end: a scripted day in a queue, and every place its figures are
read from agrees (issue 17 point 6): the event feed (what CRMs and webhooks
get), the wallboard's last message, GET /api/queues, the CDR and /metrics.

The day: a caller answered by the agent, who hangs up first, and rates the
call in the survey; one who gives up while the agent is paused; one who asks
for a callback and hangs up during its confirmation; the callback dialed and
answered; an internal call."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pbx.events import EVENT_TYPES
from tests.support.phone import Phone
from tests.support.server import Server
from tests.test_queues import CALLBACKS, hang_up, join_queue, phones, queue_server, register, take_call

__all__ = ["phones"]  # the fixture, shared with test_queues
TOKEN = {"Authorization": "Bearer test-token"}
SURVEY = """
start: ask
nodes:
  ask: {type: rate, prompt: welcome, timeout: 10, next: thanks}
  thanks: {type: play, prompt: goodbye, next: hangup}
"""


class Feed:
    """Every message of one event socket, from the start of the day."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            self.messages.append(json.loads(message.data))
            async with self.changed:
                self.changed.notify_all()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] != "wallboard" and (kind is None or m["type"] == kind)]

    async def until(self, found: Any, timeout: float = 20.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(found), timeout)

    def last_board_after(self, event_id: int) -> dict[str, Any] | None:
        """The last wallboard message sent after the event ``event_id``."""
        after = False
        board = None
        for m in self.messages:
            after = after or (m["type"] != "wallboard" and m["id"] >= event_id)
            if after and m["type"] == "wallboard":
                board = m
        return board


async def metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = await server.http("/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def labelled(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **fixed: str) -> Counter[tuple[str, ...]]:
    """The non-zero samples of ``name`` with the ``fixed`` labels, by their other labels' values."""
    found: Counter[tuple[str, ...]] = Counter()
    for (sample, labels), value in samples.items():
        other = dict(labels)
        if sample == name and value and all(other.pop(k, None) == v for k, v in fixed.items()):
            found[tuple(v for _, v in sorted(other.items()))] = int(value)
    return found


async def test_a_scripted_day_reads_the_same_everywhere(tmp_path: Path, phones: dict[str, Phone]) -> None:
    (tmp_path / "pbx" / "ivr_flows").mkdir(parents=True)
    (tmp_path / "pbx" / "ivr_flows" / "csat.yaml").write_text(SURVEY)
    server = await queue_server(tmp_path / "pbx", agents=["1001"], callback=CALLBACKS, survey="csat")
    base = f"http://127.0.0.1:{server.http_port}"
    agent, caller, other = phones["1001"], phones["1003"], phones["1004"]
    try:
        await register(server, phones, "1001", "1003", "1004")
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{base}/api/events?types=wallboard,{','.join(EVENT_TYPES)}", headers=TOKEN) as ws:
            feed = Feed(ws)
            await feed.until(lambda: any(m["type"] == "wallboard" for m in feed.messages))

            # Answered: the agent takes the call and hangs up; the caller gives it a 4.
            call = await join_queue(server, caller, 1)
            agent_call, _ = await take_call(agent)
            await hang_up(agent, agent_call)
            while not feed.events("survey.answered"):  # a key pressed before the rate node listens is not heard: again
                await caller.dtmf(call, "4")
                with contextlib.suppress(TimeoutError):
                    await feed.until(lambda: bool(feed.events("survey.answered")), timeout=1)
            await caller.wait_event("call_state", call=call, state="disconnected", timeout=15)

            # Abandoned: the agent is paused, the caller gives up.
            async with session.post(f"{base}/api/queues/support/agents/1001", json={"action": "pause"}, headers=TOKEN) as response:
                assert response.status == 200
            mark = len(server.log)
            call = await join_queue(server, other, 1)
            await server.wait_log("offers a callback", start=mark)
            await other.hangup(call)
            await other.wait_event("call_state", call=call, state="disconnected")

            # A callback, the caller hanging up while its confirmation plays.
            mark = len(server.log)
            call = await join_queue(server, caller, 1)
            await server.wait_log("offers a callback", start=mark)
            await caller.dtmf(call, "1")
            await server.wait_log(r"callback \S+ to 1003 requested in queue support", start=mark)
            await caller.hangup(call)
            await caller.wait_event("call_state", call=call, state="disconnected")

            # The agent is back: the callback rings the agent, then the customer.
            async with session.post(f"{base}/api/queues/support/agents/1001", json={"action": "unpause"}, headers=TOKEN) as response:
                assert response.status == 200
            agent_call, _ = await take_call(agent, timeout=15)
            customer_call, _ = await take_call(caller)
            await hang_up(agent, agent_call, caller, customer_call)

            # An internal call, no queue in it.
            call = await other.call("sip:1003@pbx.local")
            incoming, _ = await take_call(caller)
            await hang_up(other, call, caller, incoming)

            done = {"callback.done": 1, "call.ended": 5, "recording.ready": 2}  # the day is over once all of these came
            await feed.until(lambda: all(len(feed.events(kind)) == count for kind, count in done.items()))
            _, body = await server.http("/api/cdr?limit=1000")
            cdr = json.loads(body)["items"]
            assert len(cdr) == 5
            last = feed.events()[-1]["id"]
            await feed.until(lambda: feed.last_board_after(last) is not None)
            board = feed.last_board_after(last)
            await ws.close()
            await feed.reader

        _, body = await server.http("/api/queues/support")
        api = json.loads(body)["stats"]
        samples = await metrics(server)
        assert board is not None
        (shown,) = board["queues"]

        # The CDR and the feed: one call.ended per row, carrying that very row.
        assert sorted((e["cdr"] for e in feed.events("call.ended")), key=lambda r: r["call_id"]) == sorted(cdr, key=lambda r: r["call_id"])
        by_disposition = Counter((r["direction"], r["disposition"]) for r in cdr)
        assert labelled(samples, "pbx_calls_total") == by_disposition
        assert by_disposition == {("internal", "answered"): 2, ("internal", "abandoned"): 1, ("internal", "callback"): 1, ("callback", "answered"): 1}

        # The queue: the API, the wallboard, the metrics, the feed and the CDR.
        assert shown["stats"] == api
        left = Counter((e["outcome"],) for e in feed.events("queue.left") if e["queue"] == "support")
        assert left == labelled(samples, "pbx_queue_calls_total", queue="support") == {("answered",): 1, ("abandoned",): 1, ("callback",): 1}
        assert api["offered"] == len(feed.events("queue.joined")) == 3
        assert api["answered"] == left["answered",] == 1
        assert api["abandoned"] == left["abandoned",] == sum(1 for r in cdr if r["queue"] == "support" and r["disposition"] == "abandoned") == 1
        requested = len(feed.events("callback.requested"))
        completed = sum(1 for e in feed.events("callback.done") if e["outcome"] == "completed")
        assert api["callbacks"] == {"requested": requested, "completed": completed, "failed": 0} == {"requested": 1, "completed": 1, "failed": 0}
        dialed = len(feed.events("callback.dialed"))
        assert labelled(samples, "pbx_callbacks_total", queue="support") == {("requested",): 1, ("dialed",): dialed, ("completed",): 1}
        assert dialed == 1
        assert sum(1 for r in cdr if r["disposition"] == "callback") == requested
        waits = [e["wait"] for e in feed.events("queue.left") if e["outcome"] == "answered"]
        assert api["average_speed_of_answer"] == sum(waits) / len(waits)
        assert shown["callers"] == [] and shown["agents"][0]["state"] in ("available", "wrapup")

        # The survey: the feed, the surveys table, the queue's CSAT and the histogram.
        (rated,) = feed.events("survey.answered")
        _, body = await server.http("/api/surveys")
        (row,) = json.loads(body)["items"]
        assert (row["call_id"], row["queue"], row["agent"], row["score"]) == (rated["call_id"], "support", "1001", 4) == (
            rated["call_id"], rated["queue"], rated["agent"], rated["score"])
        assert (api["surveys"], api["csat"]) == (1, 4.0)
        assert (value(samples, "pbx_csat_score_count", queue="support"), value(samples, "pbx_csat_score_sum", queue="support")) == (1, 4)
        (answered,) = [r for r in cdr if r["call_id"] == rated["call_id"]]
        assert (answered["disposition"], answered["hangup"]) == ("answered", "callee")

        # The recordings of the queue's calls (the answered one and the callback).
        _, body = await server.http("/api/recordings")
        recordings = {r["id"]: r["call_id"] for r in json.loads(body)["items"]}
        assert {e["recording_id"]: e["call_id"] for e in feed.events("recording.ready")} == recordings
        assert len(recordings) == 2 == value(samples, "pbx_recordings_total")
    finally:
        await server.stop()
