"""The post-call survey (issue 17): a queue's caller whose agent hangs up
first is not hung up but goes on into the queue's ``survey`` flow, where a
``rate`` node takes the score (pbx.ivr.engine, stored by pbx.queues.surveys).

The caller's leg was answered long ago, so nothing is signalled to it: the
agent's side of the bridge is vacated and the server talks to the caller on
side a, as the IVR does. It stays the same call with one CDR row: answered,
hung up by the callee (the agent ended the conversation), its queue and
agent those of the survey's row. A caller who hangs up first gets no survey,
and neither does a callback's customer (the server called them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any

from pbx.calls.answering import Answering
from pbx.calls.model import Call, CallState, call_event
from pbx.calls.recording import CallRecording
from pbx.config.model import Config, Destination
from pbx.sip.dialog import Leg
from pbx.sip.outbound_leg import OutboundLeg

logger = logging.getLogger(__name__)

Run = Callable[[Call, Coroutine[Any, Any, None]], None]  # run work as the call's own task
Spawn = Callable[[Coroutine[Any, Any, object]], object]  # work that outlives the call (a recording's end)


class Survey:
    """Sends queue callers into their queue's survey when the agent hangs up first."""

    def __init__(
        self,
        config: Callable[[], Config],
        legs: MutableMapping[tuple[str, str], tuple[Call, Leg]],
        recording: CallRecording,
        answering: Answering,
        *,
        run: Run,
        spawn: Spawn,
    ) -> None:
        """``legs``: the call service's map of every leg to its call;
        ``answering``: what runs the survey flow (and says whether it is loaded)."""
        self.config = config
        self.legs = legs
        self.recording = recording
        self.answering = answering
        self.run = run
        self.spawn = spawn

    def flow_for(self, call: Call, leg: Leg) -> Destination | None:
        """The survey ``call``'s caller goes into now that ``leg`` hung up:
        when ``leg`` is the agent of a queue call whose queue has a survey
        flow that runs; else None (the call ends as any other)."""
        if leg is not call.b or call.state is not CallState.ANSWERED or call.queue is None or call.agent is None:
            return None
        if isinstance(call.a, OutboundLeg) or call.a.ended:  # a callback: the agent is side a, the customer b
            return None
        queue = self.config().queues.get(call.queue)
        if queue is None or queue.survey is None:
            return None
        flow = Destination("ivr", queue.survey)
        if not self.answering.available(flow):
            logger.warning("call=%s queue %s: survey flow %s is not loaded; hanging up", call.id, call.queue, queue.survey)
            return None
        return flow

    def agent_left(self, call: Call, leg: Leg) -> bool:
        """``leg`` of ``call`` hung up: True when the caller went into the
        survey (the call goes on), False when the call ends as usual."""
        flow = self.flow_for(call, leg)
        if flow is None:
            return False
        call.hangup_by = "callee"
        self.legs.pop(leg.key, None)
        call.b, call.forks = None, []
        assert call.agent is not None
        call.extensions.discard(call.agent)  # the agent may be offered the next call
        call.bridge.vacate()
        # The recording is of the conversation with the agent; the caller's rating is not part of it.
        ending = self.recording.on_ended(call)
        call.recording = None
        if ending is not None:
            self.spawn(ending)
        # This agent is done; should the flow send the caller to an agent again, that one gets a new future.
        left, call.agent_left = call.agent_left, asyncio.get_running_loop().create_future()
        left.set_result(None)
        call_event(call.id, "survey", queue=call.queue, agent=call.agent, flow=flow.target)
        self.run(call, self._survey(call, flow, call.task))
        return True

    async def _survey(self, call: Call, flow: Destination, queued: asyncio.Task[Any] | None) -> None:
        """Take the caller into ``flow`` once the call's work so far (its wait
        in the queue, ``queued``) is over: an agent who hangs up at once may
        leave it still cleaning up the caller's side (its announcement, its
        keys), and one task at a time speaks to a caller."""
        if queued is not None and not queued.done():
            await asyncio.wait([queued])
        if not call.ended:
            await self.answering.take(call, flow)
