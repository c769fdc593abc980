"""Session timers (RFC 4028): Session-Expires and Min-SE honoured both ways,
the server refreshing the sessions it is responsible for, and a session
nobody refreshes ended as the server ends any call.

The RFC's smallest Min-SE is 90 s. These tests run the server with
sip.session_expires: 4, which makes its Min-SE 4 s too (min(90, the
interval)), so a session expires in seconds; the one with the default
setting checks the 90 s floor. SIPp callers come from a trunk's network and
reach an IVR that waits 30 s for a key, so nothing but the timers ends
their calls. pjsua's own timers cannot go below 90 s, so the phone that is
refreshed every 2 s has its own timers off and only answers ours.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiosipua import SipMessage

from pbx.sip.session_timer import SessionTimer
from tests.support.bare_phone import NUMBER, PROVIDER, ivr_server
from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, Server, start_server
from tests.support.sipp import SippResult, run_sipp

SE = 4  # sip.session_expires in these tests: a refresh every 2 s, expiry 1.3 s before the 4 s are up


def received(result: SippResult, start: str, cseq: str = "") -> list[str]:
    """The messages SIPp received whose first line starts with ``start``
    (and whose CSeq method is ``cseq`` if given), in order, retransmissions left out."""
    messages: dict[str, None] = {}
    for entry in re.split(r"\n-{20,}[^\n]*\n", result.messages_log):
        head, _, message = entry.strip().partition("\n\n")
        if "message received" in head and message.startswith(start) and re.search(rf"CSeq: \d+ {cseq}", message):
            messages[message] = None
    return list(messages)


async def call_ivr(server: Server, scenario: str) -> SippResult:
    result = await run_sipp(scenario, f"127.0.0.1:{server.sip_port}", local_ip=PROVIDER, service=NUMBER, timeout=15)
    assert result.ok, result.report()
    return result


async def test_a_caller_that_never_refreshes_is_hung_up_before_its_session_expires(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, sip={"session_expires": SE})
    try:
        result = await call_ivr(server, "session_timer_idle")
        (ok,) = received(result, "SIP/2.0 200", "INVITE")
        assert f"Session-Expires: {SE};refresher=uac" in ok and "Require: timer" in ok
        row = await server.cdr_row()
        assert (row["disposition"], row["hangup"], row["reason"]) == ("answered", "pbx", "session-expired")
        assert SE - SE / 3 - 0.5 < row["billsec"] < SE  # BYE before expiry (RFC 4028 §10), not long before
    finally:
        await server.stop()


async def test_a_caller_that_refreshes_by_update_and_reinvite_stays_up_past_the_expiry(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, sip={"session_expires": SE})
    try:
        result = await call_ivr(server, "session_timer_refresh")  # fails on any BYE from the server
        refreshed = received(result, "SIP/2.0 200", "(UPDATE|INVITE)")
        assert len(refreshed) == 4  # the call, UPDATE, re-INVITE, UPDATE
        assert all(f"Session-Expires: {SE};refresher=uac" in m for m in refreshed)
        row = await server.cdr_row()
        assert (row["hangup"], row["reason"]) == ("caller", None)
        assert row["billsec"] > 1.5 * SE
    finally:
        await server.stop()


async def test_the_server_refreshes_a_caller_without_timers_by_reinvite_with_the_same_sdp(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, sip={"session_expires": SE})
    try:
        result = await call_ivr(server, "session_timer_none")  # fails unless two re-INVITEs come within 5 s each
        (ok,) = received(result, "SIP/2.0 200", "INVITE")
        assert f"Session-Expires: {SE};refresher=uas" in ok and "Require:" not in ok
        reinvites = received(result, "INVITE ")
        assert len(reinvites) == 2
        assert all(f"Session-Expires: {SE};refresher=uac" in m for m in reinvites)
        origins = [line for m in [ok, *reinvites] for line in re.findall(r"^o=.*$", m, re.MULTILINE)]
        assert len(origins) == 3 and len(set(origins)) == 1, origins  # our SDP as answered, same version: nothing changed
        assert (await server.cdr_row())["hangup"] == "caller"
    finally:
        await server.stop()


async def test_a_refresh_answered_481_ends_the_call(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, sip={"session_expires": SE})
    try:
        await call_ivr(server, "session_timer_gone")  # fails unless the BYE follows the 481
        row = await server.cdr_row()
        assert (row["hangup"], row["reason"]) == ("pbx", "session-expired")
        assert row["billsec"] < SE  # at the refresh (SE / 2), not at expiry
    finally:
        await server.stop()


async def test_too_brief_a_session_interval_gets_422_with_the_rfc_min_se(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)  # sip.session_expires 1800: Min-SE 90
    try:
        result = await call_ivr(server, "session_timer_422")
        (refused,) = received(result, "SIP/2.0 422")
        assert re.search(r"^Min-SE: 90$", refused, re.IGNORECASE | re.MULTILINE)  # aiosipua writes "Min-Se"
        (ok,) = received(result, "SIP/2.0 200", "INVITE")
        assert "Session-Expires: 90;refresher=uac" in ok
        row = await server.cdr_row()  # one call: the refused INVITE left no row
        assert (row["disposition"], row["hangup"]) == ("answered", "caller")
    finally:
        await server.stop()


async def phone(server: Server, ext: str, *, session_timers: bool = True) -> Phone:
    p = await Phone.start(name=f"p{ext}", session_timers=session_timers)
    await p.register(server.sip, ext, PASSWORDS[ext])
    return p


async def connect(caller: Phone, callee: Phone, refused: int | None = None) -> tuple[int, int]:
    """``caller`` calls ``callee`` through the server, the callee answers; with
    ``refused`` it first refuses an INVITE with that status by itself."""
    a = await caller.call("sip:1002@pbx.local")
    b = (await callee.wait_event("incoming"))["call"]
    if refused is not None:
        assert (await callee.wait_event("call_state", call=b, state="disconnected"))["code"] == refused
        b = (await callee.wait_event("incoming"))["call"]
    await callee.answer(b)
    for p, call in ((caller, a), (callee, b)):
        await p.wait_event("call_state", call=call, state="confirmed")
        await p.wait_event("media", call=call, active=True)
    return a, b


async def test_a_bridged_callee_refreshed_by_update_keeps_the_call_and_its_audio(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", sip={"session_expires": SE})
    try:
        async with await phone(server, "1001") as alice, await phone(server, "1002", session_timers=False) as bob:
            a, b = await connect(alice, bob)
            for _ in range(3):  # three refresh intervals: its 2xx named no timer, so the server refreshes
                await bob.wait_event("request", call=b, method="UPDATE", timeout=SE)
            heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
            assert heard_by_alice == pytest.approx(1000, abs=15)
            assert heard_by_bob == pytest.approx(440, abs=15)
            await alice.hangup(a)
            await bob.wait_event("call_state", call=b, state="disconnected")
        assert (await server.cdr_row())["hangup"] == "caller"
    finally:
        await server.stop()


async def test_a_callee_with_a_longer_min_se_gets_the_call_after_a_422(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", sip={"session_expires": SE})
    try:
        async with await phone(server, "1001") as alice, await phone(server, "1002") as bob:
            # pjsua refuses Session-Expires: 4 with 422, Min-SE: 90; the server asks again for 90 s.
            a, b = await connect(alice, bob, refused=422)
            heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
            assert (heard_by_alice, heard_by_bob) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
            await alice.hangup(a)
        assert (await server.cdr_row())["disposition"] == "answered"
    finally:
        await server.stop()


def message(text: str) -> SipMessage:
    head = "INVITE sip:8000@pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\nCSeq: 1 INVITE\r\n"
    return SipMessage.parse(head + text.replace("\n", "\r\n") + "\r\n")


@pytest.mark.parametrize(
    ("headers", "answer"),
    [
        ("Supported: timer\nSession-Expires: 1800", "1800;refresher=uac"),  # the caller refreshes
        ("Supported: timer\nSession-Expires: 600;refresher=uas", "600;refresher=uas"),  # as it asks
        ("Supported: timer\nSession-Expires: 7200;refresher=uac", "1800;refresher=uac"),  # shortened to ours
        ("Supported: timer\nSession-Expires: 100\nMin-SE: 100", "100;refresher=uac"),
        ("Supported: timer", "1800;refresher=uac"),
        ("", "1800;refresher=uas"),  # no support: we refresh
        ("Session-Expires: 1800;refresher=uac", "1800;refresher=uas"),  # a proxy asked; the caller cannot
    ],
)
async def test_the_answer_to_an_invite(headers: str, answer: str) -> None:
    timer = SessionTimer(1800, lambda on_answer, by_invite: None, lambda: None)
    try:
        assert timer.answer(message(headers))["Session-Expires"] == answer
    finally:
        timer.stop()


async def test_too_brief_and_a_422_raising_what_we_ask_for() -> None:
    timer = SessionTimer(SE, lambda on_answer, by_invite: None, lambda: None)
    assert timer.too_brief(message("Session-Expires: 3")) == SE
    assert timer.too_brief(message(f"Session-Expires: {SE}")) is None
    assert SessionTimer(1800, lambda on_answer, by_invite: None, lambda: None).too_brief(message("Session-Expires: 89")) == 90
    assert timer.raise_to(message("Min-SE: 90"))
    assert timer.request_headers() == {"Supported": "timer", "Session-Expires": "90", "Min-SE": "90"}
    assert not timer.raise_to(message("Min-SE: 60"))  # no higher than what we ask for: asking again would not help
