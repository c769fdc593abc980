"""End to end: pjsua2 softphones register to `pbx serve` and call each other through it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, Server, start_server

TRANSPORTS = ["udp", "tcp"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx", sip={"ring_timeout": 4})
    yield srv
    assert await srv.stop() == 0


async def phone(server: Server, ext: str, transport: str = "udp", codecs: tuple[str, ...] = ("PCMU", "PCMA")) -> Phone:
    p = await Phone.start(transport=transport, codecs=codecs, name=f"p{ext}")
    await p.register(server.sip, ext, PASSWORDS[ext])
    return p


async def ring(caller: Phone, callee: Phone, number: str = "1002") -> tuple[int, int]:
    """Caller dials ``number``; returns (caller's call, callee's call) while it rings."""
    a = await caller.call(f"sip:{number}@pbx.local")
    incoming = await callee.wait_event("incoming")
    return a, incoming["call"]


async def connect(caller: Phone, callee: Phone) -> tuple[int, int]:
    a, b = await ring(caller, callee)
    await callee.answer(b)
    await caller.wait_event("call_state", call=a, state="confirmed")
    await callee.wait_event("call_state", call=b, state="confirmed")
    await caller.wait_event("media", call=a, active=True)
    await callee.wait_event("media", call=b, active=True)
    return a, b


def cdr(server: Server) -> list[dict[str, object]]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from cdr order by started")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_registration_needs_the_right_password(server: Server, transport: str) -> None:
    async with await Phone.start(transport=transport, name="good") as good, await Phone.start(transport=transport, name="bad") as bad:
        assert await good.register(server.sip, "1001", PASSWORDS["1001"]) == 200
        assert await bad.register(server.sip, "1002", "not-the-password", expect_ok=False) == 403
        assert await server.metric("pbx_registrations") == 1
        assert await server.metric("pbx_auth_failures_total") >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_call_carries_audio_both_ways_and_caller_hangs_up(server: Server, tmp_path: Path, transport: str) -> None:
    async with await phone(server, "1001", transport) as alice, await phone(server, "1002", transport) as bob:
        a, b = await connect(alice, bob)
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        await alice.hangup(a)
        await bob.wait_event("call_state", call=b, state="disconnected")
        await server.wait_log(r"event=ended disposition=answered")
    [row] = cdr(server)
    assert (row["from_number"], row["to_number"], row["disposition"]) == ("1001", "1002", "answered")
    assert row["answered"] is not None and row["billsec"] > 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_callee_hangs_up(server: Server, transport: str) -> None:
    async with await phone(server, "1001", transport) as alice, await phone(server, "1002", transport) as bob:
        a, b = await connect(alice, bob)
        await bob.hangup(b)
        await alice.wait_event("call_state", call=a, state="disconnected")
        assert await server.metric("pbx_active_calls") == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_busy_callee(server: Server, transport: str) -> None:
    async with await phone(server, "1001", transport) as alice, await phone(server, "1002", transport) as bob:
        a, b = await ring(alice, bob)
        await bob.reject(b, 486)
        event = await alice.wait_event("call_state", call=a, state="disconnected")
        assert event["code"] == 486
        await server.wait_log(r"event=ended disposition=busy")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_answer_times_out_with_480(server: Server, transport: str) -> None:
    async with await phone(server, "1001", transport) as alice, await phone(server, "1002", transport) as bob:
        a, b = await ring(alice, bob)
        event = await alice.wait_event("call_state", call=a, state="disconnected", timeout=10)
        assert event["code"] == 480
        await bob.wait_event("call_state", call=b, state="disconnected")
        await server.wait_log(r"event=ended disposition=no-answer")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_caller_cancels_while_ringing(server: Server, transport: str) -> None:
    async with await phone(server, "1001", transport) as alice, await phone(server, "1002", transport) as bob:
        a, b = await ring(alice, bob)
        await bob.ringing(b)
        await alice.wait_event("call_state", call=a, state="early")
        await alice.hangup(a)
        event = await alice.wait_event("call_state", call=a, state="disconnected")
        assert event["code"] == 487
        await bob.wait_event("call_state", call=b, state="disconnected")
        await server.wait_log(r"event=ended disposition=cancelled")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_contacts_ring_in_parallel_and_the_loser_stops(server: Server, tmp_path: Path, transport: str) -> None:
    async with (
        await phone(server, "1001", transport) as alice,
        await Phone.start(transport=transport, name="desk") as desk,
        await Phone.start(transport=transport, name="mobile") as mobile,
    ):
        await desk.register(server.sip, "1002", PASSWORDS["1002"])
        await mobile.register(server.sip, "1002", PASSWORDS["1002"])
        a = await alice.call("sip:1002@pbx.local")
        on_desk = (await desk.wait_event("incoming"))["call"]
        on_mobile = (await mobile.wait_event("incoming"))["call"]
        await mobile.answer(on_mobile)
        await alice.wait_event("call_state", call=a, state="confirmed")
        await mobile.wait_event("media", call=on_mobile, active=True)
        await desk.wait_event("call_state", call=on_desk, state="disconnected")
        heard_by_alice, heard_by_mobile = await exchange_tones(tmp_path, alice, a, mobile, on_mobile)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_mobile == pytest.approx(440, abs=15)


async def test_pcmu_caller_and_pcma_callee_are_transcoded(server: Server, tmp_path: Path) -> None:
    async with await phone(server, "1001", codecs=("PCMU",)) as alice, await phone(server, "1002", codecs=("PCMA",)) as bob:
        a, b = await connect(alice, bob)
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)


async def test_unregistered_extension_gets_480_and_unknown_number_404(server: Server) -> None:
    async with await phone(server, "1001") as alice:
        a = await alice.call("sip:1003@pbx.local")
        assert (await alice.wait_event("call_state", call=a, state="disconnected"))["code"] == 480
        a = await alice.call("sip:999999@pbx.local")
        assert (await alice.wait_event("call_state", call=a, state="disconnected"))["code"] == 404
