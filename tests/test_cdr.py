"""End to end: every call through `pbx serve` leaves exactly one `cdr` row
with a disposition from the fixed list, queue calls carry their queue, agent
and wait, and each call's steps are logged as `call=ID event=NAME key=value`
lines whose `ended` line matches the row."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pbx.calls.model import DISPOSITIONS
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, queue_settings, start_server

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
IVR = "8000"
QUEUE = "7000"
FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": extension:1002}, timeout: 10, retries: 3, on_fail: hangup}
"""
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    folder = tmp_path / "pbx"
    (folder / "ivr_flows").mkdir(parents=True)
    (folder / "ivr_flows" / "main.yaml").write_text(FLOW)
    srv = await start_server(
        folder,
        sip={"ring_timeout": 2},
        ivr={"dir": str(folder / "ivr_flows")},
        sounds={"dir": str(SOUNDS)},
        inbound={IVR: "ivr:main", QUEUE: "queue:support"},
        queues={"support": queue_settings(["1003"], record=False)},
        log_level="INFO",
    )
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with (
        await Phone.start(name="p1001") as alice,
        await Phone.start(name="p1002") as bob,
        await Phone.start(name="p1003") as carol,
    ):
        yield {"1001": alice, "1002": bob, "1003": carol}


def logfmt(line: str) -> dict[str, str]:
    """The key=value pairs of a structured log line, quotes removed."""
    text = line[line.index("call=") :]
    return {k: v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v for k, v in _PAIR.findall(text)}


async def started(server: Server, mark: int, to: str) -> str:
    """The id of the call to ``to`` that started after log line ``mark``."""
    line = await server.wait_log(rf"call=\S+ event=started .*\bto={to}\b", start=mark)
    return logfmt(line)["call"]


async def ended(server: Server, call_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The call's CDR row, once its `ended` line says it is stored, and that line's fields."""
    line = await server.wait_log(rf"call={re.escape(call_id)} event=ended\b")
    [row] = [r for r in cdr(server) if r["call_id"] == call_id]
    return row, logfmt(line)


def cdr(server: Server) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from cdr order by started")]


def check_line(row: dict[str, Any], line: dict[str, str]) -> None:
    """The `ended` log line says what the row says."""
    assert line["event"] == "ended"
    assert (line["disposition"], line["direction"], line["from"], line["to"]) == (
        row["disposition"], row["direction"], row["from_number"], row["to_number"],
    )  # fmt: skip
    assert float(line["duration"]) == pytest.approx(row["duration"], abs=0.05)
    assert line.get("queue") == row["queue"] and line.get("agent") == row["agent"]


async def test_direct_calls_have_one_row_each_answered_busy_no_answer_cancelled(
    server: Server, phones: dict[str, Phone]
) -> None:
    alice, bob = phones["1001"], phones["1002"]
    await alice.register(server.sip, "1001", PASSWORDS["1001"])
    await bob.register(server.sip, "1002", PASSWORDS["1002"])
    ids: dict[str, str] = {}

    # Answered, then the caller hangs up.
    mark = len(server.log)
    a = await alice.call("sip:1002@pbx.local")
    ids["answered"] = await started(server, mark, "1002")
    b = (await bob.wait_event("incoming"))["call"]
    await bob.answer(b)
    await server.wait_log(rf"call={re.escape(ids['answered'])} event=answered by=1002\b")
    await alice.wait_event("call_state", call=a, state="confirmed")
    await alice.hangup(a)
    row, line = await ended(server, ids["answered"])
    assert (row["from_number"], row["to_number"], row["direction"]) == ("1001", "1002", "internal")
    assert row["answered"] is not None and 0 < row["billsec"] <= row["duration"]
    assert line["hangup"] == "caller"
    check_line(row, line)

    # Busy.
    mark = len(server.log)
    a = await alice.call("sip:1002@pbx.local")
    ids["busy"] = await started(server, mark, "1002")
    await bob.reject((await bob.wait_event("incoming"))["call"], 486)
    assert (await alice.wait_event("call_state", call=a, state="disconnected"))["code"] == 486

    # No answer: sip.ring_timeout is 2 s.
    mark = len(server.log)
    a = await alice.call("sip:1002@pbx.local")
    ids["no-answer"] = await started(server, mark, "1002")
    b = (await bob.wait_event("incoming"))["call"]
    assert (await alice.wait_event("call_state", call=a, state="disconnected"))["code"] == 480
    await bob.wait_event("call_state", call=b, state="disconnected")

    # Cancelled: the caller hangs up while it rings.
    mark = len(server.log)
    a = await alice.call("sip:1002@pbx.local")
    ids["cancelled"] = await started(server, mark, "1002")
    b = (await bob.wait_event("incoming"))["call"]
    await bob.ringing(b)
    await alice.wait_event("call_state", call=a, state="early")
    await alice.hangup(a)
    await bob.wait_event("call_state", call=b, state="disconnected")

    for disposition in ("busy", "no-answer", "cancelled"):
        row, line = await ended(server, ids[disposition])
        assert row["disposition"] == disposition
        assert row["answered"] is None and row["billsec"] == 0
        check_line(row, line)
    rows = cdr(server)
    assert sorted(r["call_id"] for r in rows) == sorted(ids.values())  # one row per call, no more
    assert {r["call_id"]: r["disposition"] for r in rows} == {v: k for k, v in ids.items()}
    assert all(r["queue"] is None and r["agent"] is None and r["wait"] is None for r in rows)


async def test_ivr_and_queue_calls_have_rows_with_queue_agent_and_wait(server: Server, phones: dict[str, Phone]) -> None:
    alice, carol = phones["1001"], phones["1003"]
    await alice.register(server.sip, "1001", PASSWORDS["1001"])

    # IVR only: the caller hangs up in the menu.
    mark = len(server.log)
    a = await alice.call(f"sip:{IVR}@pbx.local")
    ivr = await started(server, mark, IVR)
    await server.wait_log(rf"call={re.escape(ivr)} event=ivr flow=main\b")
    await alice.wait_event("media", call=a, active=True)
    await alice.hangup(a)
    row, line = await ended(server, ivr)
    assert (row["disposition"], row["to_number"], row["queue"]) == ("answered", IVR, None)
    assert row["answered"] is not None
    check_line(row, line)

    # Abandoned: nobody to take it (agent 1003 is not registered), the caller gives up.
    mark = len(server.log)
    a = await alice.call(f"sip:{QUEUE}@pbx.local")
    abandoned = await started(server, mark, QUEUE)
    await server.wait_log(rf"call={re.escape(abandoned)} event=queued queue=support\b")
    await server.wait_log(r"queue support announces position 1\b", start=mark)
    await alice.hangup(a)
    row, line = await ended(server, abandoned)
    assert (row["disposition"], row["queue"], row["agent"]) == ("abandoned", "support", None)
    assert 0 < row["wait"] <= row["duration"]
    assert line["hangup"] == "caller" and float(line["wait"]) == pytest.approx(row["wait"], abs=0.1)
    check_line(row, line)

    # Answered by the agent: queue, agent and the wait until the agent picked up.
    await carol.register(server.sip, "1003", PASSWORDS["1003"])
    mark = len(server.log)
    a = await alice.call(f"sip:{QUEUE}@pbx.local")
    answered = await started(server, mark, QUEUE)
    incoming = await carol.wait_event("incoming")
    await carol.answer(incoming["call"])
    answer = await server.wait_log(rf"call={re.escape(answered)} event=answered by=1003\b")
    await carol.wait_event("call_state", call=incoming["call"], state="confirmed")
    await carol.hangup(incoming["call"])
    await alice.wait_event("call_state", call=a, state="disconnected")
    row, line = await ended(server, answered)
    assert (row["disposition"], row["queue"], row["agent"], row["direction"]) == ("answered", "support", "1003", "internal")
    assert 0 < row["wait"] < row["duration"]
    assert float(logfmt(answer)["wait"]) == pytest.approx(row["wait"], abs=0.1)
    assert line["hangup"] == "callee"
    check_line(row, line)

    rows = cdr(server)
    assert sorted(r["call_id"] for r in rows) == sorted([ivr, abandoned, answered])
    assert all(r["disposition"] in DISPOSITIONS for r in rows)
