"""Calls through the server (a back-to-back user agent).

A call has one inbound leg (the caller's dialog with us) and, while it rings,
one outbound leg per registered contact of the callee (or one to a trunk). The
first outbound leg to answer is bridged through an RTP relay; the others get
CANCEL. Every call ends with one CDR row, whose disposition is one of
DISPOSITIONS.

Each step of a call is logged as one INFO line of ``key=value`` pairs that
starts with ``call=ID event=NAME`` (see :func:`call_event`), so one grep for
the call id tells its story: started, ivr, queued, routed, forwarded,
answered, ended (with the CDR's fields), or refused for an INVITE turned
away before it became a call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiosipua import SdpNegotiationError, SipDigestAuth, SipRequest, SipResponse, parse_address

from pbx.config import Config, Destination, Trunk, parse_destination
from pbx.events import EventBus, logfmt
from pbx.ivr.audio import CallAudio
from pbx.ivr.engine import IvrSession
from pbx.ivr.schema import Flow as IvrFlow
from pbx.media.clock import MediaClock
from pbx.media.codecs import Codec
from pbx.media.prompts import PromptLibrary
from pbx.media.ports import RtpPortPool
from pbx.media.quality import estimate_mos
from pbx.media.relay import RelaySide, RtpRelay
from pbx.media.srtp import SrtpSides
from pbx.recordings import Recorder, Recording
from pbx.sip.auth import AddressGuard, DigestAuthenticator, authenticate_request
from pbx.sip.dialog import ALLOW, InboundLeg, Leg, LegEvents, LegState, OutboundLeg
from pbx.sip.messages import uri_user
from pbx.sip.registrar import Registrar
from pbx.sip.routing import DialPolicy, DialRefused
from pbx.sip.sdp import (
    DTMF_PT,
    MediaDescription,
    SdpCodec,
    answer_codec,
    build_sdp,
    offer_codecs,
    parse_media,
    plain_offer,
    reverse_direction,
)
from pbx.sip.stack import Flow, SipStack, transaction_branch
from pbx.sip.transactions import ServerTransaction
from pbx.store.db import Store, iso_time
from pbx.tasks import Background

logger = logging.getLogger(__name__)

ALLOW_OUT_OF_DIALOG = f"{ALLOW}, REGISTER"

# How a call ended, as the CDR, the call_ended event and pbx_calls_total say it:
#   answered     someone took the call: a person, the IVR, a queue's agent (also when
#                the server hung it up at shutdown after it was answered)
#   busy         the callee was busy (486/600)
#   no-answer    the callee rang out (sip.ring_timeout, 408/480/487)
#   cancelled    the caller hung up while it rang
#   rejected     the callee declined (603), or a `hangup` destination
#   unavailable  the callee is not registered, or the server stopped while the call
#                still waited for a person (ringing or in a queue)
#   failed       anything else: no route, no RTP port, a trunk error, unusable media
#   abandoned    the caller hung up while waiting in a queue
#   callback     the caller left the queue asking to be called back
#   timeout      the caller waited a queue's max_wait and had nowhere to go
#   voicemail    the caller left a message
DISPOSITIONS = (
    "answered",
    "busy",
    "no-answer",
    "cancelled",
    "rejected",
    "unavailable",
    "failed",
    "abandoned",
    "callback",
    "timeout",
    "voicemail",
)


def call_event(call_id: str, event: str, **fields: object) -> None:
    """Log one step of a call as ``call=ID event=NAME key=value ...`` at INFO.

    Fields that are None are left out; floats get one decimal; values with
    spaces, quotes or ``=`` are double-quoted (logfmt), so the line splits
    on spaces.
    """
    if logger.isEnabledFor(logging.INFO):
        pairs = "".join(f" {key}={logfmt(value)}" for key, value in fields.items() if value is not None)
        logger.info("call=%s event=%s%s", logfmt(call_id), event, pairs)


def new_call_id() -> str:
    """A new call's id. The server makes it: the CDR, the calls map, the API
    and recordings are keyed by it, never by a SIP Call-ID, which any peer
    chooses and may reuse."""
    return uuid.uuid4().hex[:16]



class CallState(enum.Enum):
    RINGING = "ringing"
    IVR = "ivr"
    QUEUED = "queued"
    ANSWERED = "answered"
    ENDED = "ended"


class CallConflict(Exception):
    """An action that does not fit the call's state now: ``error`` names it, the message says why."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class Unreachable(Exception):
    """A destination that cannot be rung now, with the status and CDR disposition that say why."""

    def __init__(self, status: int, disposition: str) -> None:
        super().__init__(f"{status} {disposition}")
        self.status = status
        self.disposition = disposition


# A dialed leg that answered, and its 200 OK.
Answered = tuple[OutboundLeg, SipResponse]


class Queues(Protocol):
    """What the call service needs of the queues (wired in by app.py)."""

    def exists(self, name: str) -> bool:
        """Whether ``queue:NAME`` can take callers."""

    async def wait(self, call: Call, queue: str) -> Destination | None:
        """Keep ``call`` in ``queue`` until an agent has it (None, also when the
        caller hung up or asked for a callback) or it must go elsewhere."""

    def feature(self, extension: str, code: str) -> str:
        """Carry out agent feature ``code`` for ``extension``; the prompt confirming it."""


class Voicemail(Protocol):
    """What the call service needs of voicemail (wired in by app.py)."""

    def exists(self, mailbox: str) -> bool:
        """Whether ``mailbox`` takes messages."""

    async def deposit(self, audio: CallAudio, mailbox: str, caller: str) -> None:
        """Greeting, beep, and the caller's message."""

    async def main(self, audio: CallAudio, mailbox: str | None, *, own: bool, source: str) -> None:
        """Voicemail by phone: sign in (wrong PINs charged to ``source``, the
        caller's address), then hear and manage messages."""


@dataclass
class Call:
    """One call: the caller's leg, the callee's forks, and the media between them."""

    id: str
    direction: str  # internal | inbound | outbound
    caller: str
    callee: str
    a: Leg  # an InboundLeg, or for calls the server places (callbacks) the agent's OutboundLeg
    a_media: MediaDescription
    # The SIP Call-ID of the caller's INVITE (of the first leg, for calls the server
    # places): in the log and the CDR to find the call in a SIP trace; never a key.
    sip_call_id: str = ""
    relay: RtpRelay | None = None
    srtp: SrtpSides = field(default_factory=SrtpSides)  # the SDES keys of the relay's sides
    forks: list[OutboundLeg] = field(default_factory=list)
    b: OutboundLeg | None = None
    a_codec: SdpCodec | None = None
    b_codec: SdpCodec | None = None
    b_dtmf_pt: int | None = None
    state: CallState = CallState.RINGING
    started: float = field(default_factory=time.time)
    answered_at: float | None = None
    fork_codes: list[int] = field(default_factory=list)
    ring_timer: asyncio.TimerHandle | None = None
    early_sdp: str | None = None
    ringing_sent: bool = False
    task: asyncio.Task[Any] | None = None
    audio: CallAudio | None = None
    queue: str | None = None
    agent: str | None = None
    recording: Recording | None = None
    recordings: int = 0  # recordings begun on this call, the API's included
    queued_at: float | None = None  # when the call joined its queue
    wait: float | None = None  # seconds in the (last) queue until an agent answered or the caller left it
    hangup_by: str | None = None  # caller | callee | pbx
    voicemail: str | None = None  # the mailbox the caller is leaving a message in
    # The rung extension's mailbox: where the caller goes on busy or no answer.
    mailbox: str | None = None
    # Extensions this call occupies: the calling one, the rung or bridged one, the agent.
    extensions: set[str] = field(default_factory=set)
    # Resolves with the CDR disposition when the call ends.
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Resolves when the caller is bridged to someone.
    bridged: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def leave_queue(self, now: float) -> None:
        """The caller's time in its queue ends: an agent answered, the queue
        sent it on, or it hung up there. Only the first of these counts."""
        if self.queued_at is not None and self.wait is None:
            self.wait = now - self.queued_at


class CallService:
    """Handles every request that is not a REGISTER: new calls and in-dialog traffic."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        stack: SipStack,
        registrar: Registrar,
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        ports: RtpPortPool,
        store: Store,
        events: EventBus,
        media_ip: str,
        clock: MediaClock,
        flows: Callable[[], Mapping[str, IvrFlow]],
        prompts: Callable[[], PromptLibrary],
        http: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.config = config
        self.clock = clock
        self.flows = flows
        self.prompts = prompts
        self.http = http
        self.stack = stack
        self.registrar = registrar
        self.authenticator = authenticator
        self.guard = guard
        self.ports = ports
        self.store = store
        self.events = events
        self.media_ip = media_ip
        self.queues: Queues | None = None
        self.voicemail: Voicemail | None = None
        self.recorder: Recorder | None = None
        self.calls: dict[str, Call] = {}
        self._ringing: Counter[str] = Counter()  # extensions being dialed outside a call's forks
        self._legs: dict[tuple[str, str], tuple[Call, Leg]] = {}
        # Who may dial what: outbound rules, class of service, max_calls.
        self.dialing = DialPolicy(config, events, self.calls_of)
        self._tasks = Background("call")
        self._drain_until: float | None = None  # loop time: set once the server is stopping

    # --- entry points ---

    @property
    def draining(self) -> bool:
        """Whether the server is stopping: new calls are refused, calls in progress go on."""
        return self._drain_until is not None

    def drain(self, seconds: float) -> None:
        """Refuse new calls from now on (503 with Retry-After); calls in
        progress go on until :meth:`stop`, expected in ``seconds``."""
        if self._drain_until is None:
            self._drain_until = asyncio.get_running_loop().time() + seconds

    def handle_request(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        method = request.method.upper()
        to = request.to_addr
        to_tag = to.tag if to is not None else None
        if method == "CANCEL":
            self._cancel(request, txn)
        elif to_tag:
            found = self._legs.get((request.call_id or "", to_tag))
            if found is not None:
                found[1].in_dialog(request, txn)
            elif method != "ACK":
                txn.reply(481)
        elif method == "INVITE" and self._drain_until is not None:
            retry = max(1, math.ceil(self._drain_until - asyncio.get_running_loop().time()))
            call_event(request.call_id or "", "refused", status=503, reason="draining", retry_after=retry)
            txn.reply(503, headers={"Retry-After": str(retry)})
        elif method == "INVITE":
            self._new_call(request, flow, txn)
        elif method == "OPTIONS":
            txn.reply(200, headers={"Allow": ALLOW_OUT_OF_DIALOG, "Accept": "application/sdp"})
        elif method in ("BYE", "INFO", "UPDATE", "PRACK", "NOTIFY"):
            txn.reply(481)
        elif method != "ACK":
            txn.reply(405, headers={"Allow": ALLOW_OUT_OF_DIALOG})

    def handle_stray_response(self, response: SipResponse) -> None:
        """A 2xx retransmitted after its transaction ended: ACK it again."""
        from_addr = response.from_addr
        found = self._legs.get((response.call_id or "", from_addr.tag if from_addr and from_addr.tag else ""))
        if found is not None and isinstance(found[1], OutboundLeg) and 200 <= response.status_code < 300:
            found[1]._on_2xx(response)

    async def stop(self) -> None:
        """Hang up every call in progress (BYE, CANCEL, 503 to a caller still
        ringing), each with its CDR row; then let the rows and recordings finish."""
        self.drain(0)
        for call in list(self.calls.values()):
            self.hang_up(call, ringing_status=503)
        # Let CDR writes and recordings finish; anything still connecting after that is abandoned.
        await self._tasks.close(grace=5)

    # --- a new INVITE ---

    def _new_call(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        cfg = self.config()
        ip = flow.addr[0]
        called = uri_user(request.uri) or ""
        trunk = cfg.trunk_for_source(ip)
        if trunk is not None:
            destination = cfg.inbound.get(called)
            caller = _user_of(request.headers.get_first("from")) or "anonymous"
            direction = "inbound"
            if destination is None:
                call_event(request.call_id or "", "refused", status=404, reason="not in inbound", trunk=trunk.name, to=called)
                txn.reply(404)
                return
        else:
            caller_ext = authenticate_request(
                request,
                ip,
                txn,
                authenticator=self.authenticator,
                guard=self.guard,
                events=self.events,
                passwords=self.registrar.passwords,
            )
            if caller_ext is None:
                return
            caller = caller_ext
            destination = self._route_dialed(cfg, called)
            try:
                if destination.kind == "external":
                    self.dialing.outbound_trunk(destination, caller, src=ip)
                self.dialing.check_calls(caller, src=ip)
            except DialRefused as exc:
                call_event(request.call_id or "", "refused", status=exc.status, reason=str(exc), **{"from": caller, "to": called})
                txn.reply(exc.status)
                return
            direction = "outbound" if destination.kind == "external" else "internal"
        merged = self._merged_with(request)
        if merged is not None:
            # RFC 3261 §8.2.2.2: the same INVITE (Call-ID, From tag, CSeq) by another path.
            call_event(request.call_id or "", "refused", status=482, reason=f"merged with call {merged.id}")
            txn.reply(482, "Loop Detected")
            return
        srtp = SrtpSides(cfg.rtp.srtp)
        try:
            a_media = parse_media(request.text, cfg.rtp.codecs)
            refusal = srtp.refusal(a_media.secure, a_media.cryptos)
            if refusal is not None:
                raise SdpNegotiationError(refusal)
        except SdpNegotiationError as exc:
            call_event(request.call_id or "", "refused", status=488, reason=str(exc), **{"from": caller, "to": called})
            txn.reply(488)
            return
        a = InboundLeg(self.stack, flow, request, txn, self._a_events())
        a.on_ack_timeout = self._leg_hung_up
        call = Call(
            id=new_call_id(), direction=direction, caller=caller, callee=called, a=a, a_media=a_media,
            sip_call_id=request.call_id or "", srtp=srtp,
        )  # fmt: skip
        if direction != "inbound":
            call.extensions.add(caller)
        self.calls[call.id] = call
        self._legs[call.a.key] = (call, call.a)
        self.events.emit("call_started", call_id=call.id, direction=direction)
        fields = {"direction": direction, "from": caller, "to": called, "destination": destination}
        call_event(call.id, "started", **fields, trunk=trunk.name if trunk else None, sip_call_id=call.sip_call_id)
        # A number the extension dialed is dialed on its behalf (its class of service).
        self._run(call, self._connect(call, destination, party=caller if direction == "outbound" else None))

    def _run(self, call: Call, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work``, the call's own task; if it fails the call ends
        (``failed``; a caller still ringing gets 500) instead of staying up
        with nobody to end it."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                logger.exception("call=%s failed", call.id)
                if call.state is not CallState.ENDED:
                    self.hang_up(call, "failed", ringing_status=500)

        self._tasks.spawn(guarded())

    def _merged_with(self, request: SipRequest) -> Call | None:
        """The call in progress whose INVITE had this request's Call-ID, From
        tag and CSeq: the same request again on another path (a loop or a
        forking proxy), not a new call. A reused Call-ID alone (another From tag,
        another CSeq) is a new call with an id of its own."""
        from_addr, cseq = request.from_addr, request.cseq
        key = (request.call_id, from_addr.tag if from_addr else None, cseq.seq if cseq else None)
        for call in self.calls.values():
            if isinstance(call.a, InboundLeg):
                invite = call.a.invite
                theirs = (invite.call_id, invite.from_addr.tag if invite.from_addr else None, invite.cseq.seq if invite.cseq else None)
                if theirs == key:
                    return call
        return None

    def _route_dialed(self, cfg: Config, number: str) -> Destination:
        """Where a number an extension dials leads: an extension, an inbound
        number, a feature code, else outside (whether it may go there is
        the dial policy's to say)."""
        if number in cfg.extensions:
            return Destination("extension", number)
        if number in cfg.inbound:
            return cfg.inbound[number]
        features = cfg.features
        if number in (features.voicemail_main, features.agent_login, features.agent_pause):
            return Destination("feature", number)
        return Destination("external", number)

    # --- who may dial what (outbound rules, class of service, max_calls) ---

    def calls_of(self, extension: str) -> int:
        """The calls ``extension`` is in now, being rung for one included (its ``max_calls`` counts them)."""
        return self._ringing[extension] + sum(1 for call in self.calls.values() if extension in call.extensions)

    async def _connect(self, call: Call, destination: Destination, party: str | None = None) -> None:
        call.task = asyncio.current_task()
        try:
            call.relay = await RtpRelay.create(self.ports, self.clock, self.events)
        except OSError as exc:
            logger.error("call=%s no RTP port: %s", call.id, exc)
            self._fail_caller(call, 503, "failed")
            return
        if call.state is CallState.ENDED:  # the caller cancelled meanwhile
            call.relay.close()
            return
        call.srtp.take_offer(call.relay.a, call.a_media.secure, call.a_media.cryptos)  # checked by _new_call
        await self._go(call, destination, party)

    def _available(self, destination: Destination) -> bool:
        """Whether this server can take a call to ``destination`` now."""
        if destination.kind == "ivr":
            return destination.target in self.flows()
        if destination.kind == "queue":
            return self.queues is not None and self.queues.exists(destination.target)
        if destination.kind == "voicemail":
            return self.voicemail is not None and (destination.target == "main" or self.voicemail.exists(destination.target))
        if destination.kind == "feature":
            features = self.config().features
            if destination.target == features.voicemail_main:
                return self.voicemail is not None
            return self.queues is not None and destination.target in (features.agent_login, features.agent_pause)
        return destination.kind in ("extension", "external", "hangup")

    def extension_busy(self, extension: str) -> bool:
        """Whether ``extension`` is on a call or being rung (queue agents are never rung then)."""
        return self.calls_of(extension) > 0

    async def _go(self, call: Call, destination: Destination, party: str | None = None) -> None:
        """Send the call where ``destination`` says; a number outside is dialed
        for ``party`` (see :class:`DialPolicy`), by default for the server."""
        cfg = self.config()
        assert call.relay is not None
        if destination.kind == "hangup":
            self._fail_caller(call, 603, "rejected")
            return
        if not self._available(destination):
            logger.warning("call=%s destination %s is not available yet; answering 503", call.id, destination)
            self._fail_caller(call, 503, "failed")
            return
        if destination.kind == "ivr":
            await self._run_ivr(call, destination.target)
            return
        if destination.kind == "queue":
            await self._queue(call, destination.target)
            return
        if destination.kind == "feature":
            await self._feature(call, destination.target)
            return
        if destination.kind == "voicemail":
            await self._voicemail(call, destination.target)
            return
        if destination.kind == "extension":
            call.mailbox = destination.target if self._available(Destination("voicemail", destination.target)) else None
        try:
            legs = await self._make_legs(call.caller, destination, self.offer_sdp(call), self._b_events(), party)
        except Unreachable as exc:
            self._callee_failed(call, exc.status, exc.disposition)
            return
        if call.state is CallState.ENDED:
            return
        if destination.kind == "extension":
            call.extensions.add(destination.target)
        for leg in legs:
            self._add_fork(call, leg)
        call.ring_timer = asyncio.get_running_loop().call_later(cfg.sip.ring_timeout, self._no_answer, call)

    def offer_sdp(self, call: Call) -> str:
        """The SDP offer for ringing someone on the relay's b side on behalf of ``call``."""
        assert call.relay is not None
        # SRTP unless rtp.srtp is off; _leg_offer makes it plain RTP for legs that should not get keys.
        return build_sdp(self.media_ip, call.relay.b.port, self._offer_codecs(call), DTMF_PT, crypto=call.srtp.offer(call.relay.b))

    def _leg_offer(self, flow: Flow, offer: str) -> tuple[str, str | None]:
        """``offer`` as sent over ``flow``, and what to offer instead on a 488.
        With rtp.srtp optional, SDES keys go only to legs over TLS (over UDP or
        TCP anyone on the path would read them), so other legs are offered
        plain RTP; a TLS leg that refuses SRTP is offered plain RTP next."""
        if self.config().rtp.srtp != "optional" or " RTP/SAVP " not in offer:
            return offer, None
        plain = plain_offer(offer)
        return (offer, plain) if flow.name == "tls" else (plain, None)

    def _offer_codecs(self, call: Call) -> tuple[SdpCodec, ...]:
        """Codecs for the callee: the caller's offer, or once the caller is
        answered (by the IVR) its codec and what we can transcode it to."""
        supported = self.config().rtp.codecs
        if call.a_codec is None:
            return offer_codecs(call.a_media, supported)
        fixed = MediaDescription(call.a_media.addr, (call.a_codec,), call.a_media.dtmf_pt, "sendrecv")
        return offer_codecs(fixed, supported)

    def answer_here(self, call: Call) -> SdpCodec:
        """Answer the caller ourselves (IVR, queue, feature codes), once; the codec it talks."""
        assert call.relay is not None
        if call.a_codec is None:
            call.a_codec = call.a_media.codecs[0]
            call.relay.a.set_remote(call.a_media.addr, _codec(call.a_codec), call.a_media.dtmf_pt, call.a.flow.addr[0])
        if isinstance(call.a, InboundLeg) and call.a.state is not LegState.ANSWERED:
            crypto = call.srtp.crypto(call.relay.a)
            call.a.answer(build_sdp(self.media_ip, call.relay.a.port, (call.a_codec,), call.a_media.dtmf_pt, crypto=crypto))
            call.answered_at = time.time()
            self.events.emit("call_answered", call_id=call.id)
        return call.a_codec

    async def _run_ivr(self, call: Call, flow: str) -> None:
        """Answer the caller ourselves and walk it through ``flow``."""
        assert call.relay is not None
        cfg = self.config()
        codec = self.answer_here(call)
        call.state = CallState.IVR
        call_event(call.id, "ivr", flow=flow)
        call.audio = CallAudio(call.relay.a, self.prompts(), codec.name)
        session = IvrSession(
            self.flows(),
            flow,
            call.audio,
            variables={"caller": call.caller, "called": call.callee, "call_id": call.id},
            timezone=cfg.timezone,
            http=self.http(),
            events=self.events,
            available=self._available,
        )
        destination = await session.run()
        call.audio.stop()
        call.audio = None
        if call.state is CallState.ENDED:
            return
        call_event(call.id, "routed", flow=flow, destination=destination)
        if destination.kind == "hangup":
            self.hang_up(call, "answered")
            return
        call.state = CallState.RINGING
        await self._go(call, destination)

    async def _queue(self, call: Call, queue: str) -> None:
        """Wait in ``queue`` until an agent answers, or go where the queue says."""
        assert self.queues is not None
        call.state = CallState.QUEUED
        call.queue = queue
        call.queued_at, call.wait = time.time(), None  # a queue's on_timeout may lead to another queue
        call_event(call.id, "queued", queue=queue)
        destination = await self.queues.wait(call, queue)
        call.leave_queue(time.time())
        if destination is not None and call.state is CallState.QUEUED:
            call_event(call.id, "routed", queue=queue, destination=destination, wait=call.wait)
            call.state = CallState.RINGING
            await self._go(call, destination)

    async def _feature(self, call: Call, code: str) -> None:
        """A feature code: voicemail by phone, or an agent feature (do it, say so); then hang up."""
        assert call.relay is not None
        codec = self.answer_here(call)
        call.state = CallState.IVR
        call.audio = CallAudio(call.relay.a, self.prompts(), codec.name)
        call_event(call.id, "feature", code=code)
        if code == self.config().features.voicemail_main:
            assert self.voicemail is not None
            await self.voicemail.main(call.audio, call.caller, own=True, source=call.a.flow.addr[0])
        else:
            assert self.queues is not None
            await call.audio.play([self.queues.feature(call.caller, code)], interruptible=False)
        self.hang_up(call, "answered")

    async def _voicemail(self, call: Call, mailbox: str) -> None:
        """Take a message for ``mailbox``, or (``main``) voicemail by phone; then hang up."""
        assert self.voicemail is not None and call.relay is not None
        codec = self.answer_here(call)
        call.state = CallState.IVR
        call.audio = CallAudio(call.relay.a, self.prompts(), codec.name)
        call_event(call.id, "voicemail", mailbox=mailbox)
        call.voicemail = mailbox if mailbox != "main" else None
        if mailbox == "main":
            await self.voicemail.main(call.audio, None, own=False, source=call.a.flow.addr[0])
        else:
            await self.voicemail.deposit(call.audio, mailbox, call.caller)
        self.hang_up(call, "answered" if mailbox == "main" else "voicemail")

    def hang_up(self, call: Call, disposition: str | None = None, ringing_status: int = 480) -> None:
        """End ``call`` from the server's side, recording ``disposition`` (by
        default as a stopping server does: answered or voicemail once someone
        took it, unavailable while it still waited for a person); a caller
        still ringing gets ``ringing_status``."""
        call.hangup_by = call.hangup_by or "pbx"
        disposition = disposition or _hung_up_disposition(call, "unavailable", "unavailable")
        self._hang_up_everything(call, ringing_status)
        self._end(call, disposition)

    # --- what the admin API asks ---

    def destination_for(self, text: str, party: str, *, src: str = "-") -> Destination:
        """Where ``text`` leads when extension ``party`` asks for it (click-to-call):
        a destination written ``KIND:TARGET``, or a number as a phone would dial
        it (extension, inbound number, feature code, else outside). ValueError
        says why it leads nowhere; DialRefused when ``party`` may not dial that
        number or its trunk is full (:meth:`DialPolicy.outbound_trunk`, events from ``src``)."""
        cfg = self.config()
        destination = parse_destination(text) if ":" in text or text == "hangup" else self._route_dialed(cfg, text)
        if destination.kind == "hangup":
            raise ValueError("hangup connects to nobody")
        if destination.kind == "extension" and destination.target not in cfg.extensions:
            raise ValueError(f"there is no extension {destination.target}")
        if destination.kind == "external" and destination.trunk and destination.trunk not in cfg.trunks:
            raise ValueError(f"there is no trunk {destination.trunk}")
        if destination.kind == "external":
            self.dialing.outbound_trunk(destination, party, src=src)
        elif not self._available(destination):
            raise ValueError(f"{destination} does not exist")
        return destination

    async def recording_action(self, call: Call, action: str) -> Recording:
        """``start``, ``stop``, ``pause`` or ``resume`` the recording of a
        bridged call (a paused recording gets silence: card numbers).
        CallConflict when the call is not bridged or the action does not fit
        the recording's state; ``stop`` returns once the file is indexed."""
        if call.state is not CallState.ANSWERED or call.b is None or call.relay is None:
            raise CallConflict("not-bridged", f"call {call.id} is not bridged")
        recording = call.recording
        if action == "start":
            if recording is not None:
                raise CallConflict("already-recording", f"call {call.id} is already being recorded")
            if self.recorder is None:
                raise CallConflict("recording-unavailable", "this server does not record")
            recording = self._begin_recording(call)
        elif recording is None:
            raise CallConflict("not-recording", f"call {call.id} is not being recorded")
        elif action == "stop":
            call.recording = None
            assert self.recorder is not None
            await self.recorder.end(recording)
        elif action in ("pause", "resume"):
            if recording.paused == (action == "pause"):
                state = "already-paused" if recording.paused else "not-paused"
                raise CallConflict(state, f"the recording of call {call.id} is {state.replace('-', ' ')}")
            if action == "pause":
                recording.pause()
            else:
                recording.resume()
        else:
            raise ValueError(f"unknown recording action {action!r}")
        logger.info("call %s: recording %s: %s", call.id, recording.id, action)
        return recording

    def _fail_caller(self, call: Call, status: int, disposition: str) -> None:
        """End the call for the caller: a final error before we answered, BYE after."""
        _drop(call.a, status)
        self._end(call, disposition)

    # --- ringing someone for a call, and calls the server places ---

    async def _make_legs(
        self, caller: str, destination: Destination, offer: str, events: LegEvents, party: str | None = None
    ) -> list[OutboundLeg]:
        """Unstarted legs that ring ``destination`` (every contact of an
        extension, or the trunk the outbound rules give ``party``); Unreachable
        when there is none or the number may not be dialed."""
        cfg = self.config()
        if destination.kind == "extension":
            return self._extension_legs(cfg, caller, destination.target, offer, events)
        if destination.kind == "external":
            try:
                trunk = self.dialing.outbound_trunk(destination, party)
            except DialRefused as exc:
                logger.warning("not dialing %s: %s", destination, exc)
                raise Unreachable(exc.status, "failed") from exc
            return [await self._trunk_leg(cfg, trunk, caller, destination.target, offer, events)]
        logger.warning("cannot dial %s", destination)
        raise Unreachable(503, "failed")

    async def dial(
        self, targets: Sequence[Destination], *, caller: str, offer: str, timeout: float
    ) -> Answered | Unreachable:
        """Ring every target at once for ``timeout`` seconds, on behalf of
        ``caller``; the first leg to answer wins and the others are cancelled.
        The answered leg is the caller's to connect (:meth:`connect`) or hang up;
        otherwise Unreachable says why nobody answered."""
        won: asyncio.Future[Answered] = asyncio.get_running_loop().create_future()
        pending: set[OutboundLeg] = set()
        codes: list[int] = []

        def answered(leg: Leg, resp: SipResponse) -> None:
            assert isinstance(leg, OutboundLeg)
            if won.done():
                leg.bye()
            else:
                won.set_result((leg, resp))

        def failed(leg: Leg, code: int, resp: SipResponse | None) -> None:
            pending.discard(leg)  # type: ignore[arg-type]
            codes.append(code)
            if not pending and not won.done():
                won.set_exception(Unreachable(*_outcome(codes)))

        events = LegEvents(answered=answered, failed=failed)
        legs: list[OutboundLeg] = []
        rung = [t.target for t in targets if t.kind == "extension"]
        self._ringing.update(rung)
        try:
            for target in targets:
                try:
                    legs += await self._make_legs(caller, target, offer, events)
                except Unreachable as exc:
                    codes.append(exc.status)
            if not legs:
                return Unreachable(*_outcome(codes))
            pending.update(legs)
            for leg in legs:
                leg.start()
            return await asyncio.wait_for(won, timeout)
        except TimeoutError:
            return Unreachable(480, "no-answer")
        except Unreachable as exc:
            return exc
        finally:
            self._ringing.subtract(rung)
            winner = won.result()[0] if won.done() and not won.cancelled() and won.exception() is None else None
            for leg in legs:
                if leg is not winner:
                    leg.cancel()

    def connect(self, call: Call, leg: OutboundLeg, resp: SipResponse) -> bool:
        """Bridge ``call``'s caller to a leg :meth:`dial` got answered; False
        (and the leg hung up) when the call ended meanwhile or the media cannot meet."""
        if call.state is CallState.ENDED:
            leg.bye()
            return False
        try:
            answer = self._bridge_media(call, leg, resp.text)
        except SdpNegotiationError as exc:
            logger.warning("call=%s answer from %s unusable: %s", call.id, leg.dialog.remote_target, exc)
            leg.bye()
            return False
        leg.events = self._b_events()
        self._legs[leg.key] = (call, leg)
        self._bridge(call, leg, answer)
        return True

    def _bridge(self, call: Call, leg: OutboundLeg, answer: str) -> None:
        """``call``'s caller now talks to ``leg``: answer the caller if it
        still rings (with ``answer``), start recording, log it."""
        call.b = leg
        call.forks = [leg]
        call.leave_queue(time.time())
        call.state = CallState.ANSWERED
        call.bridged.set_result(None)
        assert call.relay is not None
        call.relay.a.stop_playback()
        if isinstance(call.a, InboundLeg) and call.a.state is not LegState.ANSWERED:
            call.a.answer(answer)
            call.answered_at = time.time()
            self.events.emit("call_answered", call_id=call.id)
        self._record(call)
        by = uri_user(leg.dialog.remote_uri)
        call_event(call.id, "answered", by=by, contact=leg.dialog.remote_target, queue=call.queue, wait=call.wait)

    async def originate(
        self,
        extension: str,
        destination: Destination,
        *,
        caller_id: str,
        timeout: float,
        direction: str,
        call_id: str | None = None,
        party: str | None = None,
    ) -> Call | Unreachable:
        """A call the server places: ring ``extension`` first (showing
        ``caller_id``), and once it answers ring ``destination`` for it, a
        number outside as for ``party`` (see :class:`DialPolicy`). The
        returned call is under way; its ``done`` tells how it ended. Its id is
        ``call_id`` (one handed out before it rang), else a new one."""
        if self.draining:
            logger.info("not calling %s for %s: the server is stopping", extension, destination)
            return Unreachable(503, "unavailable")
        if destination.kind == "external":
            try:
                self.dialing.outbound_trunk(destination, party)
            except DialRefused as exc:  # asked for before the rules or the trunk's load changed
                logger.info("not calling %s for %s: %s", extension, destination, exc)
                return Unreachable(exc.status, "failed")
        call_id = call_id or new_call_id()
        started = time.time()
        codecs = tuple(SdpCodec(name, pt) for name, pt in (("PCMU", 0), ("PCMA", 8)) if name in self.config().rtp.codecs)
        try:
            relay = await RtpRelay.create(self.ports, self.clock, self.events)
        except OSError as exc:
            logger.error("no RTP port to call %s: %s", extension, exc)
            return Unreachable(503, "failed")
        srtp = SrtpSides(self.config().rtp.srtp)
        offer = build_sdp(self.media_ip, relay.a.port, codecs, DTMF_PT, crypto=srtp.offer(relay.a))
        try:
            result = await self.dial([Destination("extension", extension)], caller=caller_id, offer=offer, timeout=timeout)
        except asyncio.CancelledError:  # given up while ringing (the API's DELETE): dial cancelled the legs
            relay.close()
            self._record_unconnected(call_id, direction, extension, destination, "cancelled", started)
            raise
        if isinstance(result, Unreachable):
            relay.close()
            self._record_unconnected(call_id, direction, extension, destination, result.disposition, started)
            return result
        leg, resp = result
        try:
            media = parse_media(resp.text, self.config().rtp.codecs)
            if not media.codecs:
                raise SdpNegotiationError("no audio")
            if not srtp.take_answer(relay.a, media.secure, media.cryptos):
                raise SdpNegotiationError("no usable SRTP answer")
        except SdpNegotiationError as exc:
            logger.warning("%s answered with unusable media: %s", extension, exc)
            leg.bye()
            relay.close()
            self._record_unconnected(call_id, direction, extension, destination, "failed", started, leg.dialog.call_id)
            return Unreachable(488, "failed")
        call = Call(
            id=call_id,
            sip_call_id=leg.dialog.call_id,
            direction=direction,
            caller=extension,
            callee=destination.target,
            a=leg,
            a_media=media,
            relay=relay,
            srtp=srtp,
            a_codec=media.codecs[0],
            started=started,
            answered_at=time.time(),
        )
        relay.a.set_remote(media.addr, _codec(media.codecs[0]), media.dtmf_pt, leg.flow.addr[0])
        call.extensions.add(extension)
        leg.events = self._a_events()
        self.calls[call.id] = call
        self._legs[leg.key] = (call, leg)
        self.events.emit("call_started", call_id=call.id, direction=direction)
        self.events.emit("call_answered", call_id=call.id)
        call_event(
            call.id, "started", direction=direction, **{"from": extension, "to": destination.target}, destination=destination,
            sip_call_id=call.sip_call_id,
        )  # fmt: skip
        call_event(call.id, "answered", by=extension, contact=leg.dialog.remote_target)
        self._run(call, self._go_from_here(call, destination, party))
        return call

    async def _go_from_here(self, call: Call, destination: Destination, party: str | None = None) -> None:
        call.task = asyncio.current_task()
        await self._go(call, destination, party)

    def _extension_legs(self, cfg: Config, caller: str, number: str, offer: str, events: LegEvents) -> list[OutboundLeg]:
        bindings = self.registrar.contacts(number)
        if not bindings:
            logger.info("extension %s has no registered contact", number)
            raise Unreachable(480, "unavailable")
        caller_ext = cfg.extensions.get(caller)
        from_name = caller_ext.name if caller_ext else None
        legs = []
        for binding in bindings:
            try:
                transport = self.stack.transport(binding.transport)
            except LookupError:
                continue
            flow = Flow(transport, binding.source)
            body, fallback = self._leg_offer(flow, offer)
            legs.append(
                OutboundLeg(
                    self.stack,
                    flow,
                    request_uri=binding.contact,
                    from_uri=f"sip:{caller}@{cfg.sip.domain}",
                    to_uri=f"sip:{number}@{cfg.sip.domain}",
                    from_name=from_name,
                    body=body,
                    events=events,
                    fallback_offer=fallback,
                )
            )
        return legs

    async def _trunk_leg(self, cfg: Config, trunk: Trunk, caller: str, number: str, offer: str, events: LegEvents) -> OutboundLeg:
        try:
            flow = await self.stack.flow_to(trunk.host, trunk.port, trunk.transport)
        except (OSError, LookupError, TimeoutError) as exc:
            logger.warning("trunk %s at %s:%d over %s is unreachable: %s", trunk.name, trunk.host, trunk.port, trunk.transport, exc)
            raise Unreachable(503, "failed") from exc
        if self.dialing.trunk_full(trunk):
            # Checked again after the await: calls started meanwhile may have filled it.
            logger.warning("trunk %s has its %d calls up; not dialing %s", trunk.name, trunk.max_calls, number)
            raise Unreachable(503, "failed")
        auth = SipDigestAuth(trunk.register.username, trunk.register.password) if trunk.register else None
        caller_id = trunk.caller_id or caller
        params = f";transport={trunk.transport}" if trunk.transport != "udp" else ""
        body, fallback = self._leg_offer(flow, offer)
        leg = OutboundLeg(
            self.stack,
            flow,
            request_uri=f"sip:{number}@{trunk.host}:{trunk.port}{params}",
            from_uri=f"sip:{caller_id}@{cfg.sip.domain}",
            to_uri=f"sip:{number}@{trunk.host}",
            from_name=None,
            body=body,
            events=events,
            auth=auth,
            fallback_offer=fallback,
        )
        self.dialing.add_leg(trunk, leg)
        return leg

    def _add_fork(self, call: Call, leg: OutboundLeg) -> None:
        call.forks.append(leg)
        self._legs[leg.key] = (call, leg)
        leg.start()

    # --- what the legs tell us ---

    def _a_events(self) -> LegEvents:
        return LegEvents(hangup=self._leg_hung_up, reinvite=self._reinvite, info=self._info)

    def _b_events(self) -> LegEvents:
        return LegEvents(
            progress=self._fork_progress,
            answered=self._fork_answered,
            failed=self._fork_failed,
            hangup=self._leg_hung_up,
            reinvite=self._reinvite,
        )

    def _info(self, leg: Leg, request: SipRequest) -> None:
        """DTMF by SIP INFO (application/dtmf-relay or application/dtmf) for the IVR."""
        call = self._call_of(leg)
        key = info_key(request)
        if call is not None and call.audio is not None and key is not None:
            call.audio.press(key)

    def _call_of(self, leg: Leg) -> Call | None:
        found = self._legs.get(leg.key)
        return found[0] if found else None

    def _fork_progress(self, leg: Leg, resp: SipResponse) -> None:
        call = self._call_of(leg)
        if call is None or call.state is not CallState.RINGING:
            return
        if resp.body and call.early_sdp is None:
            try:
                call.early_sdp = self._bridge_media(call, leg, resp.text)
            except SdpNegotiationError as exc:
                logger.info("call=%s ignoring early media: %s", call.id, exc)
        if not isinstance(call.a, InboundLeg):
            return
        if call.early_sdp is not None:
            call.a.ring(call.early_sdp)
        elif not call.ringing_sent:
            call.a.ring()
        call.ringing_sent = True

    def _fork_answered(self, leg: Leg, resp: SipResponse) -> None:
        call = self._call_of(leg)
        assert isinstance(leg, OutboundLeg)
        if call is None or call.state is not CallState.RINGING:
            leg.bye()
            return
        try:
            answer = self._bridge_media(call, leg, resp.text)
        except SdpNegotiationError as exc:
            logger.warning("call=%s callee's answer unusable: %s", call.id, exc)
            leg.bye()
            self._fork_failed(leg, 488, None)
            return
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        for other in call.forks:
            if other is not leg:
                other.cancel()
                self._legs.pop(other.key, None)
        self._bridge(call, leg, answer)

    def _record(self, call: Call) -> None:
        """Start recording a call just bridged when its queue or one of its extensions asks for it."""
        cfg = self.config()
        queue = cfg.queues.get(call.queue) if call.queue else None
        by_extension = any(ext.record for number in call.extensions if (ext := cfg.extensions.get(number)))
        if self.recorder is None or call.relay is None or call.recording is not None:
            return
        if not (queue is not None and queue.record) and not by_extension:
            return
        self._begin_recording(call)

    def _begin_recording(self, call: Call) -> Recording:
        assert self.recorder is not None and call.relay is not None
        # The customer goes on the left: side a, but side b for calls we placed (callbacks).
        customer, agent = (call.relay.b, call.relay.a) if isinstance(call.a, OutboundLeg) else (call.relay.a, call.relay.b)
        call.recordings += 1
        call.recording = self.recorder.begin(
            call.id,
            customer,
            agent,
            queue=call.queue,
            agent_ext=call.agent,
            caller_id=call.caller,
            callee=call.callee,
            recording_id=call.id if call.recordings == 1 else f"{call.id}-{call.recordings}",
        )
        return call.recording

    def _bridge_media(self, call: Call, leg: Leg, answer_body: str) -> str:
        """Point the relay at both peers (``leg``, which answered, on side b)
        and return the SDP answer for the caller."""
        assert call.relay is not None
        b_media = parse_media(answer_body, self.config().rtp.codecs)
        if not b_media.codecs:
            raise SdpNegotiationError("callee rejected the audio stream")
        chosen = b_media.codecs[0]
        if call.a_codec is None:
            a_codec = answer_codec(call.a_media, chosen)
        else:  # the caller was answered earlier (IVR): its codec is settled
            a_codec = answer_codec(MediaDescription(call.a_media.addr, (call.a_codec,), None, "sendrecv"), chosen)
        if not call.srtp.take_answer(call.relay.b, b_media.secure, b_media.cryptos):
            raise SdpNegotiationError("callee's answer has no usable SRTP key, or is plain RTP while rtp.srtp is mandatory")
        call.a_codec, call.b_codec, call.b_dtmf_pt = a_codec, chosen, b_media.dtmf_pt
        # The signalling IPs: where each peer's RTP may come from when NAT hides its SDP address.
        call.relay.b.set_remote(b_media.addr, _codec(chosen), b_media.dtmf_pt, leg.flow.addr[0])
        call.relay.a.set_remote(call.a_media.addr, _codec(a_codec), call.a_media.dtmf_pt, call.a.flow.addr[0])
        crypto = call.srtp.crypto(call.relay.a)
        return build_sdp(self.media_ip, call.relay.a.port, (a_codec,), call.a_media.dtmf_pt, crypto=crypto)

    def _fork_failed(self, leg: Leg, code: int, resp: SipResponse | None) -> None:
        call = self._call_of(leg)
        if call is None:
            return
        self._legs.pop(leg.key, None)
        if leg in call.forks:
            call.forks.remove(leg)
        call.fork_codes.append(code)
        if call.state is not CallState.RINGING or call.forks:
            return
        if call.b is None and call.direction == "outbound" and code in (401, 407):
            logger.warning("call=%s trunk refused our credentials (%d)", call.id, code)
        status, disposition = _outcome(call.fork_codes)
        self._callee_failed(call, status, disposition)

    def _no_answer(self, call: Call) -> None:
        if call.state is not CallState.RINGING:
            return
        for leg in call.forks:
            leg.cancel()
            self._legs.pop(leg.key, None)
        call.forks = []
        self._callee_failed(call, 480, "no-answer")

    def _callee_failed(self, call: Call, status: int, disposition: str) -> None:
        """Nobody took the call: to the callee's voicemail when busy, not
        answering or not registered and it has a mailbox, else end it."""
        mailbox, call.mailbox = call.mailbox, None
        if mailbox is None or disposition not in ("busy", "no-answer", "unavailable"):
            self._fail_caller(call, status, disposition)
            return
        call_event(call.id, "forwarded", reason=disposition, destination=Destination("voicemail", mailbox))
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        call.extensions.discard(mailbox)
        call.early_sdp = None
        self._run(call, self._go_from_here(call, Destination("voicemail", mailbox)))

    def _cancel(self, request: SipRequest, txn: ServerTransaction) -> None:
        invite_txn = self.stack.server_transaction(transaction_branch(request), "INVITE")
        # The call is the one whose INVITE this CANCEL matches (RFC 3261 §9.2), not
        # the one its Call-ID names: another dialog may reuse that Call-ID.
        call = next((c for c in self.calls.values() if isinstance(c.a, InboundLeg) and c.a.txn is invite_txn), None)
        if invite_txn is None or call is None or not isinstance(call.a, InboundLeg):
            txn.reply(481)
            return
        txn.reply(200)
        if call.state is not CallState.RINGING:
            return
        call.hangup_by = "caller"
        for leg in call.forks:
            leg.cancel()
        call.a.cancelled()
        self._end(call, "cancelled")

    def _leg_hung_up(self, leg: Leg) -> None:
        call = self._call_of(leg)
        if call is None:
            return
        call.hangup_by = call.hangup_by or ("caller" if leg is call.a else "callee")
        self._hang_up_everything(call)
        self._end(call, _hung_up_disposition(call, "abandoned", "cancelled"))

    def _hang_up_everything(self, call: Call, ringing_status: int = 487) -> None:
        if call.state is CallState.RINGING:
            for fork in call.forks:
                fork.cancel()
            _drop(call.a, ringing_status)
        for leg in (call.a, call.b):
            if leg is not None and not leg.ended:
                leg.bye()

    def _reinvite(self, leg: Leg, request: SipRequest, txn: ServerTransaction) -> None:
        """Pass a re-INVITE (hold, unhold, new address) through to the other leg."""
        call = self._call_of(leg)
        if call is not None and call.b is None and leg is call.a and call.relay is not None and call.a_codec is not None:
            self._reinvite_to_us(call, request, txn)
            return
        if call is None or call.b is None or call.relay is None or call.a_codec is None or call.b_codec is None:
            txn.reply(491, "Request Pending")
            return
        from_a = leg is call.a
        this_side, other_side = (call.relay.a, call.relay.b) if from_a else (call.relay.b, call.relay.a)
        this_codec, other_codec = (call.a_codec, call.b_codec) if from_a else (call.b_codec, call.a_codec)
        this_dtmf = call.a_media.dtmf_pt if from_a else call.b_dtmf_pt
        other_dtmf = call.b_dtmf_pt if from_a else call.a_media.dtmf_pt
        other = call.b if from_a else call.a
        direction = self._take_offer(call, request, txn, this_side, this_codec, this_dtmf)
        if direction is None:
            return

        def answered(resp: SipResponse) -> None:
            if resp.status_code >= 300:
                txn.reply(resp.status_code, resp.reason_phrase)
                return
            answer_direction = direction
            if resp.body:
                try:
                    media = parse_media(resp.text, self.config().rtp.codecs)
                    answer_direction = media.direction
                    other_side.set_remote(media.addr, _codec(other_codec), other_dtmf)
                    if not call.srtp.take_answer(other_side, media.secure, media.cryptos):
                        logger.warning("call=%s re-INVITE answer has no usable SRTP key; keeping the old one", call.id)
                except SdpNegotiationError:
                    pass
            body = build_sdp(
                self.media_ip, this_side.port, (this_codec,), this_dtmf, answer_direction, crypto=call.srtp.crypto(this_side)
            )
            leg.answer_reinvite(txn, body)

        offer = build_sdp(self.media_ip, other_side.port, (other_codec,), other_dtmf, direction, crypto=call.srtp.crypto(other_side))
        other.reinvite(offer, answered)

    def _take_offer(
        self, call: Call, request: SipRequest, txn: ServerTransaction, side: RelaySide, codec: SdpCodec, dtmf_pt: int | None
    ) -> str | None:
        """Point ``side`` at a re-INVITE's offer (and its SRTP key) and return
        the offered direction ("sendrecv" without SDP); None once an unusable
        offer got 488."""
        if not request.body:
            return "sendrecv"
        try:
            offer = parse_media(request.text, self.config().rtp.codecs)
        except SdpNegotiationError:
            txn.reply(488)
            return None
        if not call.srtp.take_offer(side, offer.secure, offer.cryptos):
            txn.reply(488)
            return None
        side.set_remote(offer.addr, _codec(codec), dtmf_pt)
        return offer.direction

    def _reinvite_to_us(self, call: Call, request: SipRequest, txn: ServerTransaction) -> None:
        """A re-INVITE from a caller talking to the server itself (the IVR)."""
        assert call.relay is not None and call.a_codec is not None
        offered = self._take_offer(call, request, txn, call.relay.a, call.a_codec, call.a_media.dtmf_pt)
        if offered is None:
            return
        direction = reverse_direction(offered)
        crypto = call.srtp.crypto(call.relay.a)
        body = build_sdp(self.media_ip, call.relay.a.port, (call.a_codec,), call.a_media.dtmf_pt, direction, crypto=crypto)
        call.a.answer_reinvite(txn, body)

    # --- the end of a call ---

    def _end(self, call: Call, disposition: str) -> None:
        if call.state is CallState.ENDED:
            return
        if disposition not in DISPOSITIONS:
            logger.error("call=%s ended with unknown disposition %r; recorded as failed", call.id, disposition)
            disposition = "failed"
        call.state = CallState.ENDED
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        ended = time.time()
        for leg in [call.a, *call.forks]:
            self._legs.pop(leg.key, None)
        self.calls.pop(call.id, None)
        if not call.done.done():
            call.done.set_result(disposition)
        if call.relay is not None:
            call.relay.close()
            self.events.emit("rtp_relayed", packets=call.relay.total().relayed)
            for side in (call.relay.a, call.relay.b):
                # One quality estimate per leg whose peer sent us RTP.
                report = side.stats.report()
                if report.received:
                    codec = side.codec.name if side.codec is not None else "PCMU"
                    mos = estimate_mos(codec, report.loss_fraction, report.jitter_ms)
                    call_event(
                        call.id, "leg_quality", leg=side.name, codec=codec, packets=report.received,
                        lost=report.lost, jitter_ms=report.jitter_ms, mos=f"{mos:.2f}",
                    )  # fmt: skip
                    self.events.emit(
                        "leg_quality", call_id=call.id, leg=side.name, codec=codec, received=report.received,
                        lost=report.lost, jitter_ms=report.jitter_ms, mos=mos,
                    )  # fmt: skip
        if call.recording is not None and self.recorder is not None:
            self._tasks.spawn(self.recorder.end(call.recording))
        call.leave_queue(ended)
        self.events.emit("call_ended", call_id=call.id, direction=call.direction, disposition=disposition)
        row = _cdr_row(
            call.id, call.direction, call.caller, call.callee, disposition,
            started=call.started, answered=call.answered_at, ended=ended, queue=call.queue, agent=call.agent, wait=call.wait,
            sip_call_id=call.sip_call_id,
        )  # fmt: skip
        self._tasks.spawn(self._write_cdr(row, call.hangup_by))

    async def _write_cdr(self, row: dict[str, Any], hangup_by: str | None = None) -> None:
        """Store the call's one CDR row, then log its ``ended`` event: whoever
        reads the line finds the row. Inserted, never upserted: the id is
        the server's own and new, so no row is ever replaced."""
        await self.store.insert("cdr", row)
        call_event(
            row["call_id"], "ended", disposition=row["disposition"], direction=row["direction"],
            **{"from": row["from_number"], "to": row["to_number"]}, duration=row["duration"], billsec=row["billsec"],
            queue=row["queue"], agent=row["agent"], wait=row["wait"], hangup=hangup_by,
        )  # fmt: skip

    def _record_unconnected(
        self,
        call_id: str,
        direction: str,
        extension: str,
        destination: Destination,
        disposition: str,
        started: float,
        sip_call_id: str | None = None,
    ) -> None:
        """The CDR row of a call the server placed that never got going (the
        first phone did not answer): it has no Call, yet it rang someone."""
        call_event(call_id, "started", direction=direction, **{"from": extension, "to": destination.target}, destination=destination)
        self.events.emit("call_started", call_id=call_id, direction=direction)
        self.events.emit("call_ended", call_id=call_id, direction=direction, disposition=disposition)
        row = _cdr_row(
            call_id, direction, extension, destination.target, disposition, started=started, answered=None, ended=time.time(),
            sip_call_id=sip_call_id,
        )  # fmt: skip
        self._tasks.spawn(self._write_cdr(row))


def _cdr_row(
    call_id: str,
    direction: str,
    caller: str,
    callee: str,
    disposition: str,
    *,
    started: float,
    answered: float | None,
    ended: float,
    queue: str | None = None,
    agent: str | None = None,
    wait: float | None = None,
    sip_call_id: str | None = None,
) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "direction": direction,
        "from_number": caller,
        "to_number": callee,
        "started": iso_time(started),
        "answered": iso_time(answered) if answered else None,
        "ended": iso_time(ended),
        "disposition": disposition,
        "duration": round(ended - started, 3),
        "billsec": round(ended - answered, 3) if answered else 0.0,
        "queue": queue,
        "agent": agent,
        "wait": round(wait, 3) if wait is not None else None,
        "sip_call_id": sip_call_id or None,
    }


def _hung_up_disposition(call: Call, queued: str, unanswered: str) -> str:
    """How ``call`` ends when it is hung up now: ``queued`` while in a queue,
    voicemail while leaving a message, answered once answered, else ``unanswered``."""
    if call.state is CallState.QUEUED:
        return queued
    if call.voicemail is not None:
        return "voicemail"
    return "answered" if call.answered_at else unanswered


def _drop(leg: Leg, status: int) -> None:
    """Hang up a leg whatever its state: BYE once answered, else a final
    ``status`` (a caller's INVITE) or CANCEL (a leg we are ringing)."""
    if leg.state is LegState.ANSWERED:
        leg.bye()
    elif isinstance(leg, InboundLeg):
        leg.reject(status)
    elif isinstance(leg, OutboundLeg):
        leg.cancel()


def _outcome(codes: list[int]) -> tuple[int, str]:
    """The status for the caller when every fork failed, and the CDR disposition."""
    if any(code in (486, 600) for code in codes):
        return 486, "busy"
    if any(code in (603,) for code in codes):
        return 603, "rejected"
    if all(code in (408, 480, 487) for code in codes):
        return 480, "no-answer"
    return (min(codes) if codes else 480), "failed"


def info_key(request: SipRequest) -> str | None:
    """The key a SIP INFO carries (application/dtmf-relay or application/dtmf), if any."""
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    text = request.text.strip()
    if content_type == "application/dtmf-relay":
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == "signal":
                text = value.strip()
                break
        else:
            return None
    elif content_type != "application/dtmf":
        return None
    key = {"10": "*", "11": "#"}.get(text, text)
    return key if len(key) == 1 and key in "0123456789*#ABCD" else None


def _codec(codec: SdpCodec) -> Codec:
    return Codec(codec.name, codec.payload_type, codec.clock_rate)


def _user_of(header: str | None) -> str | None:
    if not header:
        return None
    try:
        return parse_address(header).uri.user
    except (ValueError, IndexError):
        return None
