"""The call service: every request that is not a REGISTER, turned into calls.

An INVITE becomes a :class:`~pbx.calls.model.Call` (:meth:`CallService.handle_request`),
which goes where its destination says (:meth:`CallService._go`): ringing an
extension or a number outside through the dialer, or answered here by an IVR
flow, a queue, voicemail or a feature code. What the legs report (progress,
answer, failure, hang-up) comes back here, what they bring mid-call goes to
pbx.calls.midcall, and a call ends here (:meth:`CallService._end`) with its
CDR row. This module is the only one that moves a call between states; the
call's media is its bridge's (pbx.calls.bridge), its recording
pbx.calls.recording's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp
from aiosipua import SdpNegotiationError, SipRequest, SipResponse

from pbx.calls.admission import Admission
from pbx.calls.answering import Answering, Briefing
from pbx.calls.bridge import Bridge
from pbx.calls.cdr import row_of, unconnected_row
from pbx.calls.dialer import Dialer
from pbx.calls.feature_keys import FeatureKeys
from pbx.calls.callees import Callees
from pbx.calls.forks import Forks
from pbx.calls.forwarding import Forwarding
from pbx.calls.groups import RingGroups
from pbx.calls.journal import CallJournal
from pbx.calls.midcall import MidCall
from pbx.calls.model import DISPOSITIONS, Answered, Call, CallState, Unreachable, call_event, new_call_id
from pbx.calls.monitor import MONITOR, Monitors
from pbx.calls.moves import Moves
from pbx.calls.park import Parking
from pbx.calls.recording import CallRecording
from pbx.calls.replaces import Replacing
from pbx.calls.routing import DialPolicy, DialRefused, asked_destination
from pbx.calls.settings import PhoneSettings
from pbx.calls.survey import Survey
from pbx.calls.transfer import Transfers
from pbx.calls.watchdog import Watchdog
from pbx.config.model import Config, Destination
from pbx.errors import BadRequest
from pbx.events import EventBus
from pbx.ivr.nodes import Flow as IvrFlow
from pbx.media.clock import MediaClock
from pbx.media.ports import RtpPortPool
from pbx.media.prompts import PromptLibrary
from pbx.media.srtp import SrtpSides
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.sip.dialog import DIALOG_METHODS, InboundLeg, Leg, LegState
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.messages import uri_user
from pbx.sip.methods import allow_header, refuse
from pbx.sip.registrar import Registrar
from pbx.sip.sdp import SdpCodec, parse_media
from pbx.sip.stack import SipStack, transaction_branch
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow
from pbx.store.db import Store
from pbx.tasks import Background

logger = logging.getLogger(__name__)

# Outside dialogs the server also takes REGISTER and SUBSCRIBE (pbx.app routes them).
ALLOW_OUT_OF_DIALOG = allow_header([*DIALOG_METHODS, "REGISTER", "SUBSCRIBE"])


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
        self.stack = stack
        self.ports = ports
        self.store = store
        self.events = events
        self.media_ip = media_ip
        self.answering = Answering(
            config=config, flows=flows, prompts=prompts, http=http, events=events, answer=self.answer, go=self._go, hang_up=self.hang_up
        )
        self.recording = CallRecording(config)
        self.journal = CallJournal(store, events)
        self.calls: dict[str, Call] = {}
        self._legs: dict[tuple[str, str], tuple[Call, Leg]] = {}
        self.dialing = DialPolicy(config, events, self.calls_of)  # outbound rules, class of service, max_calls
        self.forwarding = Forwarding(config, PhoneSettings(store), self.dialing, self.answering.available)
        self.answering.settings = self.forwarding
        self.admission = Admission(config, authenticator, guard, registrar, events, self.dialing)
        self.dialer = Dialer(config, stack, registrar, self.dialing, ports=ports, clock=clock, events=events, media_ip=media_ip)
        self.watchdog = Watchdog(config, self.calls, self.hang_up)
        self.midcall = MidCall(self._legs, self.dialer.unclaimed, self._leg_hung_up, self.watchdog.time_out, lambda *refer: self.transfers.refer(*refer))
        self.forks = Forks(config, self.dialer, self._legs, lambda: self.midcall.leg_events(self.forks), self._bridged, self._callee_failed)
        groups = RingGroups(config, self.forwarding)
        self.callees = Callees(self.forwarding, groups, forks=self.forks, go=self._go, fail=self._fail_caller, run=self._run)
        self._tasks = Background("call")
        self.monitors = Monitors(self, config, self._tasks.spawn)  # supervisors listening in
        self.moves = Moves(config, self.calls, self._legs, self.journal, self.events, end=self._end, bridged=self._bridged)
        self.survey = Survey(config, self._legs, self.recording, self.answering, run=self._run, spawn=self._tasks.spawn)
        self.transfers = Transfers(config, self.moves, self.dialing, self.answering.available, self._go, self._run, self._tasks.spawn, self.hang_up)
        self.feature_keys = FeatureKeys(self.transfers, prompts, self)  # ## and *2 in a bridged call
        self.replacing = Replacing(config, self.admission, self.moves, stack, self.midcall.leg_events, self.hang_up)  # RFC 3891
        self.answering.parking = self.transfers.parking = Parking(self.moves, self.dialer.states, prompts, self.answer, self._go, self._run)
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
            self.midcall.in_dialog(request, txn, to_tag)
        elif method == "INVITE" and self._drain_until is not None:
            retry = max(1, math.ceil(self._drain_until - asyncio.get_running_loop().time()))
            call_event(request.call_id or "", "refused", status=503, reason="draining", retry_after=retry)
            txn.reply(503, headers={"Retry-After": str(retry)})
        elif method == "INVITE" and request.headers.get_first("replaces"):
            self.replacing.invite(request, flow, txn)  # RFC 3891
        elif method == "INVITE":
            self._new_call(request, flow, txn)
        elif method == "OPTIONS":
            txn.reply(200, headers={"Allow": ALLOW_OUT_OF_DIALOG, "Accept": "application/sdp"})
        elif method in ("BYE", "INFO", "UPDATE", "PRACK", "NOTIFY"):
            txn.reply(481)
        elif method != "ACK":
            refuse(txn, ALLOW_OUT_OF_DIALOG)

    async def stop(self) -> None:
        """Hang up every call in progress (BYE, CANCEL, 503 to a caller still
        ringing), each with its CDR row; then let the rows and recordings finish."""
        self.drain(0)
        await self.watchdog.stop()
        for call in list(self.calls.values()):
            self.hang_up(call, ringing_status=503)
        # Let recordings finish (the journal finishes the rows); anything still connecting after that is abandoned.
        await self._tasks.close(grace=5)

    # --- a new INVITE ---

    def _new_call(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        admitted = self.admission.admit(request, flow.addr[0], txn, self.calls.values())
        if admitted is None:
            return
        cfg = self.config()
        caller, called, destination, direction, trunk = admitted
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
        a = InboundLeg(self.stack, flow, request, txn, self.midcall.leg_events(), session_expires=cfg.sip.session_expires)
        brief = a.timer.too_brief(request)
        if brief is not None:  # RFC 4028 §9: it may ask again with our Min-SE
            call_event(request.call_id or "", "refused", status=422, reason=f"interval < {brief} s", **{"from": caller, "to": called})
            a.reject(422, headers={"Min-SE": str(brief)})
            return
        bridge = Bridge(a_media, srtp, self.media_ip, cfg.rtp.codecs, music=self.dialer.music)
        call = Call(
            id=new_call_id(), direction=direction, caller=caller, callee=called, a=a, bridge=bridge, sip_call_id=request.call_id or ""
        )
        if direction != "inbound":
            call.extensions.add(caller)
            self.dialer.states.track(a, caller, "initiator", called)
        self.calls[call.id] = call
        self._legs[call.a.key] = (call, call.a)
        self.events.emit("call_started", call_id=call.id, direction=direction, from_=caller, to=called)
        fields = {"direction": direction, "from": caller, "to": called, "destination": destination}
        call_event(call.id, "started", **fields, trunk=trunk.name if trunk else None, sip_call_id=call.sip_call_id)
        opened = self.journal.open(call)
        # A number the extension dialed is dialed on its behalf (its class of service).
        self._run(call, self._connect(call, opened, destination, party=caller if direction == "outbound" else None))

    def _run(self, call: Call, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as the call's own task (ended with the call); if it fails the call ends
        (``failed``; a caller still ringing gets 500) instead of staying up
        with nobody to end it."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                logger.exception("call=%s failed", call.id)
                if not call.ended:
                    self.hang_up(call, "failed", ringing_status=500)

        call.task = self._tasks.spawn(guarded())

    def calls_of(self, extension: str) -> int:
        """The calls ``extension`` is in now, being rung for one included (its ``max_calls`` counts them)."""
        return self.dialer.ringing[extension] + sum(1 for call in self.calls.values() if extension in call.extensions)

    def extension_dnd(self, extension: str) -> bool:
        """Whether ``extension`` is in do-not-disturb (queue agents are not offered calls then)."""
        return self.forwarding.dnd(extension)

    def extension_busy(self, extension: str) -> bool:
        """Whether ``extension`` is on a call or being rung (queue agents are never rung then)."""
        return self.calls_of(extension) > 0

    # --- where a call goes ---

    async def _connect(self, call: Call, opened: asyncio.Future[None], destination: Destination, party: str | None = None) -> None:
        await asyncio.shield(opened)  # the call's row is stored before its caller hears 180 or 200
        try:
            relay = await call.bridge.open(self.ports, self.clock, self.events)
        except OSError as exc:
            logger.error("call=%s no RTP port: %s", call.id, exc)
            self._fail_caller(call, 503, "failed")
            return
        if call.ended:  # the caller cancelled meanwhile
            relay.close()
            return
        bridge = call.bridge
        bridge.srtp.take_offer(relay.a, bridge.a_media.secure, bridge.a_media.cryptos)  # checked by _new_call
        await self._go(call, destination, party)

    def destination_for(self, text: str, party: str, *, src: str = "-") -> Destination:
        """Where ``text`` leads when extension ``party`` asks for it
        (click-to-call; see :func:`asked_destination`). BadRequest says why
        it leads nowhere; DialRefused when ``party`` may not dial that number
        or its trunk is full (events from ``src``)."""
        destination = asked_destination(self.config(), text)
        if destination.kind == "external":
            self.dialing.outbound_trunk(destination, party, src=src)
        elif not self.answering.available(destination):
            raise BadRequest(f"{destination} does not exist")
        return destination

    async def _go(self, call: Call, destination: Destination, party: str | None = None) -> None:
        """Send the call where ``destination`` says; a number outside is dialed
        for ``party`` (see :class:`DialPolicy`), by default for the server."""
        if destination.kind == MONITOR:  # a supervisor answered the call placed to it
            return await self.monitors.attend(call)
        if destination.kind == "hangup":
            self._fail_caller(call, 603, "rejected")
            return
        if not self.answering.available(destination):
            logger.warning("call=%s destination %s is not available yet; answering 503", call.id, destination)
            self._fail_caller(call, 503, "failed")
            return
        if destination.kind in ("ivr", "queue", "feature", "voicemail"):
            await self.answering.take(call, destination)
        elif destination.kind in ("extension", "group"):
            await self.callees.ring(call, destination)  # forwarding, do-not-disturb, a group's members
        else:
            await self.forks.ring(call, [destination], party)

    def offer_sdp(self, call: Call) -> str:
        """The SDP offer for ringing someone on behalf of ``call``."""
        return call.bridge.offer()

    def answer(self, call: Call) -> SdpCodec:
        """Answer the caller ourselves (IVR, queue, feature codes), once; the codec it talks."""
        codec, sdp = call.bridge.answer_here(call.a.flow.addr[0])
        if isinstance(call.a, InboundLeg) and call.a.state is not LegState.ANSWERED:
            call.a.answer(sdp)
        if call.answered_at is None:
            call.answered_at = time.time()
            self.journal.answered(call)
        return codec

    # --- joining someone to a call, and calls the server places ---

    async def dial(self, targets: Sequence[Destination], *, caller: str, offer: str, timeout: float) -> Answered | Unreachable:
        """Ring ``targets`` on their own (see :meth:`Dialer.dial`); the answered
        leg is the caller's to :meth:`connect` or hang up."""
        return await self.dialer.dial(targets, caller=caller, offer=offer, timeout=timeout)

    def connect(self, call: Call, leg: OutboundLeg, resp: SipResponse) -> bool:
        """Bridge ``call``'s caller to a leg :meth:`dial` got answered; False
        (and the leg hung up) when the call ended meanwhile or the media cannot meet."""
        if call.ended:
            leg.bye()
            return False
        try:
            answer = call.bridge.join(resp.text, leg.flow.addr[0], call.a.flow.addr[0])
        except SdpNegotiationError as exc:
            logger.warning("call=%s answer from %s unusable: %s", call.id, leg.dialog.remote_target, exc)
            leg.bye()
            return False
        leg.events = self.midcall.leg_events(self.forks)
        self._legs[leg.key] = (call, leg)
        self._bridged(call, leg, answer)
        self.dialer.unclaimed.claim(leg)  # a BYE that came before this is handled now
        return True

    def _bridged(self, call: Call, leg: Leg, answer: str) -> None:
        """``call``'s caller now talks to ``leg``: answer the caller if it
        still rings (with ``answer``), start recording, log it."""
        call.b = leg
        call.forks = [leg] if isinstance(leg, OutboundLeg) else []
        call.leave_queue(time.time())
        call.move(CallState.ANSWERED)
        call.bridged.set_result(None)
        assert call.bridge.relay is not None
        call.bridge.relay.a.stop_playback()
        if isinstance(call.a, InboundLeg) and call.a.state is not LegState.ANSWERED:
            call.a.answer(answer)
        if call.answered_at is None:  # a transfer's piece is answered when its target answers
            call.answered_at = time.time()
            self.journal.answered(call)
        self.recording.on_bridged(call)
        self.feature_keys.arm(call)
        by = uri_user(leg.dialog.remote_uri)
        call_event(call.id, "answered", by=by, contact=leg.dialog.remote_target, queue=call.queue, wait=call.wait)
        self.events.emit("call_answered", call_id=call.id, by=by)

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
        before: Briefing | None = None,
    ) -> Call | Unreachable:
        """A call the server places: ring ``extension`` first (showing
        ``caller_id``), and once it answers (and heard ``before``) ring ``destination`` for it, a
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
                return Unreachable(exc.sip_status, "failed")
        call_id = call_id or new_call_id()
        started = time.time()
        # The row exists before anyone rings (a click-to-call stored it already, to promise it in its 202).
        await self.journal.placed(call_id, direction, extension, destination.target, started)

        def unconnected(disposition: str, sip_call_id: str | None = None) -> None:
            self.journal.close(unconnected_row(self.events, call_id, direction, extension, destination, disposition, started, sip_call_id))

        try:
            rung = await self.dialer.ring_first(extension, caller_id=caller_id, timeout=timeout)
        except OSError as exc:
            logger.error("no RTP port to call %s: %s", extension, exc)
            return Unreachable(503, "failed")
        except asyncio.CancelledError:  # given up while ringing (the API's DELETE)
            unconnected("cancelled")
            raise
        if isinstance(rung, Unreachable):
            unconnected(rung.disposition, rung.sip_call_id)
            return rung
        leg, bridge = rung
        call = Call(
            id=call_id, sip_call_id=leg.dialog.call_id, direction=direction, caller=extension, callee=destination.target,
            a=leg, bridge=bridge, started=started, answered_at=time.time(),
        )  # fmt: skip
        call.extensions.add(extension)
        leg.events = self.midcall.leg_events()
        self.calls[call.id] = call
        self._legs[leg.key] = (call, leg)
        self.journal.open(call)
        self.events.emit("call_started", call_id=call.id, direction=direction, from_=extension, to=destination.target)
        call_event(
            call.id, "started", direction=direction, **{"from": extension, "to": destination.target}, destination=destination,
            sip_call_id=call.sip_call_id,
        )  # fmt: skip
        call_event(call.id, "answered", by=extension, contact=leg.dialog.remote_target)
        self.events.emit("call_answered", call_id=call.id, by=extension)
        self.dialer.unclaimed.claim(leg)
        self._run(call, self.answering.briefed(call, before, lambda: self._go(call, destination, party)))
        return call

    # --- what the legs tell us (mid-call requests: pbx.calls.midcall) ---

    def _callee_failed(self, call: Call, status: int, disposition: str) -> None:
        """Nobody took the call: pbx.calls.callees knows where it goes next, if anywhere."""
        self.callees.failed(call, status, disposition)

    # --- the end of a call ---

    def hang_up(self, call: Call, disposition: str | None = None, ringing_status: int = 480) -> None:
        """End ``call`` from the server's side, recording ``disposition`` (by
        default as a stopping server does: answered or voicemail once someone
        took it, unavailable while it still waited for a person); a caller
        still ringing gets ``ringing_status``."""
        call.hangup_by = call.hangup_by or "pbx"
        disposition = disposition or call.hung_up_disposition("unavailable", "unavailable")
        self._hang_up_everything(call, ringing_status)
        self._end(call, disposition)

    def _fail_caller(self, call: Call, status: int, disposition: str) -> None:
        """End the call for the caller: a final error before we answered, BYE after."""
        call.a.drop(status)
        self._end(call, disposition)

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
        call = self.midcall.call_of(leg)
        if call is None or self.survey.agent_left(call, leg):
            return
        call.hangup_by = call.hangup_by or ("caller" if leg is call.a else "callee")
        self._hang_up_everything(call)
        self._end(call, call.hung_up_disposition("abandoned", "cancelled"))

    def _hang_up_everything(self, call: Call, ringing_status: int = 487) -> None:
        if call.state is CallState.RINGING:
            for fork in call.forks:
                fork.cancel()
            call.a.drop(ringing_status)
        for leg in (call.a, call.b):
            if leg is not None and not leg.ended:
                leg.bye()

    def _end(self, call: Call, disposition: str) -> None:
        if call.ended:
            return
        if disposition not in DISPOSITIONS:
            logger.error("call=%s ended with unknown disposition %r; recorded as failed", call.id, disposition)
            disposition = "failed"
        call.move(CallState.ENDED)
        if call.ring_timer is not None:
            call.ring_timer.cancel()
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        ended = time.time()
        for leg in [call.a, *call.forks, *([call.b] if call.b is not None else [])]:
            self._legs.pop(leg.key, None)
        self.calls.pop(call.id, None)
        if not call.done.done():
            call.done.set_result(disposition)
        for quality in call.bridge.close(call.id, self.events):
            call_event(call.id, "leg_quality", **quality)
        ending = self.recording.on_ended(call)
        if ending is not None:
            self._tasks.spawn(ending)
        call.leave_queue(ended)
        row = row_of(call, disposition, ended)
        self.events.emit("call_ended", call_id=call.id, direction=call.direction, disposition=disposition, cdr=row)
        self.journal.close(row)
