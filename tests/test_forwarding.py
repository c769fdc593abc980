"""End to end: forwarding and do-not-disturb, set in pbx.yaml or by phone
with feature codes (*72NUMBER, *73, *78, *79), followed by calls between
pjsua2 phones, kept across a restart, shown by GET /api/extensions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, queue_settings, restart_server, start_server

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
QUEUE_NUMBER = "7000"
ABROAD = "+4930123456"  # only 1002 may dial it (class of service)


def extensions(**forward: dict[str, Any]) -> dict[str, Any]:
    """1001-1003, 1002 with a mailbox; ``forward`` by extension number (``e1001=...``)."""
    settings: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    settings["1002"]["voicemail"] = {}
    for key, value in forward.items():
        settings[key.removeprefix("e")]["forward"] = value
    return settings


async def serve(folder: Path, ring_timeout: int = 3, **overrides: Any) -> Server:
    overrides.setdefault("extensions", extensions())
    return await start_server(folder, sip={"ring_timeout": ring_timeout}, sounds={"dir": str(SOUNDS)}, **overrides)


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as started:
        yield started


async def register(server: Server, phones: dict[str, Phone]) -> None:
    for ext, phone in phones.items():
        await phone.register(server.sip, ext, PASSWORDS[ext])


async def api_extensions(server: Server) -> dict[str, dict[str, Any]]:
    status, body = await server.http("/api/extensions")
    assert status == 200, body
    return {item["number"]: item for item in json.loads(body)["items"]}


async def dial_code(server: Server, phone: Phone, code: str, confirmation: str) -> None:
    """``phone`` dials a feature code, the server answers, does it (its log
    says ``confirmation``), says so and hangs up."""
    mark = len(server.log)
    call = await phone.call(f"sip:{code}@pbx.local")
    await phone.wait_event("call_state", call=call, state="confirmed")
    await phone.wait_event("call_state", call=call, state="disconnected")
    await server.wait_log(confirmation, start=mark)


async def rings(caller: Phone, callee: Phone, number: str) -> tuple[int, int]:
    call = await caller.call(f"sip:{number}@pbx.local")
    incoming = await callee.wait_event("incoming")
    return call, incoming["call"]


async def answer(caller: Phone, call: int, callee: Phone, incoming: int) -> None:
    await callee.answer(incoming)
    await caller.wait_event("call_state", call=call, state="confirmed")
    await callee.hangup(incoming)
    await caller.wait_event("call_state", call=call, state="disconnected")


async def not_rung(phone: Phone) -> None:
    with pytest.raises(TimeoutError):
        await phone.wait_event("incoming", timeout=0.3)


async def test_forward_always_in_the_config_rings_the_other_extension(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx", extensions=extensions(e1001={"always": "1002"}))
    try:
        await register(server, phones)
        call, incoming = await rings(phones["1003"], phones["1002"], "1001")
        await server.wait_log(r"event=forwarded reason=always destination=extension:1002 by=1001")
        await answer(phones["1003"], call, phones["1002"], incoming)
        await not_rung(phones["1001"])
        listed = await api_extensions(server)
        assert listed["1001"] == {
            "number": "1001", "name": "User 1001", "dnd": False, "forward": {"always": "extension:1002", "busy": None, "no_answer": None},
        }  # fmt: skip
        # 1002's mailbox takes its busy and unanswered calls unless pbx.yaml says otherwise.
        assert listed["1002"]["forward"] == {"always": None, "busy": "voicemail:1002", "no_answer": "voicemail:1002"}
    finally:
        assert await server.stop() == 0


async def test_forward_by_phone_survives_a_restart_and_star73_clears_it(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx")
    try:
        await register(server, phones)
        await dial_code(server, phones["1001"], "*721002", "1001: forwarding every call to extension:1002")
        assert (await api_extensions(server))["1001"]["forward"]["always"] == "extension:1002"
        assert await server.stop() == 0
        server = await restart_server(server)
        assert (await api_extensions(server))["1001"]["forward"]["always"] == "extension:1002"
        call, incoming = await rings(phones["1003"], phones["1002"], "1001")
        await answer(phones["1003"], call, phones["1002"], incoming)
        await dial_code(server, phones["1001"], "*73", "1001: forwarding off")
        assert (await api_extensions(server))["1001"]["forward"]["always"] is None
        call, incoming = await rings(phones["1003"], phones["1001"], "1001")
        await answer(phones["1003"], call, phones["1001"], incoming)
    finally:
        assert await server.stop() == 0


async def test_busy_and_unanswered_calls_follow_the_forwarding(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx", ring_timeout=2, extensions=extensions(e1001={"busy": "1003", "no_answer": "1002"}))
    try:
        await register(server, phones)
        call, incoming = await rings(phones["1002"], phones["1001"], "1001")
        await phones["1001"].reject(incoming, 486)
        forwarded = await phones["1003"].wait_event("incoming")
        await server.wait_log(r"event=forwarded reason=busy destination=extension:1003 by=1001")
        await answer(phones["1002"], call, phones["1003"], forwarded["call"])
        call, incoming = await rings(phones["1003"], phones["1001"], "1001")
        forwarded = await phones["1002"].wait_event("incoming", timeout=5)  # after sip.ring_timeout
        await phones["1001"].wait_event("call_state", call=incoming, state="disconnected")
        await answer(phones["1003"], call, phones["1002"], forwarded["call"])
    finally:
        assert await server.stop() == 0


async def test_do_not_disturb_sends_calls_to_voicemail_and_away_from_the_queue(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(
        tmp_path / "pbx", inbound={QUEUE_NUMBER: "queue:support"}, queues={"support": queue_settings(["1002", "1003"])}
    )
    try:
        await register(server, phones)
        await dial_code(server, phones["1002"], "*78", "1002: do-not-disturb on")
        assert (await api_extensions(server))["1002"]["dnd"] is True
        _, body = await server.http("/api/queues/support")
        assert {a["extension"]: a["state"] for a in json.loads(body)["agents"]} == {"1002": "dnd", "1003": "available"}
        # A direct call goes where busy ones go: 1002's mailbox.
        mark = len(server.log)
        call = await phones["1001"].call("sip:1002@pbx.local")
        await phones["1001"].wait_event("call_state", call=call, state="confirmed")
        await server.wait_log(r"event=forwarded reason=dnd destination=voicemail:1002 by=1002", start=mark)
        await phones["1001"].hangup(call)
        # The queue offers its call to 1003 although 1002 comes first in line.
        call, incoming = await rings(phones["1001"], phones["1003"], QUEUE_NUMBER)
        await answer(phones["1001"], call, phones["1003"], incoming)
        await not_rung(phones["1002"])
        await dial_code(server, phones["1002"], "*79", "1002: do-not-disturb off")
        call, incoming = await rings(phones["1001"], phones["1002"], "1002")
        await answer(phones["1001"], call, phones["1002"], incoming)
    finally:
        assert await server.stop() == 0


async def test_forwarding_outside_passes_the_forwarding_extensions_rules(tmp_path: Path, phones: dict[str, Phone]) -> None:
    async with await Phone.start(name="carrier") as carrier:
        server = await serve(
            tmp_path / "pbx",
            trunks={"carrier": {"host": f"127.0.0.1:{carrier.sip_port}"}},
            outbound=[{"match": r"^\+49", "trunk": "carrier", "extensions": ["1002"]}],
        )
        try:
            await register(server, phones)
            await dial_code(server, phones["1001"], f"*72{ABROAD}", rf"event=security kind=refused_number .*number=\{ABROAD}")
            await dial_code(server, phones["1002"], f"*72{ABROAD}", rf"1002: forwarding every call to external:\{ABROAD}")
            listed = await api_extensions(server)
            assert (listed["1001"]["forward"]["always"], listed["1002"]["forward"]["always"]) == (None, f"external:{ABROAD}")
            call = await phones["1003"].call("sip:1002@pbx.local")
            incoming = await carrier.wait_event("incoming")
            assert f"sip:{ABROAD}@" in incoming["to"]
            await answer(phones["1003"], call, carrier, incoming["call"])
        finally:
            assert await server.stop() == 0


async def test_a_forwarding_loop_stops_after_a_few_hops(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await serve(tmp_path / "pbx", extensions=extensions(e1001={"always": "1002"}, e1002={"always": "1001"}))
    try:
        await register(server, phones)
        call, incoming = await rings(phones["1003"], phones["1002"], "1001")
        await server.wait_log(r"not forwarded to extension:1001 by 1002: forwarded 5 times already")
        await answer(phones["1003"], call, phones["1002"], incoming)
    finally:
        assert await server.stop() == 0
