"""End to end: transfer by keys with pjsua2 phones (RFC 4733 DTMF). ``##``
and a number sends the other party there and hangs the transferor up;
the keys of the code never reach the other party, while other keys pass
at once and a ``#`` that begins no code reaches it a moment later. A
number that leads nowhere keeps the call. ``*2`` and a number lets the
transferor talk to the target while the other party hears music; hanging
up joins them, hanging up while the target rings makes it blind, and a
busy target brings the transferor back."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import PASSWORDS, Server, start_server
from tests.test_config import errors, load
from tests.test_hold_music import DEFAULT_HZ, write_sounds
from tests.test_transfer import SOUNDS, connect, heard, rows_when_ended


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    sounds = write_sounds(tmp_path / "sounds")  # music on hold: a plain tone
    for prompt in ("invalid", "forward-refused"):
        shutil.copy(SOUNDS / f"{prompt}.wav", sounds)
    srv = await start_server(tmp_path / "pbx", sip={"ring_timeout": 4}, extensions=extensions, sounds={"dir": str(sounds)})
    yield srv
    assert await srv.stop() == 0
    assert [line for line in srv.log if "kind=rtp_stranger" in line] == []  # a party moved in is no stranger: fail2ban reads these


@pytest.fixture
async def phones(server: Server) -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as p:
        await asyncio.gather(*(p[ext].register(server.sip, ext, PASSWORDS[ext]) for ext in PASSWORDS))
        yield p


def keys_heard(phone: Phone) -> str:
    """The keys ``phone`` received so far, in order (consumed)."""
    keys = "".join(event["digit"] for event in phone._events if event["event"] == "dtmf")
    phone._discard("dtmf")
    return keys


async def test_keys_pass_and_a_refused_number_keeps_the_call(server: Server, phones: dict[str, Phone], tmp_path: Path) -> None:
    p = phones
    a, b = await connect(p["1001"], p["1002"], "1002")
    await p["1002"].dtmf(b, "5#5")
    assert (await p["1001"].wait_event("dtmf", call=a))["digit"] == "5"
    # The "#" may begin ##: kept until the next key shows it does not.
    assert (await p["1001"].wait_event("dtmf", call=a))["digit"] == "#"
    assert (await p["1001"].wait_event("dtmf", call=a))["digit"] == "5"
    await p["1002"].dtmf(b, "##5551234#")  # no outbound rule lets 1002 dial it
    await server.wait_log(r"event=transfer-refused by=1002 to=5551234 reason=number-not-allowed")
    # 1002 hears why (forward-refused) while the caller still hears 1002.
    heard_by_caller, _ = await exchange_tones(tmp_path, p["1001"], a, p["1002"], b)
    assert heard_by_caller == pytest.approx(1000, abs=15)
    assert keys_heard(p["1001"]) == ""


async def test_blind_transfer_by_keys_sends_the_caller_on_and_hangs_up_the_transferor(
    server: Server, phones: dict[str, Phone], tmp_path: Path
) -> None:
    p = phones
    a, b = await connect(p["1001"], p["1002"], "1002")
    await p["1002"].dtmf(b, "##1003#")
    c = (await p["1003"].wait_event("incoming"))["call"]
    await p["1002"].wait_event("call_state", call=b, state="disconnected")
    ringback = await heard(p["1001"], a, tmp_path / "ringback.wav")
    assert ringback == pytest.approx(440, abs=15) or ringback == pytest.approx(480, abs=15)
    await p["1003"].answer(c)
    await p["1003"].wait_event("media", call=c, active=True)
    heard_by_caller, heard_by_target = await exchange_tones(tmp_path, p["1001"], a, p["1003"], c)
    assert (heard_by_caller, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
    assert keys_heard(p["1001"]) == ""
    await p["1001"].hangup(a)
    first, second = await rows_when_ended(server, 2)
    assert (first["transfer_to"], first["reason"]) == ("1003", "transfer")
    assert (second["from_number"], second["to_number"], second["transferred_by"]) == ("1001", "1003", "1002")
    assert second["linked_id"] == first["call_id"]


async def test_attended_transfer_by_keys_holds_the_caller_and_hanging_up_joins_it_to_the_target(
    server: Server, phones: dict[str, Phone], tmp_path: Path
) -> None:
    p = phones
    a, b = await connect(p["1001"], p["1002"], "1002")
    await p["1002"].dtmf(b, "*21003#")
    c = (await p["1003"].wait_event("incoming"))["call"]
    assert await heard(p["1001"], a, tmp_path / "music.wav") == pytest.approx(DEFAULT_HZ, abs=15)
    await p["1003"].answer(c)
    await p["1003"].wait_event("media", call=c, active=True)
    heard_by_transferor, heard_by_target = await exchange_tones(tmp_path, p["1002"], b, p["1003"], c)
    assert (heard_by_transferor, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
    assert await heard(p["1001"], a, tmp_path / "music.wav") == pytest.approx(DEFAULT_HZ, abs=15)
    since = len(server.log)
    await p["1002"].hangup(b)
    await server.wait_log(r"event=answered by=1003", start=since)  # joined to the caller
    heard_by_caller, heard_by_target = await exchange_tones(tmp_path, p["1001"], a, p["1003"], c)
    assert (heard_by_caller, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
    assert keys_heard(p["1001"]) == ""
    await p["1001"].hangup(a)
    await p["1003"].wait_event("call_state", call=c, state="disconnected")
    rows = await rows_when_ended(server, 3)
    first = next(row for row in rows if (row["from_number"], row["to_number"]) == ("1001", "1002"))
    consult = next(row for row in rows if (row["from_number"], row["to_number"]) == ("1002", "1003"))
    joined = next(row for row in rows if (row["from_number"], row["to_number"]) == ("1001", "1003"))
    assert joined["transferred_by"] == "1002" and first["transfer_to"] == "1003"
    assert first["call_id"] == consult["linked_id"] == joined["linked_id"]


async def test_a_busy_target_of_an_attended_transfer_by_keys_brings_the_transferor_back(
    server: Server, phones: dict[str, Phone], tmp_path: Path
) -> None:
    p = phones
    a, b = await connect(p["1001"], p["1002"], "1002")
    await p["1002"].dtmf(b, "*21003#")
    c = (await p["1003"].wait_event("incoming"))["call"]
    since = len(server.log)
    await p["1003"].reject(c, 486)
    await server.wait_log(r"event=answered by=1002", start=since)  # back with the caller
    heard_by_caller, heard_by_callee = await exchange_tones(tmp_path, p["1001"], a, p["1002"], b)
    assert (heard_by_caller, heard_by_callee) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))
    rows = await rows_when_ended(server, 2)  # the first piece, and the consult that found 1003 busy
    consult = next(row for row in rows if (row["from_number"], row["to_number"]) == ("1002", "1003"))
    assert consult["disposition"] == "busy"


async def test_hanging_up_while_the_target_of_an_attended_transfer_by_keys_rings_makes_it_blind(
    server: Server, phones: dict[str, Phone], tmp_path: Path
) -> None:
    p = phones
    a, b = await connect(p["1001"], p["1002"], "1002")
    await p["1002"].dtmf(b, "*21003#")
    first = (await p["1003"].wait_event("incoming"))["call"]
    await p["1002"].hangup(b)
    await p["1003"].wait_event("call_state", call=first, state="disconnected")  # the consult is cancelled
    c = (await p["1003"].wait_event("incoming"))["call"]  # and the caller rings 1003 itself
    await p["1003"].answer(c)
    await p["1003"].wait_event("media", call=c, active=True)
    heard_by_caller, heard_by_target = await exchange_tones(tmp_path, p["1001"], a, p["1003"], c)
    assert (heard_by_caller, heard_by_target) == (pytest.approx(1000, abs=15), pytest.approx(440, abs=15))


def test_transfer_codes_default_as_asterisk_and_must_not_begin_alike(tmp_path: Path) -> None:
    assert (load(tmp_path, "").features.blind_transfer, load(tmp_path, "").features.attended_transfer) == ("##", "*2")
    text = 'features:\n  blind_transfer: "*"\n  attended_transfer: "*2"\n'
    assert errors(tmp_path, text) == [f"{tmp_path / 'pbx.yaml'}:3: features.blind_transfer '*' and attended_transfer '*2' start alike"]
