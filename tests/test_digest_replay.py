"""Replayed digest credentials against `pbx serve`: a header captured from a
real exchange, sent again on a new INVITE (to a trunk number: toll fraud),
REGISTER (a foreign Contact, `Contact: *`) and SUBSCRIBE, gets a fresh
challenge and changes nothing, while a real phone registers, re-registers
and calls as before. Only the wire is used, so the same file runs against
any version of the server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosipua import (
    SipDigestAuth,
    SipMessage,
    SipRequest,
    SipResponse,
    build_credentials,
    parse_auth,
    parse_via,
    stringify_auth,
)

from tests.support.phone import Phone
from tests.support.raw_sip import RawTrunk, open_trunk
from tests.support.server import PASSWORDS, Server, start_server
from tests.support.sipp import run_sipp

DOMAIN = "pbx.local"
SIPP = Path(__file__).parent / "sipp"
TOLL_NUMBER = "+15551230000"
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


# --- a SIP user agent on a bare UDP socket ---


class RawClient(asyncio.DatagramProtocol):
    """Sends hand-built requests, collects the final answer to each (by Via
    branch), ACKs every final answer to an INVITE and says 200 to whatever
    the server asks of it."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.addr = ("", 0)
        self.sent_ok: list[bytes] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._answers: dict[str, asyncio.Queue[SipResponse]] = {}
        self._cseq = 0

    @classmethod
    async def open(cls, server: Server, local_ip: str = "127.0.0.1") -> RawClient:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(
            lambda: cls(("127.0.0.1", server.sip_port)), local_addr=(local_ip, 0)
        )
        client.addr = transport.get_extra_info("sockname")[:2]
        return client

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = SipMessage.parse(data)
        if isinstance(message, SipRequest):
            if message.method != "ACK":
                self._send(_response_bytes(message, 200))
            return
        branch = parse_via(message.headers.get("via")[0]).branch or ""
        if message.status_code >= 200 and branch in self._answers:
            self._answers[branch].put_nowait(message)

    def _send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.sendto(data, self.server)

    def build(
        self,
        method: str,
        uri: str,
        user: str,
        *,
        to: str | None = None,
        call_id: str | None = None,
        contacts: tuple[str, ...] | None = None,
        headers: dict[str, str] | None = None,
        body: str = "",
    ) -> SipRequest:
        """A new request (new branch, next CSeq) from ``user``."""
        self._cseq += 1
        ip, port = self.addr
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{DOMAIN}>;tag={uuid.uuid4().hex[:10]}",
            f"To: {to or f'<{uri}>'}",
            f"Call-ID: {call_id or uuid.uuid4().hex}",
            f"CSeq: {self._cseq} {method}",
            *(f"Contact: {c}" for c in (contacts if contacts is not None else (f"<sip:{user}@{ip}:{port}>",))),
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
            *(["Content-Type: application/sdp"] if body else []),
            f"Content-Length: {len(body.encode())}",
        ]
        message = SipMessage.parse(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
        assert isinstance(message, SipRequest)
        return message

    async def send(self, request: SipRequest | bytes, timeout: float = 5.0) -> SipResponse:
        """Send ``request``; its final answer (ACKed when the request is an INVITE)."""
        parsed = request if isinstance(request, SipRequest) else SipMessage.parse(request)
        assert isinstance(parsed, SipRequest)
        branch = parse_via(parsed.headers.get("via")[0]).branch or ""
        answers = self._answers.setdefault(branch, asyncio.Queue())
        self._send(bytes(request))
        async with asyncio.timeout(timeout):
            response = await answers.get()
        if parsed.method == "INVITE":
            self._send(_ack(parsed, response))
        return response

    async def authorized(self, request: SipRequest, password: str, timeout: float = 5.0) -> tuple[SipResponse, SipRequest]:
        """Send ``request``; answer its 401 with credentials like a phone
        (same Call-ID, From and To, new branch and CSeq). The final answer
        and the request that carried the credentials."""
        response = await self.send(request, timeout)
        assert response.status_code == 401, response.status_code
        challenge = next(c for c in map(parse_auth, response.headers.get("www-authenticate")) if c.params["algorithm"] == "MD5")
        user = (request.from_addr.uri.user if request.from_addr else None) or ""
        credentials = build_credentials(SipDigestAuth(user, password), challenge, request.method, request.uri)
        assert credentials is not None
        again = _with_header(request, self._next_branch_and_cseq(request), "Authorization", stringify_auth(credentials))
        return await self.send(again, timeout), again

    def _next_branch_and_cseq(self, request: SipRequest) -> tuple[str, int]:
        self._cseq += 1
        return f"z9hG4bK{uuid.uuid4().hex}", self._cseq

    def replay(self, captured: SipRequest, template: SipRequest) -> SipRequest:
        """``template`` (a new request) carrying ``captured``'s Authorization header as it was."""
        [header] = captured.headers.get("authorization")
        return _with_header(template, None, "Authorization", header)


def _with_header(request: SipRequest, branch_cseq: tuple[str, int] | None, name: str, value: str) -> SipRequest:
    text = bytes(request).decode()
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if branch_cseq is not None:
        branch, cseq = branch_cseq
        lines = [
            line.split(";branch=")[0] + f";branch={branch};rport" if line.lower().startswith("via:") else
            f"CSeq: {cseq} {request.method}" if line.lower().startswith("cseq:") else line
            for line in lines
        ]
    lines.append(f"{name}: {value}")
    message = SipMessage.parse(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
    assert isinstance(message, SipRequest)
    return message


def _ack(invite: SipRequest, response: SipResponse) -> bytes:
    """The ACK of a final answer: same branch for a non-2xx (RFC 3261 §17.1.1.3)."""
    via = invite.headers.get("via")[0]
    if response.status_code < 300:
        via = via.split(";branch=")[0] + f";branch=z9hG4bK{uuid.uuid4().hex};rport"
    cseq = invite.cseq
    assert cseq is not None
    lines = [
        f"ACK {invite.uri} SIP/2.0",
        f"Via: {via}",
        "Max-Forwards: 70",
        f"From: {invite.headers.get_first('from')}",
        f"To: {response.headers.get_first('to')}",
        f"Call-ID: {invite.call_id}",
        f"CSeq: {cseq.seq} ACK",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response_bytes(request: SipRequest, status: int) -> bytes:
    lines = [f"SIP/2.0 {status} OK"]
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        lines += [f"{name}: {value}" for value in request.headers.get(name)]
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


# --- end to end ---


@pytest.fixture
async def trunk() -> AsyncIterator[RawTrunk]:
    """The provider: keeps every INVITE and answers it 486."""
    provider = await open_trunk("127.0.0.2", final=486)
    yield provider
    provider.close()


@pytest.fixture
async def server(tmp_path: Path, trunk: RawTrunk) -> AsyncIterator[Server]:
    extensions = {ext: {"name": f"User {ext}", "password": pw, "voicemail": {}} for ext, pw in PASSWORDS.items()}
    srv = await start_server(
        tmp_path / "pbx",
        sip={"auth_algorithms": ["MD5", "SHA-256"]},  # SIPp answers only the first challenge, and only MD5
        extensions=extensions,
        trunks={"carrier": {"host": f"127.0.0.2:{trunk.address[1]}"}},
        outbound=[{"match": r"^\+?[0-9]{7,15}$", "trunk": "carrier"}],
    )
    yield srv
    assert await srv.stop() == 0


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RawClient]:
    raw = await RawClient.open(server)
    yield raw
    raw.close()


async def registrations(server: Server) -> list[dict[str, Any]]:
    status, body = await server.http("/api/registrations")
    assert status == 200
    return list(json.loads(body)["items"])


def assert_fresh_challenge(response: SipResponse, captured: SipRequest) -> None:
    """A 401 whose nonce is not the one the captured credentials answered."""
    assert response.status_code == 401
    old = parse_auth(captured.headers.get_first("authorization") or "").params["nonce"]
    offered = [parse_auth(h).params for h in response.headers.get("www-authenticate")]
    assert offered and all(p["nonce"] != old and p.get("stale") == "true" for p in offered)


async def test_a_header_captured_from_an_invite_places_no_call_through_the_trunk(
    server: Server, client: RawClient, trunk: RawTrunk
) -> None:
    invite = client.build("INVITE", f"sip:1002@{DOMAIN}", "1001", body=SDP)
    answer, captured = await client.authorized(invite, PASSWORDS["1001"])
    assert answer.status_code not in (401, 403, 407)  # authenticated: 1002 is simply not registered

    # The attacker, on the phone's address, sends the header again: twice to
    # the premium number (the digest uri no longer names the Request-URI),
    # once more to 1002 (the uri fits, the nonce count is used up).
    for target in (TOLL_NUMBER, TOLL_NUMBER, "1002"):
        fraud = client.replay(captured, client.build("INVITE", f"sip:{target}@{DOMAIN}", "1001", body=SDP))
        assert_fresh_challenge(await client.send(fraud), captured)
    await server.wait_log(r"event=security kind=replay src=127\.0\.0\.1 extension=1001 method=INVITE reason=\"digest uri")
    await server.wait_log(r"event=security kind=replay src=127\.0\.0\.1 extension=1001 method=INVITE reason=\"nonce count")
    assert await server.metric("pbx_security_events_total", event="replay") == 3
    assert await server.metric("pbx_security_events_total", event="auth_failure") == 0
    with pytest.raises(TimeoutError):
        await trunk.next_invite(1.5)

    # The trunk is reachable: a call with fresh credentials does get there.
    legit = client.build("INVITE", f"sip:{TOLL_NUMBER}@{DOMAIN}", "1001", body=SDP)
    answer, _ = await client.authorized(legit, PASSWORDS["1001"])
    reached = await trunk.next_invite(5)
    assert reached.method == "INVITE" and TOLL_NUMBER in reached.uri
    assert answer.status_code == 486


async def test_a_replayed_register_adds_no_contact_and_cannot_remove_the_bindings(server: Server, client: RawClient) -> None:
    register = client.build("REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>", headers={"Expires": "600"})
    answer, captured = await client.authorized(register, PASSWORDS["1001"])
    assert answer.status_code == 200
    own = f"sip:1001@{client.addr[0]}:{client.addr[1]}"
    assert [r["contact"] for r in await registrations(server)] == [own]

    foreign = client.build(
        "REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>",
        contacts=("<sip:1001@198.51.100.66:5060>",), headers={"Expires": "3600"},
    )
    assert_fresh_challenge(await client.send(client.replay(captured, foreign)), captured)
    wipe = client.build("REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>", contacts=("*",), headers={"Expires": "0"})
    assert_fresh_challenge(await client.send(client.replay(captured, wipe)), captured)

    assert [r["contact"] for r in await registrations(server)] == [own]
    assert await server.metric("pbx_security_events_total", event="replay") == 2
    await server.wait_log(r"event=security kind=replay src=127\.0\.0\.1 extension=1001 method=REGISTER")


async def test_a_nonce_count_going_backwards_is_a_replay(server: Server, client: RawClient) -> None:
    def register() -> SipRequest:
        return client.build("REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>", headers={"Expires": "600"})

    challenge = await client.send(register())
    md5 = next(c for c in map(parse_auth, challenge.headers.get("www-authenticate")) if c.params["algorithm"] == "MD5")

    def with_count(nc: int) -> SipRequest:
        credentials = build_credentials(SipDigestAuth("1001", PASSWORDS["1001"]), md5, "REGISTER", f"sip:{DOMAIN}", nonce_count=nc)
        assert credentials is not None
        return _with_header(register(), None, "Authorization", stringify_auth(credentials))

    assert (await client.send(with_count(5))).status_code == 200
    backwards = with_count(4)  # right password, fresh cnonce: only the count gives it away
    assert_fresh_challenge(await client.send(backwards), backwards)
    await server.wait_log(r"event=security kind=replay src=127\.0\.0\.1 extension=1001 method=REGISTER reason=\"nonce count 4 not above 5\"")
    assert (await client.send(with_count(6))).status_code == 200


async def test_a_replayed_subscribe_is_challenged_not_accepted(server: Server, client: RawClient) -> None:
    headers = {"Event": "message-summary", "Accept": "application/simple-message-summary", "Expires": "600"}
    subscribe = client.build("SUBSCRIBE", f"sip:1001@{DOMAIN}", "1001", headers=headers)
    answer, captured = await client.authorized(subscribe, PASSWORDS["1001"])
    assert answer.status_code == 200

    again = client.replay(captured, client.build("SUBSCRIBE", f"sip:1001@{DOMAIN}", "1001", headers=headers))
    assert_fresh_challenge(await client.send(again), captured)
    assert await server.metric("pbx_security_events_total", event="replay") == 1
    await server.wait_log(r"event=security kind=replay src=127\.0\.0\.1 extension=1001 method=SUBSCRIBE")


async def test_a_retransmitted_register_is_answered_again_and_is_no_replay(server: Server, client: RawClient) -> None:
    register = client.build("REGISTER", f"sip:{DOMAIN}", "1001", to=f"<sip:1001@{DOMAIN}>", headers={"Expires": "600"})
    answer, sent = await client.authorized(register, PASSWORDS["1001"])
    assert answer.status_code == 200
    # The same datagram again (same branch), as a phone resends it when the
    # 200 was lost: the transaction answers it before authentication runs.
    again = await client.send(bytes(sent))
    assert again.status_code == 200
    assert again.headers.get_first("call-id") == answer.headers.get_first("call-id")
    assert await server.metric("pbx_security_events_total", event="replay") == 0
    assert await server.metric("pbx_auth_failures_total") == 0


async def test_real_phones_register_refresh_call_and_unregister_with_growing_nonce_counts(server: Server) -> None:
    # SIPp refreshes and unregisters with the nonce of its first challenge,
    # counting up (nc 2 and 3), as hardware phones do: no new challenge.
    sipp = await run_sipp(
        SIPP / "register_refresh.xml", server.sip, service="1003", extra=("-au", "1003", "-ap", PASSWORDS["1003"])
    )
    assert sipp.ok, sipp.report()
    async with await Phone.start(name="alice") as alice, await Phone.start(name="bob") as bob:
        await bob.register(server.sip, "1002", PASSWORDS["1002"])
        await alice.register(server.sip, "1001", PASSWORDS["1001"], mwi=True)
        # pjsua2 answers a new challenge for its SUBSCRIBE, INVITE and unREGISTER.
        call = await alice.call(f"sip:1002@{DOMAIN}")
        incoming = await bob.wait_event("incoming", timeout=10)
        await bob.answer(incoming["call"])
        await alice.wait_event("call_state", call=call, state="confirmed", timeout=10)
        await alice.hangup(call)
        await bob.wait_event("call_state", call=incoming["call"], state="disconnected", timeout=10)
        assert await alice.unregister() == 200
        assert [r["extension"] for r in await registrations(server)] == ["1002"]
    assert await server.metric("pbx_security_events_total", event="replay") == 0
    assert await server.metric("pbx_security_events_total", event="auth_failure") == 0
