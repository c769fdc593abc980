"""End to end: callers dial an IVR number on `pbx serve`, hear its prompts, press
keys (pjsua2 RFC 4733 and SIPp's DTMF pcaps) and land where the flow says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.audio import duration, read_samples, rms, sound_spans
from tests.support.phone import Phone, exchange_tones
from tests.support.server import PASSWORDS, Server, start_server
from tests.support.sipp import run_sipp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
SIPP = Path(__file__).parent / "sipp"

FLOW = """
start: hours
nodes:
  hours: {type: hours, open: "OPEN", "true": welcome, "false": closed}
  welcome: {type: play, prompt: welcome, next: menu}
  menu:
    type: menu
    prompt: menu
    options: {"1": extension:1002, "3": account}
    timeout: 1
    retries: 1
    invalid: invalid
    on_fail: extension:1003
  account: {type: collect, prompt: enter-account, var: account, max_digits: 6, terminator: "#", timeout: 3, next: lookup}
  lookup: {type: http, url: "CRM?account={account}", timeout: 1, next: route, on_error: extension:1003}
  route: {type: branch, var: vip, cases: {"true": extension:1002}, default: extension:1003}
  closed: {type: play, prompt: closed, next: hangup}
"""

# For SIPp, which presses its key a second after answering.
MENU_FIRST = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": extension:1002}, timeout: 5, on_fail: extension:1003}
"""


def closed_window() -> str:
    """Opening hours that start two hours from now (UTC), so the flow is closed."""
    start = (datetime.now(UTC).hour + 2) % 24
    return f"{start:02d}:00-{start + 1:02d}:00" if start < 23 else "23:00-24:00"


@pytest.fixture
async def crm() -> AsyncIterator[str]:
    """A CRM: account 42 is a VIP, 7 answers too late, anything else is not a VIP."""

    async def lookup(request: web.Request) -> web.Response:
        if request.query.get("account") == "7":
            await asyncio.sleep(3)
        return web.json_response({"vip": request.query.get("account") == "42"})

    app = web.Application()
    app.router.add_get("/lookup", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/lookup"
    await runner.cleanup()


async def ivr_server(
    tmp_path: Path, crm: str = "http://127.0.0.1:9/lookup", hours: str = "00:00-24:00", flow: str = FLOW
) -> Server:
    folder = tmp_path / "pbx"
    (folder / "ivr_flows").mkdir(parents=True)
    (folder / "ivr_flows" / "main.yaml").write_text(flow.replace("OPEN", hours).replace("CRM", crm))
    return await start_server(
        folder,
        ivr={"dir": str(folder / "ivr_flows")},
        sounds={"dir": str(SOUNDS)},
        inbound={"8000": "ivr:main"},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
    )


@pytest.fixture
async def phones(tmp_path: Path) -> AsyncIterator[tuple[Phone, Phone, Phone]]:
    async with (
        await Phone.start(name="alice") as alice,
        await Phone.start(name="bob") as bob,
        await Phone.start(name="carol") as carol,
    ):
        yield alice, bob, carol


async def register_all(server: Server, phones: tuple[Phone, Phone, Phone]) -> None:
    for phone, ext in zip(phones, ("1001", "1002", "1003"), strict=True):
        await phone.register(server.sip, ext, PASSWORDS[ext])


async def dial_ivr(alice: Phone) -> int:
    call = await alice.call("sip:8000@pbx.local")
    await alice.wait_event("call_state", call=call, state="confirmed")
    await alice.wait_event("media", call=call, active=True)
    return call


async def test_caller_hears_the_prompts_barges_in_and_is_bridged(
    tmp_path: Path, phones: tuple[Phone, Phone, Phone]
) -> None:
    alice, bob, _ = phones
    server = await ivr_server(tmp_path)
    try:
        await register_all(server, phones)
        call = await dial_ivr(alice)
        started = asyncio.get_running_loop().time()
        await alice.record(call, tmp_path / "prompt.wav")
        await asyncio.sleep(duration(SOUNDS / "welcome.wav") + 1.0)  # into the menu prompt
        await alice.dtmf(call, "1")
        incoming = await bob.wait_event("incoming")
        waited = asyncio.get_running_loop().time() - started
        await alice.stop_record(call)
        prompts = duration(SOUNDS / "welcome.wav") + duration(SOUNDS / "menu.wav")
        assert waited < prompts - 1.0, "the key did not cut the menu prompt short"
        assert rms(tmp_path / "prompt.wav", skip_seconds=0.2) > 0.01

        await bob.answer(incoming["call"])
        await bob.wait_event("media", call=incoming["call"], active=True)
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, call, bob, incoming["call"])
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        await alice.hangup(call)
        await bob.wait_event("call_state", call=incoming["call"], state="disconnected")
        assert await server.metric("pbx_ivr_node_visits_total", flow="main", node="menu") == 1
    finally:
        assert await server.stop() == 0


async def test_prompt_arrives_whole_then_timeouts_run_out_to_on_fail(
    tmp_path: Path, phones: tuple[Phone, Phone, Phone]
) -> None:
    alice, _, carol = phones
    server = await ivr_server(tmp_path)
    try:
        await register_all(server, phones)
        call = await dial_ivr(alice)
        await alice.record(call, tmp_path / "heard.wav")
        incoming = await carol.wait_event("incoming", timeout=30)
        await alice.stop_record(call)
        await carol.reject(incoming["call"], 486)
        await alice.wait_event("call_state", call=call, state="disconnected")
    finally:
        assert await server.stop() == 0

    # welcome + menu, a one-second timeout, the menu again, a timeout: then on_fail.
    spans = sound_spans(tmp_path / "heard.wav")
    assert len(spans) == 2, spans
    first_expected = duration(SOUNDS / "welcome.wav") + duration(SOUNDS / "menu.wav")
    assert spans[0][1] - spans[0][0] == pytest.approx(first_expected, abs=0.5)
    assert spans[1][1] - spans[1][0] == pytest.approx(duration(SOUNDS / "menu.wav"), abs=0.5)
    assert spans[1][0] - spans[0][1] == pytest.approx(1.0, abs=0.4)
    heard, rate = read_samples(tmp_path / "heard.wav")
    source, source_rate = read_samples(SOUNDS / "menu.wav")
    level = float((heard[int(spans[1][0] * rate) : int(spans[1][1] * rate)] ** 2).mean() ** 0.5)
    assert level == pytest.approx(float((source**2).mean() ** 0.5), rel=0.5)


async def test_invalid_key_plays_invalid_and_the_menu_again(tmp_path: Path, phones: tuple[Phone, Phone, Phone]) -> None:
    alice, bob, _ = phones
    server = await ivr_server(tmp_path)
    try:
        await register_all(server, phones)
        call = await dial_ivr(alice)
        await server.wait_log(r"ivr main: menu")
        await alice.dtmf(call, "9")
        await server.wait_log(r"flow main menu: key 9 is not an option")
        await alice.dtmf(call, "1")
        await bob.wait_event("incoming")
    finally:
        assert await server.stop() == 0


@pytest.mark.parametrize(
    ("account", "service", "reached"),
    [("42", "up", "bob"), ("55", "up", "carol"), ("7", "up", "carol"), ("42", "down", "carol")],
    ids=["vip-answered", "not-vip", "slow-service", "service-down"],
)
async def test_collected_account_is_looked_up_over_http(
    tmp_path: Path, phones: tuple[Phone, Phone, Phone], crm: str, account: str, service: str, reached: str
) -> None:
    alice, bob, carol = phones
    server = await ivr_server(tmp_path, crm=crm if service == "up" else "http://127.0.0.1:9/lookup")
    try:
        await register_all(server, phones)
        call = await dial_ivr(alice)
        await server.wait_log(r"ivr main: menu")
        await alice.dtmf(call, "3")
        await server.wait_log(r"ivr main: account")
        await alice.dtmf(call, f"{account}#")
        await {"bob": bob, "carol": carol}[reached].wait_event("incoming", timeout=10)
        routed = await server.wait_log(r"event=routed flow=main ")  # after any lookup failure line
        failed = any("node lookup: GET" in line and "failed" in line for line in server.log[: server.log.index(routed)])
        assert failed == (account == "7" or service == "down")
    finally:
        assert await server.stop() == 0


async def test_closed_hours_play_closed_and_hang_up(tmp_path: Path, phones: tuple[Phone, Phone, Phone]) -> None:
    alice, _, _ = phones
    server = await ivr_server(tmp_path, hours=closed_window())
    try:
        await register_all(server, phones)
        call = await dial_ivr(alice)
        await alice.record(call, tmp_path / "closed.wav")
        await alice.wait_event("call_state", call=call, state="disconnected", timeout=15)
        await alice.stop_record(call)
        [span] = sound_spans(tmp_path / "closed.wav")
        assert span[1] - span[0] == pytest.approx(duration(SOUNDS / "closed.wav"), abs=0.5)
        assert await server.metric("pbx_ivr_node_visits_total", flow="main", node="closed") == 1
    finally:
        assert await server.stop() == 0


async def test_sipp_dtmf_pcap_routes_the_call(tmp_path: Path, phones: tuple[Phone, Phone, Phone]) -> None:
    _, bob, _ = phones
    server = await ivr_server(tmp_path, flow=MENU_FIRST)
    try:
        await register_all(server, phones)
        caller = asyncio.create_task(
            run_sipp(
                SIPP / "ivr_dtmf.xml", server.sip, local_ip="127.0.0.2", service="8000", extra=("-set", "wait", "1000")
            )
        )
        incoming = await bob.wait_event("incoming", timeout=15)
        await bob.answer(incoming["call"])
        await bob.wait_event("call_state", call=incoming["call"], state="confirmed")
        await bob.hangup(incoming["call"])
        result = await caller
        assert result.returncode == 0, result.report()
    finally:
        assert await server.stop() == 0


async def test_g722_caller_hears_the_wideband_prompt(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path, flow=MENU_FIRST)
    try:
        async with await Phone.start(name="wide", codecs=("G722",)) as wide:
            await wide.register(server.sip, "1001", PASSWORDS["1001"])
            call = await dial_ivr(wide)
            await wide.record(call, tmp_path / "g722.wav")
            await asyncio.sleep(duration(SOUNDS / "menu.wav") + 1.0)  # the recording's length
            await wide.stop_record(call)
        spans = sound_spans(tmp_path / "g722.wav")
        assert spans, "nothing was heard"
        assert spans[0][1] - spans[0][0] == pytest.approx(duration(SOUNDS / "menu.wav"), abs=0.5)
    finally:
        assert await server.stop() == 0
