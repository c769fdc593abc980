"""Toll fraud, attacked for real against `pbx serve`: every number the server
dials passes the outbound rules, whoever asks (a queue caller wanting a
callback, the API's callbacks and click-to-call, an extension), rules with an
`extensions` list serve only those extensions, and `max_calls` caps the calls
of an extension and of a trunk. A raw UDP socket stands as the trunk and
shows which INVITEs reached it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from pbx.config.load import load_config
from pbx.config.model import ConfigError
from pbx.store.db import Store
from tests.support.audio import read_samples, write_tone
from tests.support.phone import Phone, phones_for
from tests.support.raw_sip import RawTrunk, open_trunk
from tests.support.server import PASSWORDS, Server, queue_settings, start_server

PREMIUM = "+4490012345"  # what an attacker wants dialed: only 1002 may call +44
LOCAL = "+15551234567"  # any extension, and the server itself, may call +1555
REFUSAL_HZ = 1400  # the test's "that number cannot be called back" prompt


def rules(trunk: str = "carrier") -> list[dict[str, Any]]:
    return [
        {"match": r"^\+44[0-9]+$", "trunk": trunk, "extensions": ["1002"]},
        {"match": r"^\+1555[0-9]{7}$", "trunk": trunk},
    ]


@pytest.fixture
async def trunk() -> AsyncIterator[RawTrunk]:
    sink = await open_trunk("127.0.0.1")
    yield sink
    sink.close()


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(["1001", "1002"]) as started:
        yield started


async def api(server: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, f"http://127.0.0.1:{server.http_port}{path}", json=body, headers={"Authorization": "Bearer test-token"}
        ) as response:
            return response.status, await response.json() if response.content_type == "application/json" else None


async def no_invite(trunk: RawTrunk, seconds: float) -> None:
    """Show that no INVITE reaches the trunk within ``seconds``."""
    with pytest.raises(TimeoutError):
        invite = await trunk.next_invite(seconds)
        pytest.fail(f"the trunk got an INVITE for {invite.uri}")


def heard(path: Path, freq: float) -> float:
    """Seconds of ``path`` (in 50 ms frames) whose strongest frequency is ``freq``."""
    samples, rate = read_samples(path)
    frame = rate // 20
    seconds = 0.0
    for start in range(0, samples.size - frame, frame):
        chunk = samples[start : start + frame]
        if np.sqrt(np.mean(chunk**2)) < 0.01:
            continue
        spectrum = np.abs(np.fft.rfft(chunk * np.hanning(frame)))
        if abs(np.argmax(spectrum) * rate / frame - freq) < 40:
            seconds += frame / rate
    return seconds


async def test_a_queue_caller_whose_number_no_rule_allows_hears_a_refusal_and_keeps_its_place(
    tmp_path: Path, trunk: RawTrunk, phones: dict[str, Phone]
) -> None:
    # Prompts the test can tell apart by their tone: the offer, the refusal, quiet music.
    sounds = tmp_path / "sounds"
    (sounds / "moh" / "default").mkdir(parents=True)
    write_tone(sounds / "callback-offer.wav", 500, 0.5)
    write_tone(sounds / "callback-not-allowed.wav", REFUSAL_HZ, 1.0)
    write_tone(sounds / "moh" / "default" / "hum.wav", 300, 2.0, amplitude=0.05)
    host, port = trunk.address
    server = await start_server(
        tmp_path / "pbx",
        sounds={"dir": str(sounds), "tts": None},
        # Calls from loopback count as the provider's: the caller has the ID it chose.
        trunks={"carrier": {"host": f"{host}:{port}", "inbound_from": ["127.0.0.1/32"]}},
        outbound=rules(),
        inbound={"7000": "queue:support"},
        queues={
            "support": queue_settings(
                ["1001"], announce={"position": False, "wait_time": False}, callback={"enabled": True, "offer_after": 0}
            )
        },
        log_level="INFO",
    )
    try:
        async with await Phone.start(name=PREMIUM) as caller:
            call = await caller.call(f"sip:7000@{server.sip}")
            await caller.wait_event("call_state", call=call, state="confirmed")
            await caller.wait_event("media", call=call, active=True)
            await caller.record(call, tmp_path / "caller.wav")
            await server.wait_log("offers a callback")
            await caller.dtmf(call, "1")
            await server.wait_log(rf"no callback to \{PREMIUM} from queue support")
            await asyncio.sleep(1.5)  # the refusal prompt's length plus a margin: the recording's length
            await caller.stop_record(call)
            assert heard(tmp_path / "caller.wav", REFUSAL_HZ) >= 0.6, "the caller did not hear the refusal"

            # Still in line, no callback stored, and one security event for fail2ban and the metric.
            status, queue = await api(server, "GET", "/api/queues/support")
            assert status == 200 and [(c["caller"], c["callback"]) for c in queue["callers"]] == [(PREMIUM, False)]
            status, pending = await api(server, "GET", "/api/callbacks")
            assert pending["total"] == 0
            assert await server.metric("pbx_security_events_total", event="refused_number") == 1
            await caller.hangup(call)
            await caller.wait_event("call_state", call=call, state="disconnected")

        # An agent who would take anything now logs on: nothing is called back through the trunk.
        agent = phones["1001"]
        await agent.register(server.sip, "1001", PASSWORDS["1001"])
        with pytest.raises(TimeoutError):
            await agent.wait_event("incoming", timeout=3)
        await no_invite(trunk, 0.5)
    finally:
        await server.stop()


async def test_the_api_gets_422_for_numbers_no_rule_allows_and_dials_nothing(
    tmp_path: Path, trunk: RawTrunk, phones: dict[str, Phone]
) -> None:
    host, port = trunk.address
    server = await start_server(
        tmp_path / "pbx",
        trunks={"carrier": {"host": f"{host}:{port}"}},
        outbound=rules(),
        queues={"support": queue_settings(["1001"], callback={"enabled": True})},
        log_level="INFO",
    )
    try:
        alice, bob = phones["1001"], phones["1002"]
        await asyncio.gather(alice.register(server.sip, "1001", PASSWORDS["1001"]), bob.register(server.sip, "1002", PASSWORDS["1002"]))
        # A callback is the server's own call: the +44 rule, kept for 1002, does not serve it.
        refusals = [
            ("/api/callbacks", {"queue": "support", "number": PREMIUM}),
            ("/api/callbacks", {"queue": "support", "number": "+19005550100"}),
            ("/api/calls", {"from": "1001", "to": PREMIUM}),
            ("/api/calls", {"from": "1001", "to": f"external:{PREMIUM}"}),
            ("/api/calls", {"from": "1001", "to": f"external:{PREMIUM}@carrier"}),
        ]
        for path, body in refusals:
            status, answer = await api(server, "POST", path, body)
            assert (status, answer["error"]) == (422, "number-not-allowed"), (path, body, answer)
        assert await server.metric("pbx_security_events_total", event="refused_number") == len(refusals)
        status, pending = await api(server, "GET", "/api/callbacks")
        assert pending["total"] == 0
        with pytest.raises(TimeoutError):  # nobody is rung for any of them...
            await alice.wait_event("incoming", timeout=2)
        await no_invite(trunk, 0.5)  # ...and nothing reaches the trunk

        # 1002 may: its phone rings, and once it answers the number is dialed for it.
        status, placed = await api(server, "POST", "/api/calls", {"from": "1002", "to": PREMIUM})
        assert status == 202, placed
        incoming = await bob.wait_event("incoming", timeout=10)
        await bob.answer(incoming["call"])
        invite = await trunk.next_invite(10)
        assert str(invite.uri).startswith(f"sip:{PREMIUM}@")
        await bob.hangup(incoming["call"])
        await server.wait_log(rf"call={placed['id']} event=ended")
    finally:
        await server.stop()


async def test_an_extension_dials_out_only_by_rules_it_may_use_and_within_the_trunks_max_calls(
    tmp_path: Path, trunk: RawTrunk, phones: dict[str, Phone]
) -> None:
    host, port = trunk.address
    server = await start_server(
        tmp_path / "pbx", trunks={"carrier": {"host": f"{host}:{port}", "max_calls": 1}}, outbound=rules(), log_level="INFO"
    )
    try:
        alice, bob = phones["1001"], phones["1002"]
        await asyncio.gather(alice.register(server.sip, "1001", PASSWORDS["1001"]), bob.register(server.sip, "1002", PASSWORDS["1002"]))
        # 1001 is not in the +44 rule: 404, as for a number no rule matches.
        refused = await alice.call(f"sip:{PREMIUM}@pbx.local")
        assert (await alice.wait_event("call_state", call=refused, state="disconnected"))["code"] == 404
        await no_invite(trunk, 0.5)
        assert await server.metric("pbx_security_events_total", event="refused_number") == 1

        # 1002 is: the trunk rings (and holds the trunk's one call).
        out = await bob.call(f"sip:{PREMIUM}@pbx.local")
        assert str((await trunk.next_invite(10)).uri).startswith(f"sip:{PREMIUM}@")
        await bob.wait_event("call_state", call=out, state="early")
        # The trunk is full: 503 for a number 1001 may dial, and no second INVITE.
        full = await alice.call(f"sip:{LOCAL}@pbx.local")
        assert (await alice.wait_event("call_state", call=full, state="disconnected"))["code"] == 503
        await no_invite(trunk, 0.5)
        assert await server.metric("pbx_security_events_total", event="call_limit") == 1

        await bob.hangup(out)
        await bob.wait_event("call_state", call=out, state="disconnected")
        again = await alice.call(f"sip:{LOCAL}@pbx.local")
        assert str((await trunk.next_invite(10)).uri).startswith(f"sip:{LOCAL}@")
        await alice.hangup(again)
        await alice.wait_event("call_state", call=again, state="disconnected")
    finally:
        await server.stop()


async def test_an_extension_cannot_place_more_calls_than_its_max_calls(tmp_path: Path, phones: dict[str, Phone]) -> None:
    server = await start_server(
        tmp_path / "pbx",
        extensions={ext: {"name": f"User {ext}", "password": pw, "max_calls": 2} for ext, pw in PASSWORDS.items()},
        inbound={"7000": "queue:support"},  # the server answers and holds these calls
        queues={"support": queue_settings(["1003"], announce={"position": False, "wait_time": False})},
        sounds={"dir": str(Path(__file__).resolve().parent.parent / "config" / "sounds")},
        log_level="INFO",
    )
    try:
        alice = phones["1001"]
        await alice.register(server.sip, "1001", PASSWORDS["1001"])
        up = []
        for _ in range(2):
            up.append(await alice.call("sip:7000@pbx.local"))
            await alice.wait_event("call_state", call=up[-1], state="confirmed")
        third = await alice.call("sip:7000@pbx.local")
        assert (await alice.wait_event("call_state", call=third, state="disconnected"))["code"] == 486
        assert await server.metric("pbx_security_events_total", event="call_limit") == 1
        line = await server.wait_log(r"event=security kind=call_limit")
        assert "src=127.0.0.1" in line and "extension=1001" in line
        # A cap, not a ban: with one call ended, the next one goes through.
        await alice.hangup(up[0])
        await alice.wait_event("call_state", call=up[0], state="disconnected")
        await server.wait_log(r"event=ended disposition=abandoned")
        fourth = await alice.call("sip:7000@pbx.local")
        await alice.wait_event("call_state", call=fourth, state="confirmed")
        status, calls = await api(server, "GET", "/api/calls")
        assert calls["total"] == 2
    finally:
        await server.stop()


async def test_a_stored_callback_to_a_number_the_rules_now_refuse_fails_without_ringing_anyone(
    tmp_path: Path, trunk: RawTrunk, phones: dict[str, Phone]
) -> None:
    # Pending callbacks survive restarts: one asked for before the rules changed (or the upgrade).
    folder = tmp_path / "pbx"
    store = Store(folder / "pbx.db")
    await store.open()
    row = {"id": "cb-stale", "queue": "support", "number": PREMIUM, "entered": 1.0, "requested": "2026-03-02T12:00:00.000+00:00",
           "status": "pending", "attempts": 0, "next_attempt": 0.0, "call_id": None}  # fmt: skip
    await store.upsert("callbacks", row)
    await store.close()
    host, port = trunk.address
    server = await start_server(
        folder,
        trunks={"carrier": {"host": f"{host}:{port}"}},
        outbound=rules(),
        queues={"support": queue_settings(["1001"], callback={"enabled": True})},
        log_level="INFO",
    )
    try:
        agent = phones["1001"]
        await agent.register(server.sip, "1001", PASSWORDS["1001"])  # a free agent: the callback is due now
        await server.wait_log(r"callback cb-stale to \+4490012345 failed unattempted")
        status, failed = await api(server, "GET", "/api/callbacks?status=failed")
        assert [c["id"] for c in failed["items"]] == ["cb-stale"]
        with pytest.raises(TimeoutError):
            await agent.wait_event("incoming", timeout=2)
        await no_invite(trunk, 0.5)
    finally:
        await server.stop()


def pbx_check(path: Path) -> list[str]:
    """The lines `pbx check` prints about numbers the rules refuse (it must fail on them)."""
    result = subprocess.run(
        [sys.executable, "-m", "pbx.cli", "check", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result
    return [line for line in result.stderr.splitlines() if "no outbound rule" in line]


def test_pbx_check_flags_external_destinations_no_rule_lets_the_server_dial(tmp_path: Path) -> None:
    flow = tmp_path / "ivr_flows" / "main.yaml"
    flow.parent.mkdir()
    flow.write_text("start: menu\nnodes:\n  menu: {type: goto, to: 'external:+4490012345'}\n")
    inbound = {"8001": "ivr:main", "8000": f"external:{PREMIUM}@carrier"}
    config = {
        "http": {"token": "test-token"},
        "extensions": {"1002": {"name": "Bob", "password": "secret-1002"}},
        "trunks": {"carrier": {"host": "127.0.0.1:5060"}},
        "outbound": rules(),
        "inbound": inbound,
        "queues": {"support": {"agents": ["1002"], "on_timeout": f"external:{LOCAL}"}},  # allowed: not flagged
    }
    path = tmp_path / "pbx.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "8000" in text)
    assert pbx_check(path) == [
        f"{path}:{line}: inbound.8000: no outbound rule lets the server dial '{PREMIUM}' "
        "(rules with an `extensions` list serve only those extensions)"
    ]
    del inbound["8000"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert pbx_check(path) == [
        f"{flow}:3: nodes.menu.to: no outbound rule lets the server dial '{PREMIUM}' "
        "(rules with an `extensions` list serve only those extensions)"
    ]


def test_class_of_service_keys_are_read_and_checked(tmp_path: Path) -> None:
    extensions: dict[str, dict[str, Any]] = {
        "1001": {"name": "Alice", "password": "secret-1001"},
        "1002": {"name": "Bob", "password": "secret-1002", "max_calls": 1},
    }
    config: dict[str, Any] = {
        "http": {"token": "test-token"},
        "extensions": extensions,
        "trunks": {"carrier": {"host": "127.0.0.1:5060", "max_calls": 2}, "spare": {"host": "127.0.0.1:5070"}},
        "outbound": rules(),
    }
    path = tmp_path / "pbx.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load_config(path, env={})
    assert (loaded.extensions["1001"].max_calls, loaded.extensions["1002"].max_calls) == (4, 1)
    assert (loaded.trunks["carrier"].max_calls, loaded.trunks["spare"].max_calls) == (2, None)
    assert loaded.route_outbound(PREMIUM, "1002") is loaded.trunks["carrier"]
    assert loaded.route_outbound(PREMIUM, "1001") is None and loaded.route_outbound(PREMIUM) is None
    assert loaded.route_outbound(LOCAL) is loaded.trunks["carrier"]

    config["outbound"] = [{"match": "^0", "trunk": "carrier", "extensions": ["1009"]}, {"match": "^1", "trunk": "carrier", "extensions": []}]
    extensions["1001"]["max_calls"] = 0
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    messages = [issue.message for issue in caught.value.issues]
    assert any("max_calls" in m for m in messages)
    assert any("there is no extension '1009'" in m for m in messages)
    assert any("outbound[1].extensions" in m for m in messages)
    assert all(str(issue).startswith(f"{path}:") for issue in caught.value.issues)
