"""Calls through the server (a back-to-back user agent).

A call has one inbound leg (the caller's dialog with us) and, while it rings,
one outbound leg per registered contact of the callee (or one to a trunk). The
first outbound leg to answer is bridged through an RTP relay; the others get
CANCEL. Every call ends with one CDR row.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiosipua import SdpNegotiationError, SipDigestAuth, SipRequest, SipResponse, parse_address, parse_uri

from pbx.config import Config, Destination, Trunk
from pbx.events import EventBus
from pbx.ivr.audio import CallAudio
from pbx.ivr.engine import IvrSession
from pbx.ivr.schema import Flow as IvrFlow
from pbx.media.clock import MediaClock
from pbx.media.codecs import Codec
from pbx.media.prompts import PromptLibrary
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RelaySide, RtpRelay
from pbx.sip.auth import AddressGuard, AuthStatus, DigestAuthenticator
from pbx.sip.dialog import ALLOW, InboundLeg, Leg, LegEvents, LegState, OutboundLeg
from pbx.sip.messages import make_response
from pbx.sip.registrar import Registrar
from pbx.sip.sdp import (
    DTMF_PT,
    MediaDescription,
    SdpCodec,
    answer_codec,
    build_sdp,
    offer_codecs,
    parse_media,
    reverse_direction,
)
from pbx.sip.stack import Flow, ServerTransaction, SipStack
from pbx.store.db import Store

logger = logging.getLogger(__name__)

ALLOW_OUT_OF_DIALOG = f"{ALLOW}, REGISTER"


class CallState(enum.Enum):
    RINGING = "ringing"
    IVR = "ivr"
    ANSWERED = "answered"
    ENDED = "ended"


@dataclass
class Call:
    """One call: the caller's leg, the callee's forks, and the media between them."""

    id: str
    direction: str  # internal | inbound | outbound
    caller: str
    callee: str
    a: InboundLeg
    a_media: MediaDescription
    relay: RtpRelay | None = None
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
        self.calls: dict[str, Call] = {}
        self._legs: dict[tuple[str, str], tuple[Call, Leg]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- entry points ---

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
        elif method == "INVITE":
            self._new_call(request, flow, txn)
        elif method == "OPTIONS":
            txn.reply(200, headers={"Allow": ALLOW_OUT_OF_DIALOG, "Accept": "application/sdp"})
        elif method == "SUBSCRIBE":
            txn.reply(489, "Bad Event")
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
        for call in list(self.calls.values()):
            self._hang_up_everything(call, ringing_status=503)
            self._end(call, "failed" if call.state is CallState.RINGING else "answered")
        # Let CDR writes finish; anything still connecting after that is abandoned.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- a new INVITE ---

    def _new_call(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        cfg = self.config()
        ip = flow.addr[0]
        called = _user(request.uri) or ""
        trunk = cfg.trunk_for_source(ip)
        if trunk is not None:
            destination = cfg.inbound.get(called)
            caller = _user_of(request.headers.get_first("from")) or "anonymous"
            direction = "inbound"
            if destination is None:
                logger.info("trunk %s called %s, which is not in `inbound`: 404", trunk.name, called)
                txn.reply(404)
                return
        else:
            caller_ext = self._authenticate(request, ip, txn)
            if caller_ext is None:
                return
            caller = caller_ext
            destination = self._route_dialed(cfg, called)
            if destination is None:
                logger.info("%s dialed %s: no extension, inbound number or outbound rule matches", caller, called)
                txn.reply(404)
                return
            direction = "outbound" if destination.kind == "external" else "internal"
        try:
            a_media = parse_media(request.text, cfg.rtp.codecs)
        except SdpNegotiationError as exc:
            logger.info("call from %s refused: %s", caller, exc)
            txn.reply(488)
            return
        call = Call(
            id=request.call_id or "",
            direction=direction,
            caller=caller,
            callee=called,
            a=InboundLeg(self.stack, flow, request, txn, self._a_events()),
            a_media=a_media,
        )
        call.a.on_ack_timeout = lambda leg: self._leg_hung_up(leg)
        self.calls[call.id] = call
        self._legs[call.a.key] = (call, call.a)
        self.events.emit("call_started", call_id=call.id, direction=direction)
        logger.info("call %s: %s -> %s (%s)", call.id, caller, destination, direction)
        self._spawn(self._connect(call, destination))

    def _authenticate(self, request: SipRequest, ip: str, txn: ServerTransaction) -> str | None:
        """The extension an INVITE comes from, or None once it has been answered with 401/403."""
        cfg = self.config()

        def password_for(user: str) -> str | None:
            ext = cfg.extensions.get(user)
            return ext.password if ext else None

        result = self.authenticator.verify(request, ip, password_for)
        if result.ok:
            return result.username
        if result.status is AuthStatus.FAILED:
            logger.warning("INVITE from %s: authentication failed (%s)", ip, result.reason)
            self.events.emit("auth_failure", ip=ip, extension=result.username or "")
            self.guard.record_failure(ip)
            txn.reply(403)
            return None
        txn.respond(_challenge(txn, self.authenticator.challenge_headers(ip, stale=result.status is AuthStatus.STALE)))
        return None

    def _route_dialed(self, cfg: Config, number: str) -> Destination | None:
        if number in cfg.extensions:
            return Destination("extension", number)
        if number in cfg.inbound:
            return cfg.inbound[number]
        features = cfg.features
        if number in (features.voicemail_main, features.agent_login, features.agent_pause):
            return Destination("feature", number)
        trunk = cfg.route_outbound(number)
        if trunk is not None:
            return Destination("external", number, trunk.name)
        return None

    async def _connect(self, call: Call, destination: Destination) -> None:
        call.task = asyncio.current_task()
        try:
            call.relay = await RtpRelay.create(self.ports, self.clock)
        except OSError as exc:
            logger.error("call %s: no RTP port: %s", call.id, exc)
            self._fail_caller(call, 503, "failed")
            return
        if call.state is CallState.ENDED:  # the caller cancelled meanwhile
            call.relay.close()
            return
        await self._go(call, destination)

    def _available(self, destination: Destination) -> bool:
        """Whether this server can take a call to ``destination`` now."""
        if destination.kind == "ivr":
            return destination.target in self.flows()
        return destination.kind in ("extension", "external", "hangup")

    async def _go(self, call: Call, destination: Destination) -> None:
        """Send the call where ``destination`` says."""
        cfg = self.config()
        assert call.relay is not None
        if destination.kind == "hangup":
            self._fail_caller(call, 603, "rejected")
            return
        if not self._available(destination):
            logger.warning("call %s: destination %s is not available yet; answering 503", call.id, destination)
            self._fail_caller(call, 503, "failed")
            return
        if destination.kind == "ivr":
            await self._run_ivr(call, destination.target)
            return
        offer = build_sdp(self.media_ip, call.relay.b.port, self._offer_codecs(call), DTMF_PT)
        if destination.kind == "extension":
            self._ring_extension(call, cfg, destination.target, offer)
        else:
            trunk = cfg.trunks[destination.trunk] if destination.trunk else next(iter(cfg.trunks.values()))
            await self._dial_trunk(call, cfg, trunk, destination.target, offer)
        if call.state is CallState.RINGING and call.forks:
            call.ring_timer = asyncio.get_running_loop().call_later(cfg.sip.ring_timeout, self._no_answer, call)

    def _offer_codecs(self, call: Call) -> tuple[SdpCodec, ...]:
        """Codecs for the callee: the caller's offer, or once the caller is
        answered (by the IVR) its codec and what we can transcode it to."""
        supported = self.config().rtp.codecs
        if call.a_codec is None:
            return offer_codecs(call.a_media, supported)
        fixed = MediaDescription(call.a_media.addr, (call.a_codec,), call.a_media.dtmf_pt, "sendrecv")
        return offer_codecs(fixed, supported)

    async def _run_ivr(self, call: Call, flow: str) -> None:
        """Answer the caller ourselves and walk it through ``flow``."""
        assert call.relay is not None
        cfg = self.config()
        codec = call.a_media.codecs[0]
        call.a_codec = codec
        call.relay.a.set_remote(call.a_media.addr, _codec(codec), call.a_media.dtmf_pt)
        if call.a.state is not LegState.ANSWERED:
            call.a.answer(build_sdp(self.media_ip, call.relay.a.port, (codec,), call.a_media.dtmf_pt))
            call.answered_at = time.time()
            self.events.emit("call_answered", call_id=call.id)
        call.state = CallState.IVR
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
        logger.info("call %s: flow %s sends the caller to %s", call.id, flow, destination)
        if destination.kind == "hangup":
            call.a.bye()
            self._end(call, "answered")
            return
        call.state = CallState.RINGING
        await self._go(call, destination)

    def _fail_caller(self, call: Call, status: int, disposition: str) -> None:
        """End the call for the caller: a final error before we answered, BYE after."""
        if call.a.state is LegState.ANSWERED:
            call.a.bye()
        else:
            call.a.reject(status)
        self._end(call, disposition)

    def _ring_extension(self, call: Call, cfg: Config, number: str, offer: str) -> None:
        bindings = self.registrar.contacts(number)
        if not bindings:
            logger.info("call %s: extension %s has no registered contact: 480", call.id, number)
            self._fail_caller(call, 480, "unavailable")
            return
        caller_ext = cfg.extensions.get(call.caller)
        from_name = caller_ext.name if caller_ext else None
        for binding in bindings:
            try:
                transport = self.stack.transport(binding.transport)
            except LookupError:
                continue
            leg = OutboundLeg(
                self.stack,
                Flow(transport, binding.source),
                request_uri=binding.contact,
                from_uri=f"sip:{call.caller}@{cfg.sip.domain}",
                to_uri=f"sip:{number}@{cfg.sip.domain}",
                from_name=from_name,
                body=offer,
                events=self._b_events(),
            )
            self._add_fork(call, leg)

    async def _dial_trunk(self, call: Call, cfg: Config, trunk: Trunk, number: str, offer: str) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(trunk.host, trunk.port, type=socket.SOCK_DGRAM)
            addr = (str(infos[0][4][0]), int(infos[0][4][1]))
        except OSError as exc:
            logger.warning("call %s: trunk %s host %s does not resolve: %s", call.id, trunk.name, trunk.host, exc)
            self._fail_caller(call, 503, "failed")
            return
        if call.state is CallState.ENDED:
            return
        auth = SipDigestAuth(trunk.register.username, trunk.register.password) if trunk.register else None
        caller_id = trunk.caller_id or call.caller
        leg = OutboundLeg(
            self.stack,
            Flow(self.stack.transport("udp"), addr),
            request_uri=f"sip:{number}@{trunk.host}:{trunk.port}",
            from_uri=f"sip:{caller_id}@{cfg.sip.domain}",
            to_uri=f"sip:{number}@{trunk.host}",
            from_name=None,
            body=offer,
            events=self._b_events(),
            auth=auth,
        )
        self._add_fork(call, leg)

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
                call.early_sdp = self._bridge_media(call, resp.text)
            except SdpNegotiationError as exc:
                logger.info("call %s: ignoring early media: %s", call.id, exc)
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
            answer = self._bridge_media(call, resp.text)
        except SdpNegotiationError as exc:
            logger.warning("call %s: callee's answer unusable: %s", call.id, exc)
            leg.bye()
            self._fork_failed(leg, 488, None)
            return
        call.b = leg
        call.state = CallState.ANSWERED
        call.answered_at = call.answered_at or time.time()
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        for other in call.forks:
            if other is not leg:
                other.cancel()
                self._legs.pop(other.key, None)
        call.forks = [leg]
        if call.a.state is LegState.ANSWERED:
            call.relay.a.stop_playback()  # type: ignore[union-attr]
        else:
            call.a.answer(answer)
            self.events.emit("call_answered", call_id=call.id)
        logger.info("call %s answered by %s", call.id, leg.dialog.remote_target)

    def _bridge_media(self, call: Call, answer_body: str) -> str:
        """Point the relay at both peers and return the SDP answer for the caller."""
        assert call.relay is not None
        b_media = parse_media(answer_body, self.config().rtp.codecs)
        if not b_media.codecs:
            raise SdpNegotiationError("callee rejected the audio stream")
        chosen = b_media.codecs[0]
        if call.a_codec is None:
            a_codec = answer_codec(call.a_media, chosen)
        else:  # the caller was answered earlier (IVR): its codec is settled
            a_codec = answer_codec(MediaDescription(call.a_media.addr, (call.a_codec,), None, "sendrecv"), chosen)
        call.a_codec, call.b_codec, call.b_dtmf_pt = a_codec, chosen, b_media.dtmf_pt
        call.relay.b.set_remote(b_media.addr, _codec(chosen), b_media.dtmf_pt)
        call.relay.a.set_remote(call.a_media.addr, _codec(a_codec), call.a_media.dtmf_pt)
        return build_sdp(self.media_ip, call.relay.a.port, (a_codec,), call.a_media.dtmf_pt)

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
            logger.warning("call %s: trunk refused our credentials (%d)", call.id, code)
        status, disposition = _outcome(call.fork_codes)
        self._fail_caller(call, status, disposition)

    def _no_answer(self, call: Call) -> None:
        if call.state is not CallState.RINGING:
            return
        logger.info("call %s: no answer after %d s", call.id, self.config().sip.ring_timeout)
        for leg in call.forks:
            leg.cancel()
        self._fail_caller(call, 480, "no-answer")

    def _cancel(self, request: SipRequest, txn: ServerTransaction) -> None:
        branch = request.via[0].branch or ""
        invite_txn = self.stack.server_transaction(branch, "INVITE")
        call = self.calls.get(request.call_id or "")
        if invite_txn is None or call is None or call.a.txn is not invite_txn:
            txn.reply(481)
            return
        txn.reply(200)
        if call.state is not CallState.RINGING:
            return
        logger.info("call %s: caller cancelled", call.id)
        for leg in call.forks:
            leg.cancel()
        call.a.cancelled()
        self._end(call, "cancelled")

    def _leg_hung_up(self, leg: Leg) -> None:
        call = self._call_of(leg)
        if call is None:
            return
        logger.info("call %s: %s hung up", call.id, "caller" if leg is call.a else "callee")
        self._hang_up_everything(call)
        self._end(call, "answered" if call.answered_at else "cancelled")

    def _hang_up_everything(self, call: Call, ringing_status: int = 487) -> None:
        if call.state is CallState.RINGING:
            for fork in call.forks:
                fork.cancel()
            call.a.reject(ringing_status)
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
        direction = self._take_offer(request, txn, this_side, this_codec, this_dtmf)
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
                except SdpNegotiationError:
                    pass
            leg.answer_reinvite(txn, build_sdp(self.media_ip, this_side.port, (this_codec,), this_dtmf, answer_direction))

        other.reinvite(build_sdp(self.media_ip, other_side.port, (other_codec,), other_dtmf, direction), answered)

    def _take_offer(
        self, request: SipRequest, txn: ServerTransaction, side: RelaySide, codec: SdpCodec, dtmf_pt: int | None
    ) -> str | None:
        """Point ``side`` at a re-INVITE's offer and return the offered direction
        ("sendrecv" without SDP); None once an unusable offer got 488."""
        if not request.body:
            return "sendrecv"
        try:
            offer = parse_media(request.text, self.config().rtp.codecs)
        except SdpNegotiationError:
            txn.reply(488)
            return None
        side.set_remote(offer.addr, _codec(codec), dtmf_pt)
        return offer.direction

    def _reinvite_to_us(self, call: Call, request: SipRequest, txn: ServerTransaction) -> None:
        """A re-INVITE from a caller talking to the server itself (the IVR)."""
        assert call.relay is not None and call.a_codec is not None
        offered = self._take_offer(request, txn, call.relay.a, call.a_codec, call.a_media.dtmf_pt)
        if offered is None:
            return
        direction = reverse_direction(offered)
        body = build_sdp(self.media_ip, call.relay.a.port, (call.a_codec,), call.a_media.dtmf_pt, direction)
        call.a.answer_reinvite(txn, body)

    # --- the end of a call ---

    def _end(self, call: Call, disposition: str) -> None:
        if call.state is CallState.ENDED:
            return
        call.state = CallState.ENDED
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        ended = time.time()
        for leg in [call.a, *call.forks]:
            self._legs.pop(leg.key, None)
        self.calls.pop(call.id, None)
        if call.relay is not None:
            call.relay.close()
            self.events.emit("rtp_relayed", packets=call.relay.total().relayed)
        duration = ended - call.started
        billsec = ended - call.answered_at if call.answered_at else 0.0
        self.events.emit("call_ended", call_id=call.id, direction=call.direction, disposition=disposition)
        row = {
            "call_id": call.id,
            "direction": call.direction,
            "from_number": call.caller,
            "to_number": call.callee,
            "started": _iso(call.started),
            "answered": _iso(call.answered_at) if call.answered_at else None,
            "ended": _iso(ended),
            "disposition": disposition,
            "duration": round(duration, 3),
            "billsec": round(billsec, 3),
        }
        self._spawn(self._record(row))

    async def _record(self, row: dict[str, Any]) -> None:
        await self.store.upsert("cdr", row)
        logger.info("call %s ended: %s after %.1f s", row["call_id"], row["disposition"], row["duration"])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("call task failed", exc_info=task.exception())


def _outcome(codes: list[int]) -> tuple[int, str]:
    """The status for the caller when every fork failed, and the CDR disposition."""
    if any(code in (486, 600) for code in codes):
        return 486, "busy"
    if any(code in (603,) for code in codes):
        return 603, "rejected"
    if all(code in (408, 480, 487) for code in codes):
        return 480, "no-answer"
    return (min(codes) if codes else 480), "failed"


def _challenge(txn: ServerTransaction, challenges: list[str]) -> SipResponse:
    response = make_response(txn.request, 401, to_tag=txn.to_tag)
    for value in challenges:
        response.headers.append("WWW-Authenticate", value)
    return response


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


def _user(uri: str) -> str | None:
    try:
        return parse_uri(uri).user
    except (ValueError, IndexError):
        return None


def _user_of(header: str | None) -> str | None:
    if not header:
        return None
    try:
        return parse_address(header).uri.user
    except (ValueError, IndexError):
        return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
