"""Busy lamps (RFC 4235): bare SIP subscribers watch 1001 and 1002 while
pjsua2 phones make 1001 call 1002 through `pbx serve`; each change of an
extension's state arrives as a dialog-info NOTIFY in its subscription."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiosipua import SipRequest

from pbx.calls.extension_states import ExtensionState, ExtensionStates
from pbx.events import EventBus
from pbx.sip.blf import CONTENT_TYPE, IDLE, Lamp, dialog_info
from pbx.sip.dialog import LegState
from tests.support.phone import Phone
from tests.support.raw_phone import RawDialog, RawPhone
from tests.support.server import PASSWORDS, Server, start_server

NS = {"d": "urn:ietf:params:xml:ns:dialog-info"}
Seen = tuple[int, str, str | None, str | None]  # version, state, direction, remote identity


def lamp(notify: SipRequest, extension: str) -> Seen:
    """What a dialog NOTIFY for ``extension`` says, its headers checked."""
    assert notify.headers.get_first("Event") == "dialog"
    assert notify.headers.get_first("Content-Type") == CONTENT_TYPE
    root = ET.fromstring(notify.text)
    assert (root.tag, root.get("state"), root.get("entity")) == (f"{{{NS['d']}}}dialog-info", "full", f"sip:{extension}@pbx.local")
    dialogs = root.findall("d:dialog", NS)
    assert len(dialogs) == 1
    remote = dialogs[0].findtext("d:remote/d:identity", namespaces=NS)
    return int(root.get("version", "-1")), dialogs[0].findtext("d:state", namespaces=NS) or "", dialogs[0].get("direction"), remote


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    server = await start_server(tmp_path / "pbx")
    try:
        yield server
    finally:
        await server.stop()


async def watch(server: Server, extension: str) -> tuple[RawPhone, RawDialog]:
    """1003's BLF key for ``extension``, subscribed, its first NOTIFY (idle) read."""
    watcher = await RawPhone.open(("127.0.0.1", server.sip_port), "1003")
    response, dialog = await watcher.subscribe(extension, PASSWORDS["1003"], event="dialog", accept=CONTENT_TYPE)
    assert response.status_code == 200
    assert response.headers.get_first("Allow-Events") == "message-summary, dialog"
    first = await watcher.next_notify()
    assert (first.headers.get_first("Subscription-State") or "").startswith("active;expires=")
    assert lamp(first, extension) == (0, "terminated", None, None)
    return watcher, dialog


async def test_a_busy_lamp_follows_both_ends_of_a_call_until_unsubscribed(server: Server) -> None:
    (bob_lamp, bob_key), (alice_lamp, _) = await watch(server, "1002"), await watch(server, "1001")
    try:
        async with await Phone.start(name="p1001") as alice, await Phone.start(name="p1002") as bob:
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            await bob.register(server.sip, "1002", PASSWORDS["1002"])
            a = await alice.call("sip:1002@pbx.local")
            b = (await bob.wait_event("incoming"))["call"]
            await bob.ringing(b)
            assert lamp(await bob_lamp.next_notify(), "1002") == (1, "early", "recipient", "sip:1001@pbx.local")
            assert lamp(await alice_lamp.next_notify(), "1001") == (1, "early", "initiator", "sip:1002@pbx.local")
            await bob.answer(b)
            assert lamp(await bob_lamp.next_notify(), "1002") == (2, "confirmed", "recipient", "sip:1001@pbx.local")
            assert lamp(await alice_lamp.next_notify(), "1001") == (2, "confirmed", "initiator", "sip:1002@pbx.local")
            await alice.hangup(a)
            assert lamp(await alice_lamp.next_notify(), "1001") == (3, "terminated", None, None)
            assert lamp(await bob_lamp.next_notify(), "1002") == (3, "terminated", None, None)

        response, _ = await bob_lamp.subscribe("1002", dialog=bob_key, expires=0, event="dialog", accept=CONTENT_TYPE)
        assert response.status_code == 200
        final = await bob_lamp.next_notify()
        assert final.headers.get_first("Subscription-State") == "terminated;reason=timeout"
        assert lamp(final, "1002") == (4, "terminated", None, None)
        assert bob_lamp.notifies.empty() and alice_lamp.notifies.empty()
    finally:
        bob_lamp.close()
        alice_lamp.close()


@pytest.mark.parametrize(
    ("extension", "accept", "status"),
    [("4711", CONTENT_TYPE, 404), ("1002", "application/simple-message-summary", 406), ("1002", "application/*", 200)],
)
async def test_any_extension_may_watch_any_other_that_exists(server: Server, extension: str, accept: str, status: int) -> None:
    watcher = await RawPhone.open(("127.0.0.1", server.sip_port), "1003")
    try:
        response, _ = await watcher.subscribe(extension, PASSWORDS["1003"], event="dialog", accept=accept, expires=0)
        assert response.status_code == status
    finally:
        watcher.close()


def test_a_number_from_a_trunk_cannot_break_the_document() -> None:
    body = dialog_info("1002", "pbx.local", 7, Lamp("early", "recipient", '"<x>&'))
    root = ET.fromstring(body)
    assert root.get("version") == "7"
    assert root.findtext("d:dialog/d:remote/d:identity", namespaces=NS) == "sip:%22%3Cx%3E&@pbx.local"
    assert ET.fromstring(dialog_info("1002", "pbx.local", 0, IDLE)).find("d:dialog/d:remote", NS) is None


class _Leg:
    """As much of a Leg as ExtensionStates reads: its state, and where it reports changes."""

    def __init__(self) -> None:
        self.state = LegState.CALLING
        self.on_state: Callable[[Any], None] = lambda leg: None

    def enter(self, state: LegState) -> None:
        self.state = state
        self.on_state(self)


def test_an_extension_in_many_calls_shows_ringing_first_then_the_call_answered_first() -> None:
    events = EventBus()
    shown: list[tuple[str, str | None, str | None]] = []
    events.subscribe("extension_state", lambda extension, state, direction, remote: shown.append((state, direction, remote)))
    states = ExtensionStates(events)
    calls = [_Leg() for _ in range(3)]
    for number, leg in enumerate(calls):
        states.track(leg, "1001", "initiator", f"20{number}")  # type: ignore[arg-type]
    ringing = _Leg()
    states.track(ringing, "1001", "recipient", "300")  # type: ignore[arg-type]
    for leg in calls:
        leg.enter(LegState.EARLY)
    assert shown == [("early", "initiator", "200")]  # two more calling out show nothing new
    calls[2].enter(LegState.ANSWERED)
    calls[1].enter(LegState.ANSWERED)  # answered after calls[2]: stays behind it
    ringing.enter(LegState.EARLY)
    assert shown[1:] == [("confirmed", "initiator", "202"), ("early", "recipient", "300")]
    ringing.enter(LegState.ENDED)
    calls[2].enter(LegState.ENDED)
    calls[0].enter(LegState.ENDED)  # only calling out, behind calls[1]: nothing changes
    assert shown[3:] == [("confirmed", "initiator", "202"), ("confirmed", "initiator", "201")]
    calls[1].enter(LegState.ENDED)
    assert shown[5:] == [("terminated", None, None)]
    assert states.of("1001") == ExtensionState()
