"""The IVR engine's decisions, with a scripted caller and a real HTTP service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web

from pbx.config.load import load_config
from pbx.config.model import Destination
from pbx.events import EventBus
from pbx.ivr.engine import IvrSession
from pbx.ivr.flows import load_flows
from pbx.ivr.nodes import Flow

FLOW = """
start: hours
nodes:
  hours: {type: hours, open: "mon-fri 09:00-17:00", holidays: [2026-12-25], "true": menu, "false": closed}
  menu:
    type: menu
    prompt: [welcome, menu]
    options: {"1": extension:1001, "2": account, "0": queue:support, "*": menu}
    timeout: 0.05
    retries: 2
    invalid: invalid
    on_fail: closed
  account: {type: collect, prompt: enter-account, var: account, max_digits: 4, terminator: "#", timeout: 0.05, next: lookup, on_fail: menu}
  lookup: {type: http, url: "URL?account={account}&caller={caller}", timeout: 0.3, next: route, on_error: sorry}
  route: {type: branch, var: vip, cases: {"true": extension:1002}, default: greet}
  greet: {type: set, vars: {greeting: "hello {name}"}, next: bye}
  bye: {type: play, prompt: "say:{greeting}", next: done}
  done: {type: hangup}
  sorry: {type: play, prompt: invalid, next: extension:1003}
  closed: {type: play, prompt: closed, next: voicemail:1001}
"""
OPEN = datetime(2026, 11, 23, 10, 0)  # a Monday
CLOSED = datetime(2026, 11, 23, 18, 0)
HOLIDAY = datetime(2026, 12, 25, 10, 0)  # a Friday


class ScriptedCaller:
    """Presses the scripted keys in order: after each prompt, or during it with barge-in."""

    def __init__(self, keys: str = "", *, barge_in: bool = False) -> None:
        self.keys = list(keys)
        self.barge_in = barge_in
        self.heard: list[str] = []

    async def play(self, parts: Sequence[str], *, interruptible: bool) -> str | None:
        for part in parts:
            self.heard.append(part)
            if interruptible and self.barge_in and self.keys:
                return self.keys.pop(0)
        return None

    async def digit(self, timeout: float) -> str | None:
        if self.keys:
            return self.keys.pop(0)
        await asyncio.sleep(timeout)
        return None

    def flush(self) -> None:
        pass


@pytest.fixture
async def crm() -> AsyncIterator[str]:
    """A CRM that knows account 42 as a VIP, answers 7 slowly and 13 with junk."""

    async def lookup(request: web.Request) -> web.Response:
        account = request.query.get("account")
        if account == "7":
            await asyncio.sleep(2)
        if account == "13":
            return web.Response(text="not json")
        vip = account == "42"
        return web.json_response({"vip": vip, "name": f"caller {request.query.get('caller')}"})

    app = web.Application()
    app.router.add_get("/lookup", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/lookup"
    await runner.cleanup()


def flows(tmp_path: Path, url: str) -> dict[str, Flow]:
    (tmp_path / "ivr_flows").mkdir()
    (tmp_path / "ivr_flows" / "main.yaml").write_text(FLOW.replace("URL", url))
    (tmp_path / "pbx.yaml").write_text(
        "extensions:\n"
        + "".join(f"  '{n}': {{name: X, password: long-enough-pw, voicemail: {{}}}}\n" for n in ("1001", "1002", "1003"))
        + "queues:\n  support: {agents: ['1001']}\n"
    )
    config = load_config(tmp_path / "pbx.yaml", env={})
    loaded, issues = load_flows(config.ivr.dir, config, lambda name: True)
    assert issues == []
    return loaded


async def walk(
    tmp_path: Path, url: str, caller: ScriptedCaller, when: datetime = OPEN, events: EventBus | None = None
) -> Destination:
    async with aiohttp.ClientSession() as http:
        session = IvrSession(
            flows(tmp_path, url),
            "main",
            caller,
            variables={"caller": "5551234", "called": "8000", "call_id": "x"},
            timezone="UTC",
            http=http,
            events=events or EventBus(),
            available=lambda d: d.kind != "queue",
            now=lambda tz: when.replace(tzinfo=ZoneInfo("UTC")),
        )
        return await session.run()


async def test_menu_choice_after_the_prompt(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("1")
    assert await walk(tmp_path, crm, caller) == Destination("extension", "1001")
    assert caller.heard == ["welcome", "menu"]


async def test_barge_in_cuts_the_prompt_and_counts(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("1", barge_in=True)
    assert await walk(tmp_path, crm, caller) == Destination("extension", "1001")
    assert caller.heard == ["welcome"]


async def test_invalid_key_replays_and_retries_run_out_to_on_fail(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("999")
    assert await walk(tmp_path, crm, caller) == Destination("voicemail", "1001")
    assert caller.heard == ["welcome", "menu", "invalid"] * 3 + ["closed"]


async def test_no_input_times_out_to_on_fail(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("")
    assert await walk(tmp_path, crm, caller) == Destination("voicemail", "1001")
    assert caller.heard.count("menu") == 3


async def test_star_replays_the_menu(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("*1")
    assert await walk(tmp_path, crm, caller) == Destination("extension", "1001")
    assert caller.heard.count("welcome") == 2


async def test_closed_hours_and_holidays(tmp_path: Path, crm: str) -> None:
    assert await walk(tmp_path, crm, ScriptedCaller("1"), when=CLOSED) == Destination("voicemail", "1001")
    holiday = tmp_path / "h"
    holiday.mkdir()
    assert await walk(holiday, crm, ScriptedCaller("1"), when=HOLIDAY) == Destination("voicemail", "1001")


async def test_unavailable_destination_takes_on_fail(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("0")
    assert await walk(tmp_path, crm, caller) == Destination("voicemail", "1001")


async def test_collect_with_terminator_then_http_says_vip(tmp_path: Path, crm: str) -> None:
    events = EventBus()
    visits: list[str] = []
    events.subscribe("ivr_node_visit", lambda flow, node: visits.append(node))
    assert await walk(tmp_path, crm, ScriptedCaller("242#"), events=events) == Destination("extension", "1002")
    assert visits == ["hours", "menu", "account", "lookup", "route"]


async def test_http_fields_become_variables(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("2555#")
    assert await walk(tmp_path, crm, caller) == Destination("hangup", "")
    assert caller.heard[-1] == "say:hello caller 5551234"


async def test_collect_stops_at_max_digits(tmp_path: Path, crm: str) -> None:
    caller = ScriptedCaller("2123456")
    assert await walk(tmp_path, crm, caller) == Destination("hangup", "")


@pytest.mark.parametrize("account", ["7", "13"])
async def test_slow_or_broken_service_takes_on_error(tmp_path: Path, crm: str, account: str) -> None:
    caller = ScriptedCaller(f"2{account}#")
    started = asyncio.get_running_loop().time()
    assert await walk(tmp_path, crm, caller) == Destination("extension", "1003")
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_service_down_takes_on_error(tmp_path: Path) -> None:
    caller = ScriptedCaller("242#")
    assert await walk(tmp_path, "http://127.0.0.1:9/lookup", caller) == Destination("extension", "1003")
