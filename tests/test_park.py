"""End to end: call park with pjsua2 phones. 1002, talking to 1001,
blind-transfers it to 70: 1002 hears the slot (71) spoken before it is
released, the API lists the call as parked in slot 71, and 1003 dials 71
and talks to 1001 (audio checked by FFT). A parked call nobody takes rings
1002 again after park.timeout (here parked through the API, whose
transfer releases the parker at once). The park's config is checked
with FILE:LINE messages."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pbx.calls.routing import route_dialed
from pbx.config.load import load_config
from pbx.config.model import ConfigError, Destination, ParkConfig
from tests.support.audio import sound_spans
from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import PASSWORDS, Server, start_server

SOUNDS = Path(__file__).resolve().parent.parent / "config" / "sounds"
TIMEOUT = 3  # park.timeout, seconds


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    srv = await start_server(tmp_path / "pbx", extensions=extensions, sounds={"dir": str(SOUNDS)}, park={"timeout": TIMEOUT})
    yield srv
    assert await srv.stop() == 0
    assert [line for line in srv.log if "kind=rtp_stranger" in line] == []  # a party moved in is no stranger: fail2ban reads these


@pytest.fixture
async def phones(server: Server) -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as p:
        await asyncio.gather(*(p[ext].register(server.sip, ext, pw) for ext, pw in PASSWORDS.items()))
        yield p


async def connect(caller: Phone, callee: Phone) -> tuple[int, int]:
    a = await caller.call("sip:1002@pbx.local")
    b = (await callee.wait_event("incoming"))["call"]
    await callee.answer(b)
    await caller.wait_event("media", call=a, active=True)
    await callee.wait_event("media", call=b, active=True)
    return a, b


async def park(caller: Phone, parker: Phone, heard: Path) -> int:
    """1001 calls 1002, which parks it; what 1002 heard until released is in ``heard``. 1001's call."""
    a, b = await connect(caller, parker)
    await parker.record(b, heard)
    await parker.xfer(b, "sip:70@pbx.local")
    status = await parker.wait_event("xfer_status", call=b, final=True)
    await parker.stop_record(b)
    assert status["code"] == 200
    await parker.wait_event("call_state", call=b, state="disconnected")
    return a


async def test_a_call_transferred_to_the_park_waits_in_a_slot_that_any_phone_dials(
    server: Server, phones: dict[str, Phone], tmp_path: Path
) -> None:
    a = await park(phones["1001"], phones["1002"], tmp_path / "parker.wav")
    await server.wait_log(r"event=parked slot=71 by=1002")
    speech = sum(end - start for start, end in sound_spans(tmp_path / "parker.wav"))
    assert speech > 1.5  # "The call is parked at seventy one", and nothing else was said to the parker
    status, body = await server.http("/api/calls")
    assert status == 200
    [parked] = json.loads(body)["items"]
    assert (parked["state"], parked["from"], parked["to"], parked["transferred_by"]) == ("parked", "1001", "71", "1002")
    c = await phones["1003"].call("sip:71@pbx.local")
    await phones["1003"].wait_event("media", call=c, active=True)
    heard_by_caller, heard_by_taker = await exchange_tones(tmp_path, phones["1001"], a, phones["1003"], c)
    assert heard_by_caller == pytest.approx(1000, abs=15)
    assert heard_by_taker == pytest.approx(440, abs=15)
    await phones["1001"].hangup(a)
    await phones["1003"].wait_event("call_state", call=c, state="disconnected")
    await server.wait_log(r"event=ended disposition=answered direction=internal from=1001 to=71 ")
    with sqlite3.connect(server.folder / "pbx.db") as db:
        row = db.execute("select transferred_by, picked_up_by from cdr where to_number = '71'").fetchone()
    assert row == ("1002", "1003")


async def test_a_parked_call_nobody_takes_rings_its_parker_again(server: Server, phones: dict[str, Phone], tmp_path: Path) -> None:
    a, b = await connect(phones["1001"], phones["1002"])
    base = f"http://127.0.0.1:{server.http_port}/api/calls"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer test-token"}) as http:
        async with http.get(base) as resp:
            [call] = (await resp.json())["items"]
        async with http.post(f"{base}/{call['id']}/transfer", json={"to": "70"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["to"] == "71"
    await phones["1002"].wait_event("call_state", call=b, state="disconnected")
    again = await phones["1002"].wait_event("incoming", timeout=TIMEOUT + 5)
    assert "1001" in again["from"]
    await phones["1002"].answer(again["call"])
    await phones["1002"].wait_event("media", call=again["call"], active=True)
    heard_by_caller, heard_by_parker = await exchange_tones(tmp_path, phones["1001"], a, phones["1002"], again["call"])
    assert heard_by_caller == pytest.approx(1000, abs=15)
    assert heard_by_parker == pytest.approx(440, abs=15)
    await phones["1001"].hangup(a)


def test_park_slots_and_pickup_groups_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text("""\
extensions:
  "1001": {name: A, password: secret-1001, pickup_group: office}
park: {slots: [81, 83], timeout: 30}
features: {pickup: "*9"}
""")
    cfg = load_config(path, env={})
    assert (cfg.park, cfg.extensions["1001"].pickup_group) == (ParkConfig(81, 83, 30), "office")
    for number in ("70", "81", "83", "*9", "**1001"):
        assert route_dialed(cfg, number) == Destination("feature", number)
    assert route_dialed(cfg, "84").kind == route_dialed(cfg, "*8").kind == "external"
    path.write_text("""\
extensions:
  "1001": {name: A, password: secret-1001}
park:
  slots: [1000, 1009]
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert [str(issue) for issue in caught.value.issues] == [f"{path}:4: park.slots 1000-1009 hold extension 1001's number"]
    path.write_text("park:\n  timeout: 60\n  slots: [79, 71]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    [issue] = caught.value.issues
    assert str(issue).startswith(f"{path}:3: park.slots must be the first and last slot number")
