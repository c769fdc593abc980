"""OPTIONS qualify (sip.qualify_seconds). End to end: a phone that vanished
without unregistering (stopped, or killed on TCP) is found out, and is neither
rung nor offered queue calls until it answers again; any answer keeps a
contact, a REGISTER revives one at once; pbx_trunk_up follows a trunk. In
process: a round spreads its OPTIONS over the interval."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiosipua import SipMessage, SipRequest

from pbx.config.load import load_config
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.sip.qualify import Qualifier
from pbx.sip.registrar import Registrar
from pbx.sip.stack import SipStack
from pbx.store.db import Store
from tests.support.phone import Phone, phones_for
from tests.support.raw_sip import RawTrunk, response_to
from tests.support.server import PASSWORDS, Server, free_port, queue_settings, start_server
from tests.support.sipp import BENCH_SCENARIOS, run_sipp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
QUEUE_NUMBER = "7000"
# OPTIONS every second, unanswered after one (TIMEOUT is capped at the interval).
QUALIFY = {"qualify_seconds": 1}


async def registrations(server: Server, extension: str) -> list[dict[str, Any]]:
    status, body = await server.http("/api/registrations")
    assert status == 200, body
    return [item for item in json.loads(body)["items"] if item["extension"] == extension]


async def until[T](probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float) -> T:
    """Ask ``probe`` ten times a second until its answer is accepted; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not accept(answer := await probe()):
            await asyncio.sleep(0.1)  # the pace of the polling, not synchronisation
    return answer


def reachable(expected: bool) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda items: len(items) == 1 and items[0]["reachable"] is expected


async def test_a_phone_that_stops_answering_goes_to_voicemail_at_once_and_gets_no_queue_call_until_it_answers(
    tmp_path: Path,
) -> None:
    extensions: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1002"]["voicemail"] = {"pin": None}
    server = await start_server(
        tmp_path / "pbx",
        sip=QUALIFY,  # ring_timeout stays 20 s
        sounds={"dir": str(SOUNDS)},
        extensions=extensions,
        inbound={QUEUE_NUMBER: "queue:support"},
        queues={"support": queue_settings(["1002"])},
    )
    try:
        async with phones_for(["1001", "1002"]) as phones:
            caller, agent = phones["1001"], phones["1002"]
            await caller.register(server.sip, "1001", PASSWORDS["1001"])
            await agent.register(server.sip, "1002", PASSWORDS["1002"])
            [live] = await until(
                lambda: registrations(server, "1002"), lambda items: reachable(True)(items) and items[0]["rtt_ms"] is not None, 5
            )
            assert 0 <= live["rtt_ms"] < 500, live

            os.kill(agent.pid, signal.SIGSTOP)  # gone without a word, as a phone whose battery died
            try:
                [gone] = await until(lambda: registrations(server, "1002"), reachable(False), 5)
                assert gone["rtt_ms"] is None, gone

                # Straight to the mailbox: no 20 s of ringing a phone that is not there.
                started = time.monotonic()
                call = await caller.call("sip:1002@pbx.local")
                await caller.wait_event("call_state", call=call, state="confirmed")
                assert time.monotonic() - started < 3, "the call rang the vanished phone before voicemail took it"
                await server.wait_log(r"extension 1002 has no registered contact that answers")
                await server.wait_log(r"event=forwarded reason=unavailable destination=voicemail:1002")
                await caller.hangup(call)
                await caller.wait_event("call_state", call=call, state="disconnected")

                # A queue caller waits: the agent's phone is not rung.
                call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
                await caller.wait_event("call_state", call=call, state="confirmed")
                await server.wait_log(r"queue support announces position 1\b")
                with pytest.raises(TimeoutError):
                    await server.wait_log(r"queue support offers", timeout=2)
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            back = len(server.log)

            # It answers again: reachable, and offered the caller who waited.
            await until(lambda: registrations(server, "1002"), reachable(True), 5)
            await server.wait_log(r"queue support offers \S+ to 1002", start=back)
            incoming = await agent.wait_event("incoming")
            await agent.answer(incoming["call"])
            await agent.wait_event("call_state", call=incoming["call"], state="confirmed")
            await agent.hangup(incoming["call"])
            await caller.wait_event("call_state", call=call, state="disconnected")
    finally:
        assert await server.stop() == 0


async def test_a_phone_on_tcp_is_asked_over_its_connection_and_unreachable_once_its_process_dies(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", sip=QUALIFY)
    try:
        async with await Phone.start(name="p1002", transport="tcp") as phone:
            await phone.register(server.sip, "1002", PASSWORDS["1002"])
            [live] = await until(
                lambda: registrations(server, "1002"), lambda items: reachable(True)(items) and items[0]["rtt_ms"] is not None, 5
            )
            assert live["transport"] == "tcp", live
            os.kill(phone.pid, signal.SIGKILL)  # no unregistering: its connection just closes
            await until(lambda: registrations(server, "1002"), reachable(False), 5)
    finally:
        assert await server.stop() == 0


class OptionsAnswerer(asyncio.DatagramProtocol):
    """A registered phone's socket that answers every OPTIONS with ``status``
    and notes when each arrived (event-loop time) in :attr:`arrivals`."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.transport: asyncio.DatagramTransport | None = None
        self.arrivals: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = SipMessage.parse(data)
        if self.transport is not None and isinstance(message, SipRequest) and message.method == "OPTIONS":
            self.arrivals.append(asyncio.get_running_loop().time())
            self.transport.sendto(response_to(message, self.status, "qualify").replace("\n", "\r\n").encode(), addr)


async def test_any_answer_keeps_a_contact_reachable_and_a_new_register_revives_it_at_once(tmp_path: Path) -> None:
    # SIPp 3.6 answers only MD5 challenges, and only the first one it reads.
    server = await start_server(tmp_path / "pbx", sip={**QUALIFY, "auth_algorithms": ["MD5", "SHA-256"]})
    port = free_port()

    async def register() -> None:
        result = await run_sipp(
            BENCH_SCENARIOS / "register.xml", server.sip, local_port=port, service="1003",
            extra=["-au", "1003", "-ap", PASSWORDS["1003"]], timeout=10,
        )  # fmt: skip
        assert result.ok, result.report()

    try:
        await register()  # SIPp registers its port and leaves: a socket there answers OPTIONS with 404
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: OptionsAnswerer(404), local_addr=("127.0.0.1", port)
        )
        try:
            # A 404 is an answer: something is there.
            await until(lambda: registrations(server, "1003"), lambda items: reachable(True)(items) and items[0]["rtt_ms"] is not None, 5)
        finally:
            transport.close()
        await until(lambda: registrations(server, "1003"), reachable(False), 5)
        await register()
        # Live from the REGISTER on, before any OPTIONS could tell (one takes a second to go unanswered).
        assert reachable(True)(await registrations(server, "1003"))
    finally:
        assert await server.stop() == 0


async def trunk_up(server: Server, trunk: str) -> float | None:
    """pbx_trunk_up{trunk} on /metrics; None while it is absent."""
    _, text = await server.http("/metrics")
    prefix = f'pbx_trunk_up{{trunk="{trunk}"}} '
    return next((float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)), None)


async def test_pbx_trunk_up_follows_whether_the_trunk_answers_options(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    _, trunk = await loop.create_datagram_endpoint(RawTrunk, local_addr=("127.0.0.1", 0))
    host, port = trunk.address
    server = await start_server(tmp_path / "pbx", sip=QUALIFY, trunks={"carrier": {"host": f"{host}:{port}"}})
    try:
        await until(lambda: trunk_up(server, "carrier"), lambda up: up == 1, 5)
        assert any(r.method == "OPTIONS" for r in trunk.requests)
        trunk.close()
        await until(lambda: trunk_up(server, "carrier"), lambda up: up == 0, 5)
        await server.wait_log(r"trunk carrier: down \(no answer within 1 s\)")
        # Back on its address: up again at the next OPTIONS.
        _, trunk = await loop.create_datagram_endpoint(RawTrunk, local_addr=(host, port))
        await until(lambda: trunk_up(server, "carrier"), lambda up: up == 1, 5)
    finally:
        trunk.close()
        assert await server.stop() == 0


async def test_a_round_spreads_its_options_over_the_interval_after_waiting_one(tmp_path: Path) -> None:
    (tmp_path / "pbx.yaml").write_text("sip: {qualify_seconds: 1}\n")
    config = load_config(tmp_path / "pbx.yaml", env={})
    loop = asyncio.get_running_loop()
    phones, answerer = await loop.create_datagram_endpoint(lambda: OptionsAnswerer(200), local_addr=("127.0.0.1", 0))
    host, port = phones.get_extra_info("sockname")[:2]
    store = Store(tmp_path / "pbx.db")
    await store.open()
    stack = SipStack(events=EventBus(), advertised_host="127.0.0.1", user_agent="pbx")
    try:
        contacts = [f"sip:1001@{host}:{port};line={n}" for n in range(50)]
        for contact in contacts:  # bindings as a restart finds them in the store
            row = {"extension": "1001", "contact": contact, "source": f"{host}:{port}", "transport": "udp",
                   "expires_at": time.time() + 600, "user_agent": "test", "call_id": contact}  # fmt: skip
            await store.upsert("registrations", row)
        events = EventBus()
        registrar = Registrar(PASSWORDS.get, store, DigestAuthenticator("pbx.local"), AddressGuard(events=events), events)
        await registrar.load()
        await stack.listen("udp", "127.0.0.1", 0)
        qualifier = Qualifier(lambda: config, stack, registrar)
        started = loop.time()
        qualifier.start()
        try:
            await until(lambda: asyncio.sleep(0, len(answerer.arrivals)), lambda count: count >= len(contacts), 5)
            answered = await until(
                lambda: asyncio.sleep(0, [b.rtt_ms for b in registrar.contacts("1001")]), lambda rtts: None not in rtts, 2
            )
        finally:
            await qualifier.stop()
        assert len(answered) == len(contacts)
        first, last = answerer.arrivals[0], answerer.arrivals[len(contacts) - 1]
        assert first - started >= 0.9, "the first round did not wait one interval"
        # One every 20 ms: a second's round, not 50 OPTIONS in the same instant.
        assert last - first >= 0.7, answerer.arrivals
        assert max(Counter(int((t - first) * 100) for t in answerer.arrivals[: len(contacts)]).values()) <= 3
    finally:
        await stack.close()
        await store.close()
        phones.close()
