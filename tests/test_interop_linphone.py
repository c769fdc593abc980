"""Interop with Debian's linphonec 5.1 (liblinphone, belle-sip): it registers
with the default digest algorithms, talks to a pjsua2 phone both ways,
presses a key of an IVR menu, holds (pauses) and resumes, and
blind-transfers, against `pbx serve` (driven by tests/support/linphone.py).

linphonec's limitations, as found:
- Without a sound card it plays and records files only in file mode
  (``soundcard use files``); in that mode ``play`` is its microphone.
- It needs ``~/.local/share/linphone`` to exist, or its core never opens
  its SIP transports (every request fails with "no listening point").
- Its console says what happens in free text ("Call 1 with ... connected."),
  the only way to follow it; a key typed alone on a line goes out as DTMF
  (RFC 4733 here: ``use_info=0``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.audio import dominant_frequency, duration
from tests.support.interop import (
    CLIENT,
    CLIENT_HZ,
    IVR,
    MOH_HZ,
    PHONE_HZ,
    answer,
    cdr_rows,
    heard,
    interop_server,
    pjsua_phones,
    registration,
)
from tests.support.linphone import LINPHONEC, Linphonec
from tests.support.phone import exchange_tones
from tests.support.server import Server

pytestmark = pytest.mark.skipif(LINPHONEC is None, reason="linphonec is not installed (make test-deps)")
RESUMED_HZ = 1500  # the pjsua2 phone's tone once linphonec has resumed


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await interop_server(tmp_path / "pbx")
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def linphone(tmp_path: Path, server: Server) -> AsyncIterator[Linphonec]:
    async with await Linphonec.start(tmp_path / "linphone", server, CLIENT, tone_hz=CLIENT_HZ) as phone:
        await registration(server, CLIENT)
        yield phone


async def call(linphone: Linphonec, number: str) -> None:
    """Dial ``number`` and wait until the call's audio flows."""
    start = len(linphone.output)
    await linphone.send(f"call sip:{number}@pbx.local")
    await linphone.wait_output(r"Media streams established with .* for call \d+", start=start)


async def hang_up(linphone: Linphonec) -> None:
    start = len(linphone.output)
    await linphone.send("terminate")
    await linphone.wait_output(r"Call \d+ with .* ended", start=start)


async def test_linphonec_registers_and_talks_with_a_pjsua2_phone_both_ways(server: Server, linphone: Linphonec, tmp_path: Path) -> None:
    binding = await registration(server, CLIENT)
    assert binding["user_agent"].startswith("Linphone")
    async with pjsua_phones(server) as p:
        await linphone.send("call sip:1001@pbx.local")
        a = await answer(p["1001"])
        await linphone.wait_output(r"Media streams established with .* for call \d+")
        assert await heard(p["1001"], a, tmp_path / "pjsua.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(linphone)
        await p["1001"].wait_event("call_state", call=a, state="disconnected")
    assert dominant_frequency(linphone.recording) == pytest.approx(PHONE_HZ, abs=15)


async def test_linphonec_presses_a_menu_key_as_rfc_4733_and_is_put_through(server: Server, linphone: Linphonec, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await call(linphone, IVR)
        await linphone.send("1")
        a = await answer(p["1001"])  # key 1 of the menu rings 1001; no key hangs up
        assert await heard(p["1001"], a, tmp_path / "pjsua.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(linphone)
    assert await server.metric("pbx_sip_requests_total", method="INFO") == 0


async def test_linphonec_holds_with_music_for_the_other_party_and_resumes(server: Server, linphone: Linphonec, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await linphone.send("call sip:1001@pbx.local")
        a = await answer(p["1001"])
        await linphone.wait_output(r"Media streams established with .* for call \d+")
        assert await heard(p["1001"], a, tmp_path / "before.wav") == pytest.approx(CLIENT_HZ, abs=15)
        start = len(linphone.output)
        await linphone.send("pause")
        await linphone.wait_output(r"Call \d+ with .* is now paused", start=start)  # the server answered its hold
        assert await heard(p["1001"], a, tmp_path / "held.wav") == pytest.approx(MOH_HZ, abs=15)
        start = len(linphone.output)
        await linphone.send("resume")
        await linphone.wait_output(r"Media streams established with .* for call \d+", start=start)
        await p["1001"].play_tone(a, RESUMED_HZ)
        assert await heard(p["1001"], a, tmp_path / "resumed.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(linphone)
    # linphonec records only while its call is not paused: its last moments are the other party's new tone.
    last = duration(linphone.recording) - 0.8
    assert dominant_frequency(linphone.recording, skip_seconds=last) == pytest.approx(RESUMED_HZ, abs=15)


async def test_linphonec_blind_transfers_its_party_to_another_extension(server: Server, linphone: Linphonec, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await linphone.send("call sip:1001@pbx.local")
        a = await answer(p["1001"])
        await linphone.wait_output(r"Media streams established with .* for call \d+")
        start = len(linphone.output)
        await linphone.send("transfer sip:1002@pbx.local")
        b = await answer(p["1002"])
        await linphone.wait_output(r"Call \d+ with .* ended", start=start)  # released by the server once 1002 answered
        heard_by_a, heard_by_b = await exchange_tones(tmp_path, p["1001"], a, p["1002"], b)
        assert heard_by_a == pytest.approx(1000, abs=15)  # exchange_tones' own tones
        assert heard_by_b == pytest.approx(440, abs=15)
        await p["1001"].hangup(a)
        first, second = await cdr_rows(server, 2)
    assert (first["from_number"], first["to_number"], first["transfer_to"]) == (CLIENT, "1001", "1002")
    assert (second["to_number"], second["transferred_by"], second["linked_id"]) == ("1002", CLIENT, first["linked_id"])
