"""End to end: what a CRM follows. `pbx serve` on loopback, pjsua2 phones,
the event WebSocket (bearer token or single-use ticket) and webhooks to a
receiver in this process that checks every signature the way a CRM would."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pbx.http.tickets import Tickets
from pbx.live.webhooks import signature
from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, free_port, start_server

SECRET = "a-webhook-secret-of-some-length"
TOKEN = "test-token"


class Receiver:
    """A CRM's webhook endpoint: keeps what it got, answers what ``answers`` says."""

    def __init__(self, answers: Callable[[dict[str, Any]], int] = lambda _: 200) -> None:
        self.answers = answers
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.changed = asyncio.Condition()
        self.port = free_port(socket.SOCK_STREAM)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((dict(request.headers), body))
        async with self.changed:
            self.changed.notify_all()
        return web.Response(status=self.answers(json.loads(body)))

    async def wait_for(self, found: Callable[[list[tuple[dict[str, str], bytes]]], bool], timeout: float = 15.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: found(self.got)), timeout)


def verified(headers: dict[str, str], body: bytes, secret: str = SECRET) -> dict[str, Any]:
    """The event of a delivery whose signature holds, as a receiver checks it."""
    timestamp = headers["X-Pbx-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 300, "a stale timestamp: a replay"
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Pbx-Signature"], expected)
    event: dict[str, Any] = json.loads(body)
    assert headers["X-Pbx-Event"] == event["type"] and headers["X-Pbx-Delivery"] == str(event["id"])
    return event


@pytest.fixture
async def phones() -> AsyncIterator[dict[str, Phone]]:
    async with phones_for(["1001", "1002", "1003"]) as started:
        yield started


async def talk(caller: Phone, callee: Phone, number: str) -> None:
    call = await caller.call(f"sip:{number}@pbx.local")
    incoming = await callee.wait_event("incoming", timeout=15)
    await callee.answer(incoming["call"])
    await caller.wait_event("call_state", call=call, state="confirmed")
    await caller.hangup(call)
    await callee.wait_event("call_state", call=incoming["call"], state="disconnected")


async def next_events(ws: aiohttp.ClientWebSocketResponse, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The socket's events up to the first one ``until`` holds for."""
    events: list[dict[str, Any]] = []
    while not events or not until(events[-1]):
        message = await asyncio.wait_for(ws.receive(), 15)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        events.append(json.loads(message.data))
    return events


async def test_a_crm_follows_a_call_on_the_socket_and_by_signed_webhooks(tmp_path: Path, phones: dict[str, Phone]) -> None:
    crm = Receiver()
    await crm.start()
    server = await start_server(tmp_path / "pbx", webhooks=[{"url": crm.url, "events": ["call.started", "call.ended"], "secret": SECRET}])
    try:
        for ext, phone in phones.items():
            await phone.register(server.sip, ext, PASSWORDS[ext])
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://{server_http(server)}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}) as ws,
        ):
            await talk(phones["1001"], phones["1002"], "1002")
            events = await next_events(ws, lambda e: e["type"] == "call.ended")
        calls = [e for e in events if e["type"].startswith("call.")]
        assert [e["type"] for e in calls] == ["call.started", "call.answered", "call.ended"]
        started, answered, ended = calls
        assert started["from"] == "1001" and started["to"] == "1002" and answered["by"] == "1002"
        assert {e["call_id"] for e in calls} == {started["call_id"]}
        assert ended["disposition"] == "answered"
        assert ended["cdr"]["call_id"] == started["call_id"] and ended["cdr"]["duration"] >= 0
        assert [e["id"] for e in calls] == sorted(e["id"] for e in calls)
        assert await server.cdr_row() == ended["cdr"]  # the row as stored, field by field

        await crm.wait_for(lambda got: len(got) == 2)
        delivered = [verified(headers, body) for headers, body in crm.got]
        assert [e["type"] for e in delivered] == ["call.started", "call.ended"]  # only the types it asked for, in order
        assert delivered[1] == ended
        forged_headers, forged_body = crm.got[1]
        with pytest.raises(AssertionError):  # a receiver refuses a body changed on the way
            verified(forged_headers, forged_body.replace(b'"answered"', b'"no-answer"'))
        with pytest.raises(AssertionError):  # and one signed with any other secret
            verified(forged_headers, forged_body, secret="guessed")
        assert await server.metric("pbx_webhook_failures_total") == 0
    finally:
        await server.stop()
        await crm.stop()


async def test_a_failing_webhook_is_retried_and_counted_and_a_silent_one_holds_no_call(tmp_path: Path, phones: dict[str, Phone]) -> None:
    attempts: dict[int, int] = {}

    def flaky(event: dict[str, Any]) -> int:
        attempts[event["id"]] = attempts.get(event["id"], 0) + 1
        return 500 if attempts[event["id"]] <= 2 else 200

    crm = Receiver(flaky)
    await crm.start()
    # A receiver that takes the connection and never answers.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/hook"
    hooks = [{"url": silent_url, "secret": SECRET}, {"url": crm.url, "events": ["call.ended"], "secret": SECRET}]
    server = await start_server(tmp_path / "pbx", webhooks=hooks)
    try:
        for ext, phone in phones.items():
            await phone.register(server.sip, ext, PASSWORDS[ext])
        started = time.monotonic()
        await talk(phones["1001"], phones["1002"], "1002")
        await talk(phones["1002"], phones["1001"], "1001")
        assert time.monotonic() - started < 10, "calls waited for a webhook"
        await crm.wait_for(lambda got: sum(1 for _, body in got if verified_status(body)) >= 6)
        deliveries = [verified(headers, body) for headers, body in crm.got]
        ids = [e["id"] for e in deliveries]
        assert sorted(set(ids)) == sorted(attempts) and all(n == 3 for n in attempts.values())
        assert ids == sorted(ids), "in order: the second waits for the first"
        assert await server.metric("pbx_webhook_failures_total") >= 4  # two per event here, and the silent one's
    finally:
        await server.stop()
        await crm.stop()
        silent.close()


async def test_a_transfer_a_recording_and_a_voicemail_are_on_the_feed(tmp_path: Path, phones: dict[str, Phone]) -> None:
    extensions = {ext: {"name": f"User {ext}", "password": pw, "record": ext == "1002"} for ext, pw in PASSWORDS.items()}
    extensions["1003"]["voicemail"] = {}
    server = await start_server(tmp_path / "pbx", extensions=extensions)
    base = f"http://{server_http(server)}"
    a, b = phones["1001"], phones["1002"]
    try:
        for ext, phone in phones.items():
            await phone.register(server.sip, ext, PASSWORDS[ext])
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session,
            session.ws_connect(f"{base}/api/events?types=call.transferred,call.ended,recording.ready,voicemail.left") as ws,
        ):
            # 1001 calls 1002 (recorded); the API transfers 1001 to 1003, who does not answer: voicemail.
            call = await a.call("sip:1002@pbx.local")
            incoming = await b.wait_event("incoming", timeout=15)
            await b.answer(incoming["call"])
            await a.wait_event("call_state", call=call, state="confirmed")
            await asyncio.sleep(1)  # the conversation's length: the recording has audio
            async with session.get(f"{base}/api/calls") as response:
                (bridged,) = (await response.json())["items"]
            async with session.post(f"{base}/api/calls/{bridged['id']}/transfer", json={"to": "voicemail:1003"}) as response:
                assert response.status == 200, await response.text()
                piece = await response.json()
            await b.wait_event("call_state", call=incoming["call"], state="disconnected")
            await server.wait_log(r"voicemail for 1003 from 1001: recording")
            await a.play_tone(call, 1000)
            await asyncio.sleep(1.5)  # the message's length
            await a.dtmf(call, "#")
            await a.wait_event("call_state", call=call, state="disconnected", timeout=15)
            seen: list[dict[str, Any]] = []
            while Counter(e["type"] for e in seen) != {"call.transferred": 1, "call.ended": 2, "recording.ready": 1, "voicemail.left": 1}:
                seen += await next_events(ws, lambda _: True)
        (moved,) = [e for e in seen if e["type"] == "call.transferred"]
        assert (moved["call_id"], moved["to"], moved["by"]) == (bridged["id"], "1003", "1002")
        (recorded,) = [e for e in seen if e["type"] == "recording.ready"]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            async with session.get(f"{base}/api/recordings") as response:
                (recording,) = (await response.json())["items"]
            async with session.get(f"{base}/api/voicemail/1003") as response:
                (message,) = (await response.json())["items"]
        assert (recorded["recording_id"], recorded["call_id"], recorded["seconds"]) == (recording["id"], bridged["id"], recording["seconds"])
        (left,) = [e for e in seen if e["type"] == "voicemail.left"]
        assert (left["mailbox"], left["message_id"], left["caller"]) == ("1003", message["id"], "1001")
        ended = {e["call_id"]: e["disposition"] for e in seen if e["type"] == "call.ended"}
        assert ended == {bridged["id"]: "answered", piece["id"]: "voicemail"}
    finally:
        await server.stop()


def verified_status(body: bytes) -> bool:
    return json.loads(body)["type"] == "call.ended"


async def test_a_ticket_opens_the_socket_once_and_nothing_else(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx")
    base = f"http://{server_http(server)}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/api/tickets", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 201
                ticket = (await response.json())["ticket"]
            async with session.post(f"{base}/api/tickets") as response:
                assert response.status == 401  # a ticket needs the token
            async with session.get(f"{base}/api/cdr?ticket={ticket}") as response:
                assert response.status == 401  # good for the event socket only, and not spent here
            async with session.ws_connect(f"{base}/api/events?ticket={ticket}&types=wallboard") as ws:
                board = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
                assert board["type"] == "wallboard" and board["queues"] == []
            for replayed in (ticket, ticket[:-1] + ("A" if ticket[-1] != "A" else "B"), ""):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(f"{base}/api/events?ticket={replayed}")
                assert refused.value.status == 401
            async with session.get(f"{base}/api/events?types=call.ended,nonsense", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 422 and (await response.json())["error"] == "invalid-query"
        assert await server.metric("pbx_security_events_total", event="auth_failure") >= 4
    finally:
        await server.stop()


def test_a_ticket_expires_and_is_good_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tickets = Tickets()
    now = 1_000_000.0
    monkeypatch.setattr(time, "time", lambda: now)
    first, expires = tickets.issue()
    second, _ = tickets.issue()
    assert expires == now + 30
    assert tickets.redeem(first) and not tickets.redeem(first)
    now += 31
    assert not tickets.redeem(second)


def test_the_signature_is_the_hmac_of_timestamp_and_body() -> None:
    body = b'{"type":"call.ended"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k", "1700000000", body) == f"sha256={expected}"


def server_http(server: Server) -> str:
    return f"127.0.0.1:{server.http_port}"
