"""Interop with Debian's baresip 1.0 (libre 1.1): it registers, talks to a
pjsua2 phone both ways, presses a key of an IVR menu, holds and resumes, and
blind-transfers, against `pbx serve` (driven by tests/support/baresip.py).

baresip's limitations, as found:
- It cannot register with the default ``auth_algorithms: [SHA-256, MD5]``
  (it gives up on a 401 with two challenges), so its extension has
  ``auth_algorithms: [MD5]`` (see tests/test_auth_algorithms.py).
- 1.0 has no file player (``aufile`` is a source only): what it hears is
  taken from the ``sndfile`` filter's dump of the decoded audio, which is
  complete only once the call has ended. A re-INVITE drops that filter from
  its receive pipeline (``audio_debug`` shows ``(play) <--- PCMU`` after it),
  so what it hears after a hold and resume cannot be checked; the pjsua2
  party's side of the hold is.
- Keys go out as RFC 4733 telephone events only (``sndcode``); it sends no
  SIP INFO.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.audio import dominant_frequency
from tests.support.baresip import BARESIP, Baresip
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
from tests.support.phone import exchange_tones
from tests.support.server import Server

pytestmark = pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (make test-deps)")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await interop_server(tmp_path / "pbx", auth_algorithms=["MD5"])
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def baresip(tmp_path: Path, server: Server) -> AsyncIterator[Baresip]:
    async with await Baresip.start(tmp_path / "baresip", server, CLIENT, tone_hz=CLIENT_HZ) as phone:
        await registration(server, CLIENT)
        yield phone


async def hang_up(baresip: Baresip) -> None:
    await baresip.command("hangup")
    await baresip.wait_event(type="CALL_CLOSED")


async def test_baresip_registers_and_talks_with_a_pjsua2_phone_both_ways(server: Server, baresip: Baresip, tmp_path: Path) -> None:
    binding = await registration(server, CLIENT)
    assert binding["user_agent"].startswith("baresip")
    async with pjsua_phones(server) as p:
        await baresip.dial("1001")
        call = await answer(p["1001"])
        await baresip.wait_event(type="CALL_ESTABLISHED")
        assert await heard(p["1001"], call, tmp_path / "pjsua.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(baresip)
        await p["1001"].wait_event("call_state", call=call, state="disconnected")
    assert dominant_frequency(baresip.heard()) == pytest.approx(PHONE_HZ, abs=15)


async def test_baresip_presses_a_menu_key_as_rfc_4733_and_is_put_through(server: Server, baresip: Baresip, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await baresip.dial(IVR)
        await baresip.wait_event(type="CALL_ESTABLISHED")
        await baresip.send_digit("1")
        call = await answer(p["1001"])  # key 1 of the menu rings 1001; no key hangs up
        assert await heard(p["1001"], call, tmp_path / "pjsua.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(baresip)
    assert await server.metric("pbx_sip_requests_total", method="INFO") == 0


async def test_baresip_holds_with_music_for_the_other_party_and_resumes(server: Server, baresip: Baresip, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await baresip.dial("1001")
        call = await answer(p["1001"])
        await baresip.wait_event(type="CALL_ESTABLISHED")
        assert await heard(p["1001"], call, tmp_path / "before.wav") == pytest.approx(CLIENT_HZ, abs=15)
        baresip.discard()
        await baresip.command("hold")
        await baresip.wait_event(type="CALL_REMOTE_SDP", param="answer")  # the server's answer to its hold
        assert await heard(p["1001"], call, tmp_path / "held.wav") == pytest.approx(MOH_HZ, abs=15)
        baresip.discard()
        await baresip.command("resume")
        await baresip.wait_event(type="CALL_REMOTE_SDP", param="answer")
        assert await heard(p["1001"], call, tmp_path / "resumed.wav") == pytest.approx(CLIENT_HZ, abs=15)
        await hang_up(baresip)


async def test_baresip_blind_transfers_its_party_to_another_extension(server: Server, baresip: Baresip, tmp_path: Path) -> None:
    async with pjsua_phones(server) as p:
        await baresip.dial("1001")
        a = await answer(p["1001"])
        await baresip.wait_event(type="CALL_ESTABLISHED")
        await baresip.command("transfer", "1002")
        b = await answer(p["1002"])
        await baresip.wait_event(type="CALL_CLOSED")  # released by the server once 1002 answered
        heard_by_a, heard_by_b = await exchange_tones(tmp_path, p["1001"], a, p["1002"], b)
        assert heard_by_a == pytest.approx(1000, abs=15)  # exchange_tones' own tones
        assert heard_by_b == pytest.approx(440, abs=15)
        await p["1001"].hangup(a)
        first, second = await cdr_rows(server, 2)
    assert (first["from_number"], first["to_number"], first["transfer_to"]) == (CLIENT, "1001", "1002")
    assert (second["to_number"], second["transferred_by"], second["linked_id"]) == ("1002", CLIENT, first["linked_id"])
