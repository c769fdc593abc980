"""End to end: a scripted day on `pbx serve` (an internal call, a queue call
answered, one abandoned, a web callback, a voicemail) and what /metrics says
about it afterwards, parsed with prometheus-client's text parser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, start_server

REPO = Path(__file__).resolve().parent.parent
QUEUE = "7000"
DEPOSIT = "8500"


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as started:
        yield started


async def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await server.http("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def talk(caller: Phone, callee: Phone, number: str) -> None:
    """``caller`` dials ``number``, ``callee`` answers, the caller hangs up."""
    call = await caller.call(f"sip:{number}@pbx.local")
    incoming = await callee.wait_event("incoming", timeout=15)
    await callee.answer(incoming["call"])
    await caller.wait_event("call_state", call=call, state="confirmed")
    await asyncio.sleep(1)  # the call's length: both legs carry audio
    await caller.hangup(call)
    await callee.wait_event("call_state", call=incoming["call"], state="disconnected")


async def test_a_scripted_day_shows_in_the_metrics(tmp_path: Path, phones: dict[str, Phone]) -> None:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["voicemail"] = {"pin": "4321"}
    server = await start_server(
        tmp_path / "pbx",
        sounds={"dir": str(REPO / "config" / "sounds")},
        extensions=extensions,
        inbound={QUEUE: "queue:support", DEPOSIT: "voicemail:1001"},
        queues={"support": {"agents": ["1002"], "strategy": "linear", "ring_timeout": 10, "wrapup": 0}},
        log_level="INFO",
    )
    alice, agent, carol = phones["1001"], phones["1002"], phones["1003"]
    try:
        for ext, phone in phones.items():
            await phone.register(server.sip, ext, PASSWORDS[ext])

        await talk(carol, alice, "1001")  # internal, answered
        await talk(carol, agent, QUEUE)  # queue, answered

        # Abandoned: the caller hangs up while the agent's phone rings.
        call = await carol.call(f"sip:{QUEUE}@pbx.local")
        await carol.wait_event("call_state", call=call, state="confirmed")
        await agent.wait_event("incoming", timeout=15)
        await asyncio.sleep(1)  # the wait's length: the caller's leg carries audio
        await carol.hangup(call)
        await server.wait_log(r"event=ended disposition=abandoned")
        await agent.wait_event("call_state", state="disconnected")

        # A web callback for Alice: the agent first, then Alice.
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{server.http_port}/api/callbacks",
                json={"queue": "support", "number": "1001"},
                headers={"Authorization": "Bearer test-token"},
            ) as response:
                assert response.status in (200, 201, 202), await response.text()
        first = await agent.wait_event("incoming", timeout=15)
        await agent.answer(first["call"])
        second = await alice.wait_event("incoming", timeout=15)
        await alice.answer(second["call"])
        await alice.wait_event("call_state", call=second["call"], state="confirmed")
        await asyncio.sleep(1)  # the call's length
        await alice.hangup(second["call"])
        await agent.wait_event("call_state", call=first["call"], state="disconnected")

        # A voicemail for Alice, ended by #.
        mark = len(server.log)
        call = await carol.call(f"sip:{DEPOSIT}@pbx.local")
        await carol.wait_event("call_state", call=call, state="confirmed")
        await server.wait_log(r"voicemail for 1001 from 1003: recording", start=mark, timeout=15)
        await carol.play_tone(call, 1000)
        await asyncio.sleep(2)  # the message's length
        await carol.dtmf(call, "#")
        await carol.wait_event("call_state", call=call, state="disconnected", timeout=15)
        await server.wait_log(r"voicemail \w+ for 1001 from 1003: [\d.]+ s", start=mark)
        await server.wait_log(r"callback \S+ to 1001 completed")

        metrics = await samples(server)
        assert value(metrics, "pbx_calls_total", direction="internal", disposition="voicemail") == 1
        assert value(metrics, "pbx_calls_total", direction="callback", disposition="answered") == 1
        # Internal answered: Carol -> Alice, and the queue call (dialed from an extension).
        assert value(metrics, "pbx_calls_total", direction="internal", disposition="answered") == 2
        assert value(metrics, "pbx_calls_total", direction="internal", disposition="abandoned") == 1
        assert value(metrics, "pbx_queue_calls_total", queue="support", outcome="answered") == 1
        assert value(metrics, "pbx_queue_calls_total", queue="support", outcome="abandoned") == 1
        assert value(metrics, "pbx_queue_wait_seconds_count", queue="support", outcome="abandoned") == 1
        assert value(metrics, "pbx_callbacks_total", queue="support", outcome="requested") == 1
        assert value(metrics, "pbx_callbacks_total", queue="support", outcome="completed") == 1
        assert value(metrics, "pbx_callbacks_pending", queue="support") == 0
        assert value(metrics, "pbx_voicemail_messages", mailbox="1001", folder="new") == 1
        assert value(metrics, "pbx_active_calls") == 0
        assert value(metrics, "pbx_registrations") == 3
        # One inbound MOS observation per finished leg that carried audio: two
        # per bridged call (internal, queue, callback), one per call the server
        # answered itself (abandoned, voicemail); all clean on loopback.
        assert value(metrics, "pbx_call_mos_count", direction="inbound") == 8
        assert value(metrics, "pbx_call_mos_bucket", direction="inbound", le="4.0") == 0
        assert value(metrics, "pbx_rtp_packets_lost_total") == 0
    finally:
        await server.stop()
