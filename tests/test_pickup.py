"""End to end: call pickup with pjsua2 phones. While 1001's call rings 1002,
1003 (in 1002's pickup group) dials *8, or anyone dials **1002: 1002's
phone stops ringing, 1001 and the picker talk (audio checked by FFT), and
the call's CDR row says who picked it up. *8 with nothing ringing gets 404."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import PASSWORDS, Server, start_server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1002"]["pickup_group"] = extensions["1003"]["pickup_group"] = "office"
    srv = await start_server(tmp_path / "pbx", extensions=extensions)
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def phones(server: Server) -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as p:
        await asyncio.gather(*(p[ext].register(server.sip, ext, pw) for ext, pw in PASSWORDS.items()))
        yield p


def picked_up_row(server: Server) -> dict[str, Any]:
    with sqlite3.connect(server.folder / "pbx.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("select * from cdr where to_number = '1002'")]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("code", ["*8", "**1002"])
async def test_a_call_ringing_another_phone_is_picked_up(server: Server, phones: dict[str, Phone], tmp_path: Path, code: str) -> None:
    caller, rung, picker = phones["1001"], phones["1002"], phones["1003"]
    a = await caller.call("sip:1002@pbx.local")
    ringing = (await rung.wait_event("incoming"))["call"]
    await rung.ringing(ringing)
    await caller.wait_event("call_state", call=a, state="early")
    c = await picker.call(f"sip:{code}@pbx.local")
    await picker.wait_event("call_state", call=c, state="confirmed")
    await rung.wait_event("call_state", call=ringing, state="disconnected")  # CANCEL: it stops ringing
    await caller.wait_event("media", call=a, active=True)
    await picker.wait_event("media", call=c, active=True)
    heard_by_caller, heard_by_picker = await exchange_tones(tmp_path, caller, a, picker, c)
    assert heard_by_caller == pytest.approx(1000, abs=15)
    assert heard_by_picker == pytest.approx(440, abs=15)
    await picker.hangup(c)
    await caller.wait_event("call_state", call=a, state="disconnected")
    await server.wait_log(r"event=ended disposition=answered direction=internal from=1001 to=1002 ")
    row = picked_up_row(server)
    assert (row["disposition"], row["picked_up_by"], row["hangup"]) == ("answered", "1003", "callee")


async def test_pickup_with_nothing_ringing_gets_404(server: Server, phones: dict[str, Phone]) -> None:
    c = await phones["1003"].call("sip:*8@pbx.local")
    ended = await phones["1003"].wait_event("call_state", call=c, state="disconnected")
    assert ended["code"] == 404
