"""Calls the server answers itself: an IVR flow, a queue, voicemail, a
feature code. Each takes the caller's audio (side a of its bridge), does its
work, and either hangs up or hands the call back with where it goes next.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from pbx.calls.control import Queues, Voicemail
from pbx.calls.forwarding import Forwarding
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.park import Parking
from pbx.config.model import Config, Destination
from pbx.events import EventBus
from pbx.ivr.audio import CallAudio
from pbx.ivr.engine import IvrSession
from pbx.ivr.nodes import Flow as IvrFlow
from pbx.media.prompts import PromptLibrary
from pbx.sip.sdp import SdpCodec

# What the answering features need of the call service.
Go = Callable[[Call, Destination], Awaitable[None]]  # send the call on
HangUp = Callable[[Call, str], None]  # end it with a disposition
Answer = Callable[[Call], SdpCodec]  # answer the caller here; the codec it talks
Briefing = Callable[[CallAudio], Awaitable[None]]  # what the extension of a call the server placed hears first


class Answering:
    """The features that answer calls here, and whether a destination can be taken now."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        flows: Callable[[], Mapping[str, IvrFlow]],
        prompts: Callable[[], PromptLibrary],
        http: Callable[[], aiohttp.ClientSession],
        events: EventBus,
        answer: Answer,
        go: Go,
        hang_up: HangUp,
    ) -> None:
        self.config = config
        self.answer = answer
        self.go = go
        self.hang_up = hang_up
        self.flows = flows
        self.prompts = prompts
        self.http = http
        self.events = events
        self.queues: Queues | None = None
        self.voicemail: Voicemail | None = None
        self.settings: Forwarding | None = None  # do-not-disturb and forwarding by feature codes
        self.parking: Parking | None = None  # the park's slots, and pickup (*8, **NUM) that takes calls as a slot is taken

    def available(self, destination: Destination) -> bool:
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
            if features.sets_phone(destination.target):
                return self.settings is not None
            if self.parking is not None and self.parking.pickup.handles(destination.target):
                return True
            if self.parking is not None and self.parking.handles(destination.target):
                # A transfer to the park needs a free slot; a slot dialed empty gets 404 when it is taken.
                return not self.parking.parks(destination) or self.parking.free_slot() is not None
            return self.queues is not None and destination.target in (features.agent_login, features.agent_pause)
        if destination.kind == "group":
            return destination.target in self.config().groups
        return destination.kind in ("extension", "external", "hangup")

    async def take(self, call: Call, destination: Destination) -> None:
        """Answer ``call`` for ``destination`` (kind ivr, queue, feature or
        voicemail); pickup and the park's slots join the caller to another call instead."""
        if call.bridge.relay is not None:
            call.bridge.relay.a.stop_playback()  # a transfer's ringback: the server talks now
        if destination.kind == "ivr":
            await self._ivr(call, destination.target)
        elif destination.kind == "queue":
            await self._queue(call, destination.target)
        elif destination.kind == "feature" and self.parking is not None and self.parking.pickup.handles(destination.target):
            await self.parking.pickup.pick(call, destination.target)
        elif destination.kind == "feature" and self.parking is not None and self.parking.handles(destination.target):
            await self.parking.dialed(call, destination.target)
        elif destination.kind == "feature":
            await self._feature(call, destination.target)
        else:
            await self._voicemail(call, destination.target)

    async def briefed(self, call: Call, before: Briefing | None, then: Callable[[], Awaitable[None]]) -> None:
        """``then()``, once ``before`` has played to the extension that
        answered a call the server placed (side a): a voicemail's callback
        plays the message to its agent before the caller is dialed."""
        if before is not None:
            assert call.bridge.relay is not None and call.bridge.a_codec is not None  # ring_first settled them
            audio = CallAudio(call.bridge.relay.a, self.prompts(), call.bridge.a_codec.name)
            try:
                await before(audio)
            finally:
                audio.stop()
        if not call.ended:
            await then()

    def _talk_here(self, call: Call) -> CallAudio:
        """Answer the caller and take its audio for the server to play and hear keys."""
        codec = self.answer(call)
        call.move(CallState.IVR)
        assert call.bridge.relay is not None
        call.audio = CallAudio(call.bridge.relay.a, self.prompts(), codec.name)
        return call.audio

    async def _ivr(self, call: Call, flow: str) -> None:
        """Walk the caller through ``flow``, then send it where the flow ends."""
        audio = self._talk_here(call)
        call_event(call.id, "ivr", flow=flow)
        session = IvrSession(
            self.flows(),
            flow,
            audio,
            variables={"caller": call.caller, "called": call.callee, "call_id": call.id},
            timezone=self.config().timezone,
            http=self.http(),
            events=self.events,
            available=self.available,
            rated=lambda score: self._rated(call, score),
        )
        destination = await session.run()
        audio.stop()
        call.audio = None
        if call.ended:
            return
        call_event(call.id, "routed", flow=flow, destination=destination)
        if destination.kind == "hangup":
            self.hang_up(call, "answered")
            return
        call.move(CallState.RINGING)
        await self.go(call, destination)

    async def _rated(self, call: Call, score: int) -> None:
        """A rate node's score: the call's survey score, with its queue and agent."""
        if self.queues is not None:
            await self.queues.rated(call, score)

    async def _queue(self, call: Call, queue: str) -> None:
        """Wait in ``queue`` until an agent answers, or go where the queue says."""
        assert self.queues is not None
        call.move(CallState.QUEUED)
        call.queue = queue
        call.queued_at, call.wait = time.time(), None  # a queue's on_timeout may lead to another queue
        call_event(call.id, "queued", queue=queue)
        destination = await self.queues.wait(call, queue)
        call.leave_queue(time.time())
        if destination is not None and call.state is CallState.QUEUED:
            call_event(call.id, "routed", queue=queue, destination=destination, wait=call.wait)
            call.move(CallState.RINGING)
            await self.go(call, destination)

    async def _feature(self, call: Call, code: str) -> None:
        """A feature code: voicemail by phone, or an agent's or phone's setting (do it, say so); then hang up."""
        audio = self._talk_here(call)
        call_event(call.id, "feature", code=code)
        features = self.config().features
        if code == features.voicemail_main:
            assert self.voicemail is not None
            await self.voicemail.main(audio, call.caller, own=True, source=call.a.flow.addr[0])
        elif features.sets_phone(code):
            assert self.settings is not None
            await audio.play([await self.settings.feature(call.caller, code, src=call.a.flow.addr[0])], interruptible=False)
        else:
            assert self.queues is not None
            await audio.play([await self.queues.feature(call.caller, code)], interruptible=False)
        self.hang_up(call, "answered")

    async def _voicemail(self, call: Call, mailbox: str) -> None:
        """Take a message for ``mailbox``, or (``main``) voicemail by phone; then hang up."""
        assert self.voicemail is not None
        audio = self._talk_here(call)
        call_event(call.id, "voicemail", mailbox=mailbox)
        call.voicemail = mailbox if mailbox != "main" else None
        if mailbox == "main":
            await self.voicemail.main(audio, None, own=False, source=call.a.flow.addr[0])
        else:
            await self.voicemail.deposit(audio, mailbox, call.caller)
        self.hang_up(call, "answered" if mailbox == "main" else "voicemail")
