"""Outbound registration to a provider (`trunks.NAME.register`).

Keeps one binding alive per trunk: REGISTER, answer the digest challenge,
refresh before the granted interval runs out, and after a failure try again
with exponential back-off. Every change of state is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiosipua import SipRequest, SipResponse, generate_call_id, generate_tag

from pbx.config.model import Trunk
from pbx.sip.credentials import Credentials
from pbx.sip.stack import SipStack
from pbx.sip.transport import Flow

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0


class TrunkRegistration:
    """The registration of one trunk at its provider."""

    def __init__(self, stack: SipStack, trunk: Trunk) -> None:
        assert trunk.register is not None
        self.stack = stack
        self.trunk = trunk
        self.auth = Credentials(trunk.register.username, trunk.register.password, trunk.auth_algorithms)
        self.aor = f"sip:{trunk.register.username}@{trunk.host}"
        self.call_id = generate_call_id(stack.advertised_host)
        self.tag = generate_tag()
        self.cseq = 0
        self.state = "unregistered"
        self._task: asyncio.Task[None] | None = None

    @property
    def registrar_uri(self) -> str:
        """The REGISTER's Request-URI (and digest uri): the trunk's host, with its transport unless UDP."""
        params = f";transport={self.trunk.transport}" if self.trunk.transport != "udp" else ""
        return f"sip:{self.trunk.host}:{self.trunk.port}{params}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set_state(self, state: str, detail: str) -> None:
        if state != self.state:
            log = logger.info if state == "registered" else logger.warning
            log("trunk %s: %s (%s)", self.trunk.name, state, detail)
        self.state = state

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                granted = await self._register_once()
            except OSError as exc:
                granted, detail = None, str(exc)
            else:
                detail = "no usable answer"
            if granted:
                self._set_state("registered", f"for {granted} s")
                backoff = BACKOFF_FIRST
                await asyncio.sleep(max(granted * 0.9, granted - 30, 1))
            else:
                self._set_state("failed", f"{detail}; retrying in {backoff:.0f} s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _register_once(self) -> int | None:
        """One REGISTER exchange; the granted interval on success."""
        # Over TLS this opens (or reuses) the connection; a refused one or a bad certificate is an OSError.
        flow = await self.stack.flow_to(self.trunk.host, self.trunk.port, self.trunk.transport)
        response = await self._send(flow, None)
        if response.status_code in (401, 407):
            credentials = self.auth.answer(response, "REGISTER", self.registrar_uri)
            if credentials is not None:
                response = await self._send(flow, credentials)
        if not 200 <= response.status_code < 300:
            logger.warning("trunk %s: REGISTER answered %d %s", self.trunk.name, response.status_code, response.reason_phrase)
            return None
        return _granted(response, self.trunk.register.expires if self.trunk.register else 300)

    async def _send(self, flow: Flow, credentials: tuple[str, str] | None) -> SipResponse:
        self.cseq += 1
        request = SipRequest(method="REGISTER", uri=self.registrar_uri)
        request.headers.append("Via", self.stack.new_via(flow))
        request.headers.set_single("From", f"<{self.aor}>;tag={self.tag}")
        request.headers.set_single("To", f"<{self.aor}>")
        request.headers.set_single("Call-ID", self.call_id)
        request.headers.set_single("CSeq", f"{self.cseq} REGISTER")
        request.headers.set_single("Max-Forwards", "70")
        request.headers.set_single("Contact", f"<{self.stack.contact_uri(flow, self.auth.username)}>")
        request.headers.set_single("Expires", str(self.trunk.register.expires if self.trunk.register else 300))
        request.headers.set_single("User-Agent", self.stack.user_agent)
        if credentials is not None:
            request.headers.set_single(*credentials)
        done: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()

        def on_response(response: SipResponse) -> None:
            if response.status_code >= 200 and not done.done():
                done.set_result(response)

        self.stack.request(request, flow, on_response)
        return await done


def _granted(response: SipResponse, asked: int) -> int:
    """The interval the registrar granted: Contact's expires, else Expires (RFC 3261 §10.2.4)."""
    for contact in response.contact:
        value = contact.params.get("expires")
        if value and value.isdigit():
            return int(value)
    header = response.get_header("expires")
    return int(header) if header and header.strip().isdigit() else asked
