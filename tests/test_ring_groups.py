"""End to end: ring groups (`group:NAME`) ring their members all at once
or one after another, skip members in do-not-disturb, and send the call to
`on_fail` when nobody answers; pjsua2 phones against `pbx serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import PASSWORDS, Server, start_server

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
GROUP_NUMBER = "600"
EXTENSIONS = {**PASSWORDS, "1004": "secret-1004"}


async def serve(folder: Path, **group: Any) -> Server:
    """A server whose group `sales` (members 1002, 1003; ``group`` on top)
    answers at 600; 1002 may be in one call at a time."""
    extensions: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in EXTENSIONS.items()}
    extensions["1002"]["max_calls"] = 1
    return await start_server(
        folder,
        sounds={"dir": str(SOUNDS)},
        extensions=extensions,
        inbound={GROUP_NUMBER: "group:sales"},
        groups={"sales": {"members": ["1002", "1003"], **group}},
    )


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(EXTENSIONS) as started:
        yield started


async def register(server: Server, phones: dict[str, Phone]) -> None:
    for ext, phone in phones.items():
        await phone.register(server.sip, ext, EXTENSIONS[ext])


async def not_rung(phone: Phone, timeout: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await phone.wait_event("incoming", timeout=timeout)


async def test_ringall_rings_every_member_and_the_first_to_answer_gets_the_call(
    tmp_path: Path, phones: dict[str, Phone]
) -> None:
    server = await serve(tmp_path / "pbx")
    try:
        await register(server, phones)
        call = await phones["1001"].call(f"sip:{GROUP_NUMBER}@pbx.local")
        rung_2 = (await phones["1002"].wait_event("incoming"))["call"]
        rung_3 = (await phones["1003"].wait_event("incoming"))["call"]
        await phones["1003"].answer(rung_3)
        await phones["1001"].wait_event("call_state", call=call, state="confirmed")
        await phones["1002"].wait_event("call_state", call=rung_2, state="disconnected")
        await phones["1003"].wait_event("media", call=rung_3, active=True)
        heard_by_caller, heard_by_member = await exchange_tones(tmp_path, phones["1001"], call, phones["1003"], rung_3)
        assert (heard_by_caller, heard_by_member) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
        # Only the member who answered is in the call: 1002 (max_calls 1) may be rung again at once.
        call_2 = await phones["1004"].call("sip:1002@pbx.local")
        await phones["1002"].wait_event("incoming")
        await phones["1004"].hangup(call_2)
        await phones["1001"].hangup(call)
        await server.wait_log(r"event=ended disposition=answered")
    finally:
        assert await server.stop() == 0


async def test_hunt_rings_the_members_in_order_skipping_those_in_dnd(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx", members=["1004", "1002", "1003"], strategy="hunt", ring_timeout=1)
    try:
        await register(server, phones)
        dnd = await phones["1004"].call("sip:*78@pbx.local")
        await phones["1004"].wait_event("call_state", call=dnd, state="disconnected")
        await server.wait_log(r"1004: do-not-disturb on")
        call = await phones["1001"].call(f"sip:{GROUP_NUMBER}@pbx.local")
        first = (await phones["1002"].wait_event("incoming"))["call"]
        await not_rung(phones["1003"])
        await phones["1002"].wait_event("call_state", call=first, state="disconnected", timeout=3)  # its ring_timeout
        second = (await phones["1003"].wait_event("incoming"))["call"]
        await phones["1003"].answer(second)
        await phones["1001"].wait_event("call_state", call=call, state="confirmed")
        await phones["1001"].hangup(call)
        await not_rung(phones["1004"], timeout=0.01)  # never rung: an event would be buffered by now
    finally:
        assert await server.stop() == 0


async def test_on_fail_takes_the_call_when_nobody_answers(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx", ring_timeout=1, on_fail="extension:1004")
    try:
        await register(server, phones)
        call = await phones["1001"].call(f"sip:{GROUP_NUMBER}@pbx.local")
        rung = [(await phones[ext].wait_event("incoming"))["call"] for ext in ("1002", "1003")]
        fallback = (await phones["1004"].wait_event("incoming", timeout=3))["call"]
        for ext, member_call in zip(("1002", "1003"), rung, strict=True):
            await phones[ext].wait_event("call_state", call=member_call, state="disconnected")
        await server.wait_log(r"event=forwarded reason=no-answer destination=extension:1004 by=group:sales")
        await phones["1004"].answer(fallback)
        await phones["1001"].wait_event("call_state", call=call, state="confirmed")
        await phones["1001"].hangup(call)
    finally:
        assert await server.stop() == 0
