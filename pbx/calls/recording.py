"""Recording a bridged call: begun when its queue or one of its extensions
asks for it, or through the API (start, stop, pause, resume); ended with the call."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from pbx.calls.model import Call, CallState
from pbx.config.model import Config
from pbx.errors import BadRequest, CallError
from pbx.recordings.recorder import Recorder, Recording
from pbx.sip.outbound_leg import OutboundLeg

logger = logging.getLogger(__name__)


class CallRecording:
    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self.recorder: Recorder | None = None  # None: this server does not record

    def on_bridged(self, call: Call) -> None:
        """Start recording a call just bridged when its queue or one of its extensions asks for it."""
        cfg = self.config()
        queue = cfg.queues.get(call.queue) if call.queue else None
        by_extension = any(ext.record for number in call.extensions if (ext := cfg.extensions.get(number)))
        if self.recorder is None or call.bridge.relay is None or call.recording is not None:
            return
        if not (queue is not None and queue.record) and not by_extension:
            return
        self._begin(call)

    def on_ended(self, call: Call) -> Coroutine[Any, Any, object] | None:
        """What finishes the recording of a call that ended (the file written and indexed), if it has one."""
        if call.recording is None or self.recorder is None:
            return None
        return self.recorder.end(call.recording)

    async def action(self, call: Call, action: str) -> Recording:
        """``start``, ``stop``, ``pause`` or ``resume`` the recording of a
        bridged call (a paused recording gets silence: card numbers).
        CallError when the call is not bridged or the action does not fit
        the recording's state; ``stop`` returns once the file is indexed."""
        if call.state is not CallState.ANSWERED or call.b is None or call.bridge.relay is None:
            raise CallError(f"call {call.id} is not bridged", code="not-bridged")
        recording = call.recording
        if action == "start":
            if recording is not None:
                raise CallError(f"call {call.id} is already being recorded", code="already-recording")
            if self.recorder is None:
                raise CallError("this server does not record", code="recording-unavailable")
            recording = self._begin(call)
        elif recording is None:
            raise CallError(f"call {call.id} is not being recorded", code="not-recording")
        elif action == "stop":
            call.recording = None
            assert self.recorder is not None
            await self.recorder.end(recording)
        elif action in ("pause", "resume"):
            if recording.paused == (action == "pause"):
                state = "already-paused" if recording.paused else "not-paused"
                raise CallError(f"the recording of call {call.id} is {state.replace('-', ' ')}", code=state)
            if action == "pause":
                recording.pause()
            else:
                recording.resume()
        else:
            raise BadRequest(f"unknown recording action {action!r}")
        logger.info("call %s: recording %s: %s", call.id, recording.id, action)
        return recording

    def _begin(self, call: Call) -> Recording:
        assert self.recorder is not None and call.bridge.relay is not None
        relay = call.bridge.relay
        # The customer goes on the left: side a, but side b for calls we placed (callbacks).
        customer, agent = (relay.b, relay.a) if isinstance(call.a, OutboundLeg) else (relay.a, relay.b)
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
