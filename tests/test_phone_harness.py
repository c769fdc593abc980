"""Self-test of the softphone harness: phones calling each other directly, no PBX."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.audio import dominant_frequency, duration, rms, write_tone
from tests.support.phone import Phone

StartPhone = Callable[..., Awaitable[Phone]]

RECORD_SECONDS = 1.5
FREQUENCY_TOLERANCE_HZ = 15


@pytest.fixture
async def start_phone() -> AsyncIterator[StartPhone]:
    """Start phones with :meth:`Phone.start`; all are closed after the test."""
    phones: list[Phone] = []

    async def start(**kwargs: Any) -> Phone:
        phone = await Phone.start(**kwargs)
        phones.append(phone)
        return phone

    yield start
    await asyncio.gather(*(phone.close() for phone in phones))


async def connect(caller: Phone, callee: Phone) -> tuple[int, int]:
    """Call ``callee`` directly, answer, and wait until both sides are confirmed."""
    outgoing = await caller.call(callee.uri)
    incoming = (await callee.wait_event("incoming"))["call"]
    await callee.answer(incoming)
    await caller.wait_event("call_state", call=outgoing, state="confirmed")
    await callee.wait_event("call_state", call=incoming, state="confirmed")
    return outgoing, incoming


def test_audio_helpers(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_tone(path, 440, 1.0, amplitude=0.5)
    assert duration(path) == pytest.approx(1.0)
    assert dominant_frequency(path) == pytest.approx(440, abs=2)
    assert rms(path) == pytest.approx(0.5 / 2**0.5, rel=0.01)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_direct_call_carries_audio_both_ways(start_phone: StartPhone, tmp_path: Path, transport: str) -> None:
    a = await start_phone(name="a", transport=transport)
    b = await start_phone(name="b", transport=transport)
    a_call, b_call = await connect(a, b)

    await a.play_tone(a_call, 440)
    await b.play_tone(b_call, 1000)
    await a.record(a_call, tmp_path / "a.wav")
    await b.record(b_call, tmp_path / "b.wav")
    await asyncio.sleep(RECORD_SECONDS)  # the recording length: nothing to await
    await asyncio.gather(a.stop_record(a_call), b.stop_record(b_call))

    assert duration(tmp_path / "a.wav") >= RECORD_SECONDS - 0.2
    assert dominant_frequency(tmp_path / "a.wav") == pytest.approx(1000, abs=FREQUENCY_TOLERANCE_HZ)
    assert dominant_frequency(tmp_path / "b.wav") == pytest.approx(440, abs=FREQUENCY_TOLERANCE_HZ)

    await b.hangup(b_call)
    await a.wait_event("call_state", call=a_call, state="disconnected")
    await b.wait_event("call_state", call=b_call, state="disconnected")


async def test_rejected_call_reports_486(start_phone: StartPhone) -> None:
    a = await start_phone(name="a")
    b = await start_phone(name="b")
    a_call = await a.call(b.uri)
    incoming = await b.wait_event("incoming")
    assert "sip:a@127.0.0.1" in incoming["from"]
    assert "sip:b@127.0.0.1" in incoming["to"]

    await b.reject(incoming["call"])

    event = await a.wait_event("call_state", call=a_call, state="disconnected")
    assert event["code"] == 486


async def test_ringing_dtmf_and_hold(start_phone: StartPhone) -> None:
    a = await start_phone(name="a", codecs=("PCMA",))
    b = await start_phone(name="b", codecs=("PCMA", "PCMU"))
    a_call = await a.call(b.uri)
    b_call = (await b.wait_event("incoming"))["call"]
    await b.ringing(b_call)
    await a.wait_event("call_state", call=a_call, state="early", code=180)
    await b.answer(b_call)
    await a.wait_event("call_state", call=a_call, state="confirmed")
    await b.wait_event("media", call=b_call, active=True, dir="sendrecv", codec="PCMA")

    await a.dtmf(a_call, "15#")
    digits = [(await b.wait_event("dtmf", call=b_call))["digit"] for _ in range(3)]
    assert digits == ["1", "5", "#"]

    await a.hold(a_call)
    await a.wait_event("media", call=a_call, dir="sendonly")
    await b.wait_event("media", call=b_call, dir="recvonly", status="remote_hold")
    await a.unhold(a_call)
    await a.wait_event("media", call=a_call, active=True, dir="sendrecv")
    await b.wait_event("media", call=b_call, active=True, dir="sendrecv", codec="PCMA")

    await a.hangup(a_call)
    await b.wait_event("call_state", call=b_call, state="disconnected")
