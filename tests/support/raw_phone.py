"""A SIP user agent on a bare UDP socket for subscriptions (RFC 6665):
hand-built, digest-authenticated SUBSCRIBEs and REGISTERs, and a chosen
answer to every NOTIFY it receives, which it keeps for the test to read;
INVITEs it receives are kept unanswered, for the test to answer by hand,
and the ACKs and BYEs (answered 200) of the dialogs it answers so, too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiosipua import (
    SipDigestAuth,
    SipMessage,
    SipRequest,
    SipResponse,
    build_credentials,
    generate_branch,
    generate_call_id,
    generate_tag,
    parse_auth,
    parse_via,
    stringify_auth,
)

from pbx.sip.messages import make_response
from pbx.sip.mwi import CONTENT_TYPE

DOMAIN = "pbx.local"


@dataclass
class RawDialog:
    """The subscriber's side of one subscription dialog."""

    resource: str
    call_id: str
    from_tag: str
    to_tag: str | None = None


class RawPhone(asyncio.DatagramProtocol):
    """A SIP user agent on a bare UDP socket, for what pjsua2 will not send:
    hand-built requests, and a chosen answer to every NOTIFY it receives."""

    def __init__(self, server: tuple[str, int], user: str) -> None:
        self.server = server
        self.user = user
        self.port = 0
        self.notify_status = 200
        self.notifies: asyncio.Queue[SipRequest] = asyncio.Queue()
        self.invites: asyncio.Queue[SipRequest] = asyncio.Queue()
        self.acks: asyncio.Queue[SipRequest] = asyncio.Queue()
        self.byes: asyncio.Queue[SipRequest] = asyncio.Queue()
        self.cseq = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._answers: dict[str, asyncio.Future[SipResponse]] = {}

    @classmethod
    async def open(cls, server: tuple[str, int], user: str) -> RawPhone:
        loop = asyncio.get_running_loop()
        transport, phone = await loop.create_datagram_endpoint(lambda: cls(server, user), local_addr=("127.0.0.1", 0))
        phone.port = int(transport.get_extra_info("sockname")[1])
        return phone

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def contact(self) -> str:
        return f"sip:{self.user}@127.0.0.1:{self.port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = SipMessage.parse(data)
        assert self._transport is not None
        if isinstance(message, SipResponse):
            branch = parse_via(message.headers.get("via")[0]).branch or ""
            answer = self._answers.get(branch)
            if message.status_code >= 200 and answer is not None and not answer.done():
                answer.set_result(message)
            return
        if message.method == "INVITE":
            self.invites.put_nowait(message)
            return
        if message.method == "ACK":
            self.acks.put_nowait(message)
            return
        status = {"NOTIFY": self.notify_status, "BYE": 200}.get(message.method, 501)
        self._transport.sendto(bytes(make_response(message, status)), addr)
        if message.method == "NOTIFY":
            self.notifies.put_nowait(message)
        elif message.method == "BYE":
            self.byes.put_nowait(message)

    def send_now(self, *messages: SipRequest | SipResponse) -> None:
        """Send ``messages`` to the server back to back, waiting for nothing."""
        assert self._transport is not None
        for message in messages:
            self._transport.sendto(bytes(message), self.server)

    async def next_notify(self, timeout: float = 10.0) -> SipRequest:
        async with asyncio.timeout(timeout):
            return await self.notifies.get()

    def build(self, method: str, uri: str, to: str, call_id: str, from_tag: str, headers: dict[str, str]) -> SipRequest:
        self.cseq += 1
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={generate_branch()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{DOMAIN}>;tag={from_tag}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            f"CSeq: {self.cseq} {method}",
            f"Contact: <{self.contact}>",
            *(f"{name}: {value}" for name, value in headers.items()),
            "Content-Length: 0",
        ]
        request = SipMessage.parse("\r\n".join(lines) + "\r\n\r\n")
        assert isinstance(request, SipRequest)
        return request

    def answer_to(self, request: SipRequest) -> asyncio.Future[SipResponse]:
        """The final answer the server will give ``request``, sent some other way (:meth:`send_now`)."""
        answer: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()
        self._answers[parse_via(request.headers.get("via")[0]).branch or ""] = answer
        return answer

    async def send(self, request: SipRequest, timeout: float = 5.0) -> SipResponse:
        """Send ``request`` to the server; its final answer."""
        assert self._transport is not None
        branch = parse_via(request.headers.get("via")[0]).branch or ""
        answer = self.answer_to(request)
        self._transport.sendto(bytes(request), self.server)
        try:
            async with asyncio.timeout(timeout):
                return await answer
        finally:
            self._answers.pop(branch, None)

    async def send_authorized(self, method: str, uri: str, password: str | None, **build: Any) -> SipResponse:
        """Send a request built by :meth:`build`; answer a 401 with ``password``'s credentials."""
        response = await self.send(self.build(method, uri, **build))
        if response.status_code != 401 or password is None:
            return response
        challenge = next(
            c for c in map(parse_auth, response.headers.get("WWW-Authenticate")) if c.params.get("algorithm") == "MD5"
        )
        credentials = build_credentials(SipDigestAuth(self.user, password), challenge, method, uri)
        assert credentials is not None
        build["headers"] = {**build["headers"], "Authorization": stringify_auth(credentials)}
        return await self.send(self.build(method, uri, **build))

    async def register(self, password: str, expires: int = 600) -> SipResponse:
        uri = f"sip:{DOMAIN}"
        return await self.send_authorized(
            "REGISTER",
            uri,
            password,
            to=f"<sip:{self.user}@{DOMAIN}>",
            call_id=generate_call_id("127.0.0.1"),
            from_tag=generate_tag(),
            headers={"Expires": str(expires)},
        )

    async def subscribe(
        self,
        resource: str,
        password: str | None = None,
        *,
        dialog: RawDialog | None = None,
        expires: int | None = 600,
        event: str = "message-summary",
        accept: str | None = CONTENT_TYPE,
    ) -> tuple[SipResponse, RawDialog]:
        """SUBSCRIBE to ``resource`` (by default to its message-summary, RFC
        3842): a new subscription, or inside ``dialog``."""
        if dialog is None:
            dialog = RawDialog(resource, generate_call_id("127.0.0.1"), generate_tag())
        headers = {"Event": event}
        if accept is not None:
            headers["Accept"] = accept
        if expires is not None:
            headers["Expires"] = str(expires)
        to = f"<sip:{resource}@{DOMAIN}>" + (f";tag={dialog.to_tag}" if dialog.to_tag else "")
        response = await self.send_authorized(
            "SUBSCRIBE",
            f"sip:{resource}@{DOMAIN}",
            password,
            to=to,
            call_id=dialog.call_id,
            from_tag=dialog.from_tag,
            headers=headers,
        )
        to_addr = response.to_addr
        if response.status_code == 200 and dialog.to_tag is None and to_addr is not None:
            dialog.to_tag = to_addr.tag
        return response, dialog
