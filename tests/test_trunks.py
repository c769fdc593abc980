"""End to end with SIPp playing the provider: calls in from a trunk's network,
refusals from elsewhere, and calls out through a registering, challenging trunk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.audio import dominant_frequency, rms
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, free_port, start_server
from tests.support.sipp import run_sipp, start_sipp
from tests.test_calls import cdr

SIPP = Path(__file__).parent / "sipp"
DID = "5551000"


async def carrier_server(folder: Path) -> Server:
    # SIPp 3.6 answers only the first challenge and cannot do SHA-256.
    return await start_server(
        folder,
        sip={"auth_algorithms": ["MD5", "SHA-256"]},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
        inbound={DID: "extension:1002"},
    )


async def test_trunk_call_to_an_inbound_number_rings_the_extension(tmp_path: Path) -> None:
    server = await carrier_server(tmp_path / "pbx")
    try:
        async with await Phone.start(name="bob") as bob:
            await bob.register(server.sip, "1002", PASSWORDS["1002"])
            sipp = asyncio.create_task(
                run_sipp(SIPP / "trunk_inbound.xml", server.sip, local_ip="127.0.0.2", service=DID, timeout=60)
            )
            incoming = await bob.wait_event("incoming", timeout=15)
            await bob.answer(incoming["call"])
            await bob.wait_event("media", call=incoming["call"], active=True)
            await bob.record(incoming["call"], tmp_path / "from_trunk.wav")
            await asyncio.sleep(2)  # the recording's length, not synchronisation
            await bob.stop_record(incoming["call"])
            await bob.wait_event("call_state", call=incoming["call"], state="disconnected", timeout=30)
            result = await sipp
        assert result.returncode == 0, result.errors_log
        assert rms(tmp_path / "from_trunk.wav", skip_seconds=0.3) > 0.01, "the provider's audio did not reach the phone"
        await server.wait_log(r"event=ended disposition=answered")
    finally:
        assert await server.stop() == 0


async def test_same_invite_from_outside_the_trunk_network_is_refused(tmp_path: Path) -> None:
    server = await carrier_server(tmp_path / "pbx")
    try:
        async with await Phone.start(name="bob") as bob:
            await bob.register(server.sip, "1002", PASSWORDS["1002"])
            refused = await run_sipp(SIPP / "refused.xml", server.sip, local_ip="127.0.0.6", service=DID)
            assert refused.returncode == 0, refused.errors_log
            wrong = await run_sipp(SIPP / "refused_auth.xml", server.sip, local_ip="127.0.0.6", service=DID)
            assert wrong.returncode == 0, wrong.errors_log
            with pytest.raises(TimeoutError):
                await bob.wait_event("incoming", timeout=1)
        assert await server.metric("pbx_active_calls") == 0
    finally:
        assert await server.stop() == 0


async def test_extension_calls_out_through_a_registering_provider(tmp_path: Path) -> None:
    port = free_port(host="127.0.0.3")
    provider = await start_sipp(
        SIPP / "provider.xml",
        local_ip="127.0.0.3",
        local_port=port,
        extra=("-rtp_echo", "-set", "trunk_user", "acme", "-set", "trunk_pass", "s3cret-trunk"),
    )
    server = await start_server(
        tmp_path / "pbx",
        trunks={
            "provider": {
                "host": f"127.0.0.3:{port}",
                "inbound_from": ["127.0.0.3/32"],
                "register": {"username": "acme", "password": "s3cret-trunk", "expires": 120},
                "caller_id": "15550100",
            }
        },
        outbound=[{"match": r"^555[0-9]{4}$", "trunk": "provider"}],
    )
    try:
        await server.wait_log(r"trunk provider: registered", timeout=15)
        async with await Phone.start(name="alice") as alice:
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            call = await alice.call("sip:5550123@pbx.local")
            await alice.wait_event("call_state", call=call, state="confirmed", timeout=15)
            await alice.wait_event("media", call=call, active=True)
            await alice.play_tone(call, 700)
            await alice.record(call, tmp_path / "echo.wav")
            await asyncio.sleep(1.5)  # the recording's length, not synchronisation
            await alice.stop_record(call)
            assert dominant_frequency(tmp_path / "echo.wav") == pytest.approx(700, abs=15)
            await alice.hangup(call)
            await alice.wait_event("call_state", call=call, state="disconnected")

            outside = await alice.call("sip:0900123456@pbx.local")
            event = await alice.wait_event("call_state", call=outside, state="disconnected")
            assert event["code"] == 404
        await server.wait_log(r"event=ended disposition=answered")
        [row] = cdr(server)
        assert (row["direction"], row["from_number"], row["to_number"]) == ("outbound", "1001", "5550123")
    finally:
        assert await server.stop() == 0
        await provider.stop()
