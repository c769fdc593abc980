"""Offering waiting entries to agents.

One loop goes over every line whenever something changes (an entry joins,
an offer ends, a call ends, phones register) and at least every second: it
offers the first entries not yet being offered to the free agents the
queue's strategy picks. A caller's offer rings the agents with the caller's
own SDP and connects the first who answers; a callback's offer dials it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pbx.calls.control import CallControl
from pbx.calls.model import Unreachable
from pbx.config.model import Config, Destination, Queue
from pbx.events import EventBus
from pbx.queues import strategies
from pbx.queues.agents import Agents
from pbx.queues.callbacks import Callbacks
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines
from pbx.queues.stats import Figures
from pbx.sip.messages import uri_user
from pbx.tasks import Background

logger = logging.getLogger(__name__)

DISPATCH_INTERVAL = 1.0  # seconds: wrap-up ends and callback retries are noticed this often


class Dispatcher:
    """Offers every queue's entries to its agents."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        events: EventBus,
        lines: Lines,
        agents: Agents,
        figures: Figures,
        callbacks: Callbacks,
        log: QueueLog,
        tasks: Background,
    ) -> None:
        self.config = config
        self.calls = calls
        self.events = events
        self.lines = lines
        self.agents = agents
        self.figures = figures
        self.callbacks = callbacks
        self.log = log
        self.tasks = tasks

    async def run(self) -> None:
        """Dispatch every line each time one wakes, until cancelled."""
        while True:
            self.lines.sync(self.config().queues)
            for line in list(self.lines.values()):
                line.wake.clear()
                try:
                    self._dispatch(line)
                except Exception:
                    logger.exception("queue %s: dispatch failed", line.name)
            if not self.lines:  # no queue yet: a reload may add one, seen at the next sync
                await asyncio.sleep(DISPATCH_INTERVAL)
                continue
            wakes = [asyncio.ensure_future(line.wake.wait()) for line in self.lines.values()]
            try:
                await asyncio.wait(wakes, timeout=DISPATCH_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wake in wakes:
                    wake.cancel()

    def _dispatch(self, line: Line) -> None:
        """Offer the first entries not being offered to the free agents."""
        queue = self.config().queues.get(line.name)
        if queue is None:
            return
        free = self.agents.free(line)
        for entry in list(line.entries):
            if not free:
                return
            if entry.offering is not None or (entry.callback and not self.callbacks.due(entry, queue)):
                continue
            if entry.callback and self.calls.draining:  # the server is stopping: the callback waits for the next start
                continue
            if entry.callback and self.callbacks.trunk_full(entry.number):  # waits for a free line, holding no agent
                continue
            agents = self._pick(line, queue, entry, free)
            if not agents:
                continue
            for agent in agents:
                free.remove(agent)
                self.agents.ring(agent, entry)
            if entry.callback:
                work: Coroutine[Any, Any, None] = self.callbacks.dial(line, entry, agents[0], queue)
            else:
                work = self._offer(line, entry, agents, queue)
            entry.offering = self.tasks.spawn(self._offering(line, entry, agents, work))

    def _pick(self, line: Line, queue: Queue, entry: Entry, free: list[str]) -> list[str]:
        """The agents to ring for ``entry`` by the queue's strategy."""
        if queue.strategy == "ringall":
            return list(free)
        candidates = [a for a in free if a not in entry.tried]
        if not candidates:
            entry.tried.clear()  # everyone had a go: start over
            candidates = list(free)
        order = list(line.members)
        if queue.strategy == "linear":
            choice = strategies.linear(candidates, order)
        elif queue.strategy == "round-robin":
            choice = strategies.round_robin(candidates, order, line.last_agent)
        elif queue.strategy == "longest-idle":
            choice = strategies.longest_idle(candidates, order, self.agents.idle_since)
        elif queue.strategy == "fewest-calls":
            choice = strategies.fewest_calls(candidates, order, {a: m.calls for a, m in line.members.items()})
        else:  # random
            choice = strategies.random_agent(candidates)
        line.last_agent = choice
        return [choice]

    async def _offering(self, line: Line, entry: Entry, agents: list[str], work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self.agents.release(entry, agents)
            entry.offering = None
            line.wake.set()

    async def _offer(self, line: Line, entry: Entry, agents: list[str], queue: Queue) -> None:
        """Ring ``agents`` for the caller of ``entry`` and connect the first to answer."""
        call = entry.call
        assert call is not None and entry.outcome is not None
        logger.info("queue %s offers %s to %s", line.name, call.id, ",".join(agents))
        for agent in agents:
            self.log.write(line.name, "offer", call_id=call.id, agent=agent)
        result = await self.calls.dial(
            [Destination("extension", a) for a in agents],
            caller=call.caller,
            offer=self.calls.offer_sdp(call),
            timeout=queue.ring_timeout,
        )
        self.agents.release(entry, agents)
        if isinstance(result, Unreachable):
            for agent in agents:
                self.agents.missed(line, agent, entry, result)
            return
        leg, resp = result
        agent = uri_user(leg.dialog.remote_uri) or agents[0]
        if entry.outcome.done():
            leg.bye()
            return
        call.agent = agent  # before connecting: the recording starts there and names the agent
        call.extensions.add(agent)
        if not self.calls.connect(call, leg, resp):
            call.agent = None
            call.extensions.discard(agent)
            return
        call.bridge.moh_class = queue.moh  # what a party on hold plays the other
        wait = time.time() - entry.entered
        line.remove(entry)
        entry.outcome.set_result("answered")
        self.figures.caller_answered(line, wait, queue.service_level)
        self.events.emit("queue_caller_left", queue=line.name, outcome="answered", wait=wait, call_id=call.id, agent=agent)
        self.log.write(line.name, "answer", call_id=call.id, agent=agent, wait=round(wait, 3))
        self.agents.answered(line, agent, call)
