"""End to end through the admin API of `pbx serve` with pjsua2 phones:
click-to-call rings the `from` extension, then on answer the `to` one, with
audio both ways and recording started, paused, resumed and stopped from the
API; a web callback request rings a free agent first, then the customer."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.support.phone import Phone, exchange_tones, phones_for
from tests.support.server import PASSWORDS, Server, start_server


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(PASSWORDS) as started:
        yield started


class Admin:
    """The server's admin API, with its token."""

    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{server.http_port}"
        self.session = session

    async def request(self, method: str, path: str, status: int, body: Any = None) -> Any:
        async with self.session.request(
            method, self.base + path, json=body, headers={"Authorization": "Bearer test-token"}
        ) as response:
            answer = await response.json() if response.content_type == "application/json" else await response.read()
            assert response.status == status, (method, path, answer)
            return answer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _user(header: str) -> str:
    return header.split("sip:", 1)[1].split("@", 1)[0]


def channel_frequency(path: Path, channel: int) -> float:
    """The strongest frequency of one channel of a stereo WAV."""
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 2
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[channel::2].astype(np.float64)
    samples = samples[int(0.3 * rate) :]
    samples -= samples.mean()
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / samples.size)


async def test_click_to_call_rings_from_then_to_and_carries_audio_both_ways(
    tmp_path: Path, phones: dict[str, Phone], session: aiohttp.ClientSession
) -> None:
    server = await start_server(tmp_path / "pbx", log_level="INFO")
    try:
        alice, bob = phones["1001"], phones["1002"]
        await asyncio.gather(alice.register(server.sip, "1001", PASSWORDS["1001"]), bob.register(server.sip, "1002", PASSWORDS["1002"]))
        api = Admin(server, session)
        placed = await api.request("POST", "/api/calls", 202, {"from": "1001", "to": "1002"})
        call_id = placed["id"]

        # 1001 rings first, shown the number it will be connected to; 1002 is not rung yet.
        ringing = await alice.wait_event("incoming")
        assert _user(ringing["from"]) == "1002"
        (listed,) = (await api.request("GET", "/api/calls", 200))["items"]
        assert (listed["id"], listed["state"], listed["from"], listed["to"]) == (call_id, "originating", "1001", "1002")
        await alice.answer(ringing["call"])
        a = ringing["call"]
        await alice.wait_event("call_state", call=a, state="confirmed")

        # Then 1002 rings, shown 1001; recording needs a bridged call.
        incoming = await bob.wait_event("incoming")
        assert _user(incoming["from"]) == "1001"
        (listed,) = (await api.request("GET", "/api/calls", 200))["items"]
        assert (listed["id"], listed["state"], listed["direction"]) == (call_id, "ringing", "click-to-call")
        refused = await api.request("POST", f"/api/calls/{call_id}/recording", 409, {"action": "start"})
        assert refused["error"] == "not-bridged"
        b = incoming["call"]
        await bob.answer(b)
        await bob.wait_event("call_state", call=b, state="confirmed")
        await alice.wait_event("media", call=a, active=True)
        await bob.wait_event("media", call=b, active=True)
        (listed,) = (await api.request("GET", "/api/calls", 200))["items"]
        assert (listed["id"], listed["state"], listed["recording"]) == (call_id, "answered", None)

        # Recording on demand: the actions must fit the recording's state.
        path = f"/api/calls/{call_id}/recording"
        bad = await api.request("POST", path, 422, {"action": "rewind"})
        assert bad["fields"] == {"action": "must be one of start, stop, pause, resume"}
        assert (await api.request("POST", path, 409, {"action": "pause"}))["error"] == "not-recording"
        started = await api.request("POST", path, 200, {"action": "start"})
        assert started == {"call": call_id, "recording": {"id": call_id, "state": "recording"}}
        assert (await api.request("POST", path, 409, {"action": "start"}))["error"] == "already-recording"
        assert (await api.request("POST", path, 200, {"action": "pause"}))["recording"]["state"] == "paused"
        assert (await api.request("GET", "/api/calls", 200))["items"][0]["recording"]["state"] == "paused"
        assert (await api.request("POST", path, 409, {"action": "pause"}))["error"] == "already-paused"
        assert (await api.request("POST", path, 200, {"action": "resume"}))["recording"]["state"] == "recording"

        # Audio both ways: each phone plays its own tone and records the other's.
        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert abs(heard_by_alice - 1000) < 20
        assert abs(heard_by_bob - 440) < 20

        stopped = await api.request("POST", path, 200, {"action": "stop"})
        assert stopped["recording"] == {"id": call_id, "state": "stopped"}
        (recording,) = (await api.request("GET", "/api/recordings?extension=1001", 200))["items"]
        assert (recording["id"], recording["call_id"], recording["channels"]) == (call_id, call_id, 2)
        assert recording["seconds"] > 1.5
        (tmp_path / "call.wav").write_bytes(await api.request("GET", f"/api/recordings/{call_id}/audio", 200))
        # The customer (here the `to` side) on the left, the extension that clicked on the right.
        assert abs(channel_frequency(tmp_path / "call.wav", 0) - 1000) < 20
        assert abs(channel_frequency(tmp_path / "call.wav", 1) - 440) < 20

        # Hanging up through the API ends both legs and leaves one CDR row.
        await api.request("DELETE", f"/api/calls/{call_id}", 204)
        await alice.wait_event("call_state", call=a, state="disconnected")
        await bob.wait_event("call_state", call=b, state="disconnected")
        assert (await api.request("GET", "/api/calls", 200))["total"] == 0
        await server.wait_log(rf"call={call_id} event=ended")
        (row,) = [r for r in (await api.request("GET", "/api/cdr", 200))["items"] if r["call_id"] == call_id]
        assert (row["direction"], row["from_number"], row["to_number"], row["disposition"]) == ("click-to-call", "1001", "1002", "answered")
    finally:
        assert await server.stop() == 0


async def test_web_callback_rings_the_free_agent_first_then_the_customer(
    tmp_path: Path, phones: dict[str, Phone], session: aiohttp.ClientSession
) -> None:
    server = await start_server(
        tmp_path / "pbx",
        queues={"support": {"agents": ["1001"], "strategy": "linear", "ring_timeout": 10, "wrapup": 0, "callback": {"enabled": True}}},
        log_level="INFO",
    )
    try:
        agent, customer = phones["1001"], phones["1003"]
        await asyncio.gather(agent.register(server.sip, "1001", PASSWORDS["1001"]), customer.register(server.sip, "1003", PASSWORDS["1003"]))
        api = Admin(server, session)
        callback = await api.request("POST", "/api/callbacks", 201, {"queue": "support", "number": "1003"})
        assert (callback["status"], callback["position"]) == ("pending", 1)

        # The agent rings first, shown the customer's number; the customer is not called yet.
        ringing = await agent.wait_event("incoming")
        assert _user(ringing["from"]) == "1003"
        assert (await api.request("GET", "/api/calls", 200))["total"] == 0
        (pending,) = (await api.request("GET", "/api/callbacks", 200))["items"]
        assert pending["id"] == callback["id"]
        agent_call = ringing["call"]
        await agent.answer(agent_call)
        await agent.wait_event("call_state", call=agent_call, state="confirmed")

        # Then the customer rings, shown the agent.
        incoming = await customer.wait_event("incoming")
        assert _user(incoming["from"]) == "1001"
        customer_call = incoming["call"]
        await customer.answer(customer_call)
        await customer.wait_event("call_state", call=customer_call, state="confirmed")
        await server.wait_log(rf"callback {callback['id']} to 1003 completed")
        (call,) = (await api.request("GET", "/api/calls", 200))["items"]
        assert (call["direction"], call["state"], call["queue"], call["agent"]) == ("callback", "answered", "support", "1001")

        await agent.hangup(agent_call)
        await customer.wait_event("call_state", call=customer_call, state="disconnected")
        done = await api.request("GET", "/api/callbacks?status=completed", 200)
        assert [c["id"] for c in done["items"]] == [callback["id"]]
        assert (await api.request("GET", "/api/callbacks", 200))["total"] == 0
        stats = (await api.request("GET", "/api/queues/support", 200))["stats"]
        assert stats["callbacks"] == {"requested": 1, "completed": 1, "failed": 0}
    finally:
        assert await server.stop() == 0
