"""End to end: callers wait in a queue on `pbx serve` with music and
announcements, pjsua2 agents are offered their calls by each strategy, and
feature codes log agents in and out and pause them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.audio import rms
from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, queue_settings, start_server
from tests.support.sipp import SippProcess, start_sipp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
SIPP = Path(__file__).parent / "sipp"
QUEUE_NUMBER = "7000"
EXTENSIONS = {**PASSWORDS, "1004": "secret-1004", "1005": "secret-1005", "1006": "secret-1006"}


async def queue_server(folder: Path, *, customer_rings: int = 20, **queue: Any) -> Server:
    """A server with queue `support` at 7000; ``queue`` overrides its settings,
    ``customer_rings`` is how long a callback's customer rings (sip.ring_timeout)."""
    settings = {**queue_settings(["1001", "1002", "1003"], ring_timeout=5, announce={"every": 30}), **queue}
    return await start_server(
        folder,
        sip={"ring_timeout": customer_rings},
        sounds={"dir": str(SOUNDS)},
        extensions={ext: {"name": f"User {ext}", "password": pw} for ext, pw in EXTENSIONS.items()},
        inbound={QUEUE_NUMBER: "queue:support"},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
        queues={"support": settings},
        log_level="INFO",
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    """Six pjsua2 phones, named by the extension each will register as."""
    async with phones_for(EXTENSIONS) as started:
        yield started


async def register(server: Server, phones: dict[str, Phone], *extensions: str) -> None:
    await asyncio.gather(*(phones[ext].register(server.sip, ext, EXTENSIONS[ext]) for ext in extensions))


async def join_queue(server: Server, caller: Phone, position: int) -> int:
    """Call the queue and wait until the server announces the caller's ``position``."""
    mark = len(server.log)
    call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
    await caller.wait_event("call_state", call=call, state="confirmed")
    await server.wait_log(rf"queue support announces position {position}\b", start=mark)
    return call


async def take_call(agent: Phone, timeout: float = 10.0) -> tuple[int, str]:
    """Answer the next call ringing ``agent``; its handle and the caller's user part."""
    incoming = await agent.wait_event("incoming", timeout=timeout)
    await agent.answer(incoming["call"])
    await agent.wait_event("call_state", call=incoming["call"], state="confirmed")
    return incoming["call"], _user(incoming["from"])


async def hang_up(agent: Phone, call: int, caller: Phone | None = None, caller_call: int | None = None) -> None:
    await agent.hangup(call)
    await agent.wait_event("call_state", call=call, state="disconnected")
    if caller is not None:
        await caller.wait_event("call_state", call=caller_call, state="disconnected")


async def calls_done(server: Server, agent: str, count: int) -> None:
    """Until the queue has stored ``count`` finished calls of ``agent``. The
    store writes queue_log rows in order, so every row logged before the last
    of them is readable too. Counted, not looked for after a mark: the line
    of an earlier call can reach the test after the phones' next events."""
    start = 0
    for _ in range(count):
        line = await server.wait_log(rf"queue support: {agent} done with \S+ after", start=start)
        start = server.log.index(line, start) + 1


def queue_log(server: Server, *events: str) -> list[dict[str, Any]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("select * from queue_log order by id")]
    for row in rows:
        row["data"] = json.loads(row["data"]) if row["data"] else {}
    return [r for r in rows if not events or r["event"] in events]


def _user(header: str) -> str:
    return header.split("sip:", 1)[1].split("@", 1)[0]


async def sipp_caller(server: Server, number: str, position: int) -> SippProcess:
    """A SIPp caller from the carrier's network that joins the queue as ``number``
    and stays until the agent hangs up."""
    mark = len(server.log)
    caller = await start_sipp(
        SIPP / "queue_caller.xml",
        server.sip,
        local_ip="127.0.0.2",
        service=QUEUE_NUMBER,
        calls=1,
        timeout=60,
        ready_timeout=0,
        extra=("-set", "caller", number),
    )
    await server.wait_log(rf"queue support announces position {position}\b", start=mark)
    return caller


async def test_callers_wait_with_music_hear_their_position_and_are_answered_in_order(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"])
    try:
        await register(server, phones, "1003")
        first = await sipp_caller(server, "+15550001", 1)
        second = await join_queue(server, phones["1003"], 2)
        third = await sipp_caller(server, "+15550003", 3)
        assert await server.metric("pbx_queue_callers", queue="support") == 3

        # Music keeps playing after the announcement (a few words, under 3 s).
        await phones["1003"].record(second, tmp_path / "waiting.wav")
        await asyncio.sleep(4)  # the recording's length, not synchronisation
        await phones["1003"].stop_record(second)
        assert rms(tmp_path / "waiting.wav", skip_seconds=3) > 0.01

        agent = phones["1001"]
        await register(server, phones, "1001")
        answered_by = []
        for _ in range(3):
            agent_call, user = await take_call(agent)
            answered_by.append(user)
            await hang_up(agent, agent_call)
            await calls_done(server, "1001", len(answered_by))
        assert answered_by == ["+15550001", "1003", "+15550003"]
        for sipp in (first, third):
            result = await sipp.wait(timeout=10)
            assert result.ok, result.report()
        entered = [r["call_id"] for r in queue_log(server, "enter")]
        assert [r["call_id"] for r in queue_log(server, "answer")] == entered
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("linear", ["1001", "1001", "1001", "1001"]),
        ("round-robin", ["1001", "1002", "1003", "1001"]),
        ("longest-idle", ["1001", "1002", "1003", "1001"]),
        ("fewest-calls", ["1001", "1002", "1003", "1001"]),
    ],
)
async def test_strategy_picks_the_expected_agent(
    tmp_path: Path, phones: dict[str, Phone], strategy: str, expected: list[str]
) -> None:
    server = await queue_server(tmp_path / "pbx", strategy=strategy)
    try:
        await register(server, phones, "1001", "1002", "1003", "1004")
        caller = phones["1004"]
        picked = []
        for _ in expected:
            call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
            offer = await _next_offer(server, phones)
            picked.append(offer[0])
            agent_call, _ = await take_call(phones[offer[0]])
            await hang_up(phones[offer[0]], agent_call, caller, call)
        assert picked == expected
    finally:
        await server.stop()


async def _next_offer(server: Server, phones: dict[str, Phone]) -> tuple[str, ...]:
    """The agents the next queue offer rings (read from the server's log of offers)."""
    mark = len(server.log)
    line = await server.wait_log(r"queue support offers \S+ to", start=mark)
    return tuple(line.rsplit(" to ", 1)[1].split(","))


async def test_ringall_rings_every_free_agent_and_the_first_to_answer_wins(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await queue_server(tmp_path / "pbx", strategy="ringall")
    try:
        await register(server, phones, "1001", "1002", "1003", "1004")
        caller = phones["1004"]
        call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
        rung = {ext: await phones[ext].wait_event("incoming") for ext in ("1001", "1002", "1003")}
        await phones["1002"].answer(rung["1002"]["call"])
        await phones["1002"].wait_event("call_state", call=rung["1002"]["call"], state="confirmed")
        for ext in ("1001", "1003"):
            await phones[ext].wait_event("call_state", call=rung[ext]["call"], state="disconnected")
        await hang_up(phones["1002"], rung["1002"]["call"], caller, call)
        await calls_done(server, "1002", 1)
        assert [r["agent"] for r in queue_log(server, "answer")] == ["1002"]
    finally:
        await server.stop()


async def test_random_strategy_rings_one_free_agent_at_a_time(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await queue_server(tmp_path / "pbx", strategy="random")
    try:
        await register(server, phones, "1001", "1002", "1003", "1004")
        caller = phones["1004"]
        for _ in range(3):
            call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
            offer = await _next_offer(server, phones)
            assert len(offer) == 1 and offer[0] in ("1001", "1002", "1003")
            agent_call, _ = await take_call(phones[offer[0]])
            await hang_up(phones[offer[0]], agent_call, caller, call)
    finally:
        await server.stop()


async def test_an_agent_on_a_direct_call_is_skipped_and_wrapup_delays_the_next_offer(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001", "1002"], wrapup=3)
    try:
        await register(server, phones, "1001", "1002", "1003", "1004", "1005")
        alice, bob = phones["1001"], phones["1002"]
        # 1001, first in line for `linear`, is on a direct call with 1005.
        direct = await phones["1005"].call("sip:1001@pbx.local")
        ring = await alice.wait_event("incoming")
        await alice.answer(ring["call"])
        await phones["1005"].wait_event("call_state", call=direct, state="confirmed")

        first = await join_queue(server, phones["1003"], 1)
        bob_call, user = await take_call(bob)
        assert user == "1003"
        second = await join_queue(server, phones["1004"], 1)
        loop = asyncio.get_running_loop()
        freed = loop.time()  # before the hang-up, so the server's wrap-up starts after it
        await hang_up(bob, bob_call, phones["1003"], first)
        # Bob is in wrap-up and Alice still busy: the caller waits 3 s for Bob.
        bob_call, user = await take_call(bob, timeout=10)
        assert user == "1004"
        assert loop.time() - freed >= 2.95
        await hang_up(bob, bob_call, phones["1004"], second)
        await calls_done(server, "1002", 2)
        assert [r["agent"] for r in queue_log(server, "offer")] == ["1002", "1002"]
        await hang_up(alice, ring["call"])
    finally:
        await server.stop()


async def feature(server: Server, phone: Phone, code: str, confirmation: str) -> None:
    """Dial a feature code, hear the server answer, confirm and hang up."""
    mark = len(server.log)
    call = await phone.call(f"sip:{code}@pbx.local")
    await phone.wait_event("call_state", call=call, state="confirmed")
    await phone.wait_event("call_state", call=call, state="disconnected", timeout=10)
    await server.wait_log(confirmation, start=mark)


async def test_feature_codes_log_agents_in_and_out_and_pause_them(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"], on_no_agents="hangup")
    try:
        await register(server, phones, "1001", "1004")
        agent = phones["1001"]
        await feature(server, agent, "*45", "agent 1001: logout")
        assert await server.metric("pbx_queue_agents", queue="support", state="logged_out") == 1
        # Nobody logged in: on_no_agents sends the caller away.
        call = await phones["1004"].call(f"sip:{QUEUE_NUMBER}@pbx.local")
        await phones["1004"].wait_event("call_state", call=call, state="disconnected")

        await feature(server, agent, "*45", "agent 1001: login")
        await feature(server, agent, "*46", "agent 1001: pause")
        assert await server.metric("pbx_queue_agents", queue="support", state="paused") == 1
        call = await join_queue(server, phones["1004"], 1)
        await feature(server, agent, "*46", "agent 1001: unpause")
        agent_call, user = await take_call(agent)
        assert user == "1004"
        await hang_up(agent, agent_call, phones["1004"], call)
        assert [r["event"] for r in queue_log(server, "login", "logout", "pause", "unpause")] == ["logout", "login", "pause", "unpause"]
    finally:
        await server.stop()


async def test_an_agent_who_misses_two_calls_in_a_row_is_paused(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"], ring_timeout=1)
    try:
        await register(server, phones, "1001", "1004")
        call = await join_queue(server, phones["1004"], 1)
        for _ in range(2):
            ring = await phones["1001"].wait_event("incoming")
            await phones["1001"].wait_event("call_state", call=ring["call"], state="disconnected")
        await server.wait_log(r"agent 1001 missed 2 calls in a row: paused")
        assert await server.metric("pbx_queue_agents", queue="support", state="paused") == 1
        assert [r["data"].get("reason") for r in queue_log(server, "pause")] == ["auto"]
        await phones["1004"].hangup(call)
        await server.wait_log(r"left queue support: abandoned")
        assert [r["event"] for r in queue_log(server, "enter", "abandon")] == ["enter", "abandon"]
    finally:
        await server.stop()


CALLBACKS = {"enabled": True, "offer_after": 0, "retries": 1, "retry_interval": 10}


async def ask_for_callback(server: Server, caller: Phone, position: int) -> None:
    """Join the queue, take the callback offer and hear the server hang up."""
    mark = len(server.log)
    call = await join_queue(server, caller, position)
    await server.wait_log("offers a callback", start=mark)
    await caller.dtmf(call, "1")
    await server.wait_log(rf"callback \S+ to \d+ requested in queue support at position {position}\b", start=mark)
    await caller.wait_event("call_state", call=call, state="disconnected", timeout=15)


async def test_a_callback_keeps_its_place_and_rings_the_agent_then_the_customer(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"], callback=CALLBACKS)
    try:
        await register(server, phones, "1002", "1003", "1004")
        first = await join_queue(server, phones["1002"], 1)
        await ask_for_callback(server, phones["1003"], 2)

        # A second request for the same number is refused; the caller stays in line behind the callback.
        mark = len(server.log)
        again = await join_queue(server, phones["1003"], 3)
        await server.wait_log("offers a callback", start=mark)
        await phones["1003"].dtmf(again, "1")
        await server.wait_log("1003 already has a callback pending in support", start=mark)
        await phones["1003"].hangup(again)
        await server.wait_log(r"left queue support: abandoned", start=mark)

        later = await join_queue(server, phones["1004"], 3)
        agent = phones["1001"]
        await register(server, phones, "1001")
        agent_call, user = await take_call(agent)
        assert user == "1002"
        await hang_up(agent, agent_call, phones["1002"], first)

        # The callback: the agent's phone rings first (showing the customer), then the customer's.
        agent_call, user = await take_call(agent)
        assert user == "1003"
        customer_call, user = await take_call(phones["1003"])
        assert user == "1001"
        await hang_up(agent, agent_call, phones["1003"], customer_call)

        agent_call, user = await take_call(agent)
        assert user == "1004"
        await hang_up(agent, agent_call, phones["1004"], later)
        await calls_done(server, "1001", 3)
        events = [r["event"] for r in queue_log(server, "answer", "callback-dial", "callback-complete")]
        assert events == ["answer", "callback-dial", "callback-complete", "answer"]
        assert await server.metric("pbx_callbacks_total", queue="support", outcome="completed") == 1
    finally:
        await server.stop()


async def test_a_caller_who_hangs_up_during_the_callback_confirmation_is_a_callback_everywhere(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"], callback=CALLBACKS)
    try:
        await register(server, phones, "1003")
        call = await join_queue(server, phones["1003"], 1)
        await server.wait_log("offers a callback")
        await phones["1003"].dtmf(call, "1")
        await server.wait_log(r"callback \S+ to 1003 requested in queue support at position 1\b")
        await phones["1003"].hangup(call)  # while "you will be called back" plays, before the server's goodbye
        row = await server.cdr_row()
        assert row["disposition"] == "callback"
        assert await server.metric("pbx_calls_total", direction="internal", disposition="callback") == 1
        assert await server.metric("pbx_calls_total", direction="internal", disposition="abandoned") == 0
        assert await server.metric("pbx_queue_calls_total", queue="support", outcome="callback") == 1
        assert await server.metric("pbx_queue_calls_total", queue="support", outcome="abandoned") == 0
        assert await server.metric("pbx_callbacks_pending", queue="support") == 1
    finally:
        await server.stop()


async def test_a_customer_who_does_not_answer_is_tried_again_then_the_callback_fails(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await queue_server(tmp_path / "pbx", agents=["1001"], callback=CALLBACKS, customer_rings=2)
    try:
        await register(server, phones, "1001", "1003")
        await feature(server, phones["1001"], "*46", "agent 1001: pause")
        await ask_for_callback(server, phones["1003"], 1)
        await feature(server, phones["1001"], "*46", "agent 1001: unpause")
        for _ in range(2):  # the first try and one retry (retries: 1)
            agent_call, user = await take_call(phones["1001"], timeout=15)
            assert user == "1003"
            ring = await phones["1003"].wait_event("incoming")  # and is left ringing
            await phones["1003"].wait_event("call_state", call=ring["call"], state="disconnected")
            await phones["1001"].wait_event("call_state", call=agent_call, state="disconnected")
        await server.wait_log(r"callback \S+ to 1003 failed after 2 attempts \(no-answer\)")
        assert [r["event"] for r in queue_log(server, "callback-dial", "callback-retry", "callback-fail")] == [
            "callback-dial",
            "callback-retry",
            "callback-dial",
            "callback-fail",
        ]
        assert await server.metric("pbx_callbacks_total", queue="support", outcome="failed") == 1
        assert await server.metric("pbx_callbacks_pending", queue="support") == 0
    finally:
        await server.stop()


async def test_pending_callbacks_survive_a_restart_in_order_and_are_dialed_one_at_a_time(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    folder = tmp_path / "pbx"
    server = await queue_server(folder, agents=["1001"], callback=CALLBACKS)
    try:
        await register(server, phones, "1002", "1003", "1004")
        for position, ext in enumerate(("1003", "1002", "1004"), 1):
            await ask_for_callback(server, phones[ext], position)
    finally:
        await server.stop()
    server = await queue_server(folder, agents=["1001"], callback=CALLBACKS)
    try:
        await server.wait_log("3 pending callbacks restored")
        await register(server, phones, "1001", "1002", "1003", "1004")
        agent = phones["1001"]
        called = []
        for _ in range(3):
            agent_call, user = await take_call(agent, timeout=15)
            customer = phones[user]
            customer_call, _ = await take_call(customer)
            called.append(user)
            assert await server.metric("pbx_callbacks_pending", queue="support") == 3 - len(called)
            await hang_up(agent, agent_call, customer, customer_call)
            await calls_done(server, "1001", len(called))
        assert called == ["1003", "1002", "1004"]
        # One agent: each callback is dialed only after the previous call has ended.
        sequence = [r["event"] for r in queue_log(server, "callback-dial", "complete")]
        assert sequence == ["callback-dial", "complete"] * 3
    finally:
        await server.stop()


async def test_metrics_count_each_way_of_leaving_the_queue(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await queue_server(
        tmp_path / "pbx",
        agents=["1001"],
        max_wait=9,
        service_level=2,
        announce={"every": 5},
        callback={"enabled": True, "offer_after": 0},
    )
    try:
        await register(server, phones, "1002", "1003", "1004", "1005", "1006")
        # No agent yet: one caller waits out max_wait, the next waits past the service level.
        mark = len(server.log)
        await join_queue(server, phones["1004"], 1)
        await server.wait_log(r"left queue support: timeout after 9\.\d s", timeout=15, start=mark)
        mark = len(server.log)
        late = await join_queue(server, phones["1005"], 1)
        await server.wait_log(r"queue support announces position 1", start=len(server.log))  # 5 s later
        agent = phones["1001"]
        await register(server, phones, "1001")
        agent_call, _ = await take_call(agent)
        await hang_up(agent, agent_call, phones["1005"], late)
        # Answered at once, and kept on the line while others arrive.
        quick = await phones["1002"].call(f"sip:{QUEUE_NUMBER}@pbx.local")
        busy_call, _ = await take_call(agent)
        await ask_for_callback(server, phones["1003"], 1)
        mark = len(server.log)
        gone = await join_queue(server, phones["1006"], 2)
        await phones["1006"].hangup(gone)
        await server.wait_log(r"left queue support: abandoned", start=mark)

        _, text = await server.http("/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

        def sample(name: str, **labels: str) -> float | None:
            return samples.get((name, tuple(sorted({"queue": "support", **labels}.items()))))

        for outcome, count in (("answered", 2), ("timeout", 1), ("callback", 1), ("abandoned", 1)):
            assert sample("pbx_queue_calls_total", outcome=outcome) == count, outcome
            assert sample("pbx_queue_wait_seconds_count", outcome=outcome) == count, outcome
        assert sample("pbx_queue_wait_seconds_bucket", outcome="answered", le="5.0") == 1
        assert sample("pbx_queue_wait_seconds_bucket", outcome="answered", le="10.0") == 2
        assert sample("pbx_queue_wait_seconds_bucket", outcome="timeout", le="5.0") == 0
        assert sample("pbx_queue_wait_seconds_bucket", outcome="timeout", le="10.0") == 1
        assert sample("pbx_queue_service_level_ratio") == 0.5
        assert sample("pbx_callbacks_total", outcome="requested") == 1
        assert sample("pbx_callbacks_pending") == 1
        assert sample("pbx_queue_agents", state="busy") == 1
        assert sample("pbx_queue_callers") == 0
        await hang_up(agent, busy_call, phones["1002"], quick)
    finally:
        await server.stop()
