"""Call queues: callers wait with music and announcements, agents are offered
calls fairly, and a caller may leave a number to be called back without
losing their place in line.

:class:`QueueService` is what the call service, the API, metrics and app.py
see of the queues. It builds the parts that share the queues' lines
(:mod:`~pbx.queues.model`): the agents (:mod:`~pbx.queues.agents`), today's
figures (:mod:`~pbx.queues.stats`), the queue log (:mod:`~pbx.queues.log`),
callbacks (:mod:`~pbx.queues.callbacks`), the callers waiting
(:mod:`~pbx.queues.waiting`) and the dispatcher that offers them to agents
(:mod:`~pbx.queues.dispatch`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pbx.calls.control import CallControl
from pbx.calls.model import Call
from pbx.config.model import Config, Destination
from pbx.events import EventBus
from pbx.media.moh import MusicOnHold
from pbx.media.prompts import PromptLibrary
from pbx.queues.agents import Agents
from pbx.queues.callbacks import Callbacks
from pbx.queues.dispatch import Dispatcher
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines
from pbx.queues.stats import Figures, QueueSnapshot
from pbx.queues.surveys import Surveys
from pbx.queues.voicemail_work import VoicemailWork
from pbx.queues.waiting import Waiting
from pbx.sip.registrar import Registrar
from pbx.store.db import Store
from pbx.tasks import Background

AGENT_WATCH_INTERVAL = 0.25  # seconds: an agent's change reaches the wallboard and the event feed within it


class QueueService:
    """Every queue of the configuration, and the callbacks they owe."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        registrar: Registrar,
        store: Store,
        events: EventBus,
        moh: MusicOnHold,
        prompts: Callable[[], PromptLibrary],
    ) -> None:
        self.config = config
        self.lines = Lines()
        self.events = events
        self._tasks = Background("queue")  # the dispatch loop, offers, and agents' wrap-ups after a queue call
        self._log = QueueLog(store)
        self._agents = Agents(config=config, calls=calls, registrar=registrar, lines=self.lines, log=self._log, tasks=self._tasks)
        self._figures = Figures(config=config, lines=self.lines, agents=self._agents, events=events, log=self._log)
        self._callbacks = Callbacks(
            config=config,
            calls=calls,
            store=store,
            events=events,
            lines=self.lines,
            agents=self._agents,
            figures=self._figures,
            log=self._log,
        )
        self._waiting = Waiting(
            config=config,
            calls=calls,
            moh=moh,
            prompts=prompts,
            lines=self.lines,
            agents=self._agents,
            figures=self._figures,
            callbacks=self._callbacks,
            log=self._log,
        )
        self.voicemail_work = VoicemailWork(
            config=config, calls=calls, store=store, events=events, lines=self.lines, callbacks=self._callbacks, tasks=self._tasks
        )
        self._dispatch = Dispatcher(
            config=config,
            calls=calls,
            events=events,
            lines=self.lines,
            agents=self._agents,
            figures=self._figures,
            callbacks=self._callbacks,
            log=self._log,
            tasks=self._tasks,
        )
        self._surveys = Surveys(store, events)
        events.subscribe("survey_answered", self._figures.survey_answered)
        events.subscribe("call_ended", lambda **_: self.lines.wake_all())
        events.subscribe("registrations_changed", lambda **_: self.lines.wake_all())

    # --- lifetime ---

    async def start(self) -> None:
        """Restore agents' login and pause states and the pending callbacks, then dispatch."""
        self.lines.sync(self.config().queues)
        await self._agents.restore()
        await self._callbacks.restore()
        await self.voicemail_work.restore()
        self._tasks.spawn(self._dispatch.run())
        self._tasks.spawn(self._watch_agents())

    async def _watch_agents(self) -> None:
        """Announce each agent's state as it changes. A state is worked out
        from several things (calls, do-not-disturb, registrations, wrap-up's
        end, pauses), so it is looked at on a short period rather than at
        each of their changes."""
        while True:
            for queue, agent, state, since in self._agents.changed():
                self.events.emit("agent_state", queue=queue, agent=agent, state=state, since=since)
            await asyncio.sleep(AGENT_WATCH_INTERVAL)

    async def stop(self) -> None:
        """Stop offering; pending callbacks stay in the database for the next start."""
        await self._tasks.close()
        await self._log.flush()
        await self._surveys.flush()

    # --- what the call service asks ---

    def exists(self, name: str) -> bool:
        return name in self.config().queues

    async def wait(self, call: Call, queue_name: str) -> Destination | None:
        """Keep ``call`` in the queue: music, announcements, the callback offer;
        None once an agent has it or it has been hung up here."""
        return await self._waiting.wait(call, queue_name)

    async def feature(self, extension: str, code: str) -> str:
        """*45 toggles login and *46 pause, in every queue the agent belongs to."""
        return await self._agents.feature(extension, code)

    async def rated(self, call: Call, score: int) -> None:
        """The caller of ``call`` rated it ``score`` (a rate node): stored with its queue and agent, then announced."""
        await self._surveys.answered(call.id, call.queue, call.agent, score)

    # --- what the API asks ---

    def agent_since(self, queue: str, extension: str) -> float | None:
        """When the agent's present state began, as last announced (None: not yet)."""
        return self._agents.since(queue, extension)

    def agent_states(self, queue: str) -> dict[str, str]:
        """Each agent of ``queue`` and its state now (one of pbx.queues.agents.AGENT_STATES)."""
        return self._agents.states(queue)

    async def set_agent(self, queue: str, extension: str, action: str) -> None:
        """login, logout, pause or unpause an agent in one queue, and return once
        that is stored; NotFound (``no-such-agent``) when ``extension`` is no agent of ``queue``."""
        self._agents.apply(queue, extension, action)
        await self._agents.log.flush()

    def check_callback_number(self, number: str, *, src: str = "-") -> None:
        """DialRefused (with its security event from ``src``) when ``number`` may not be called back."""
        self._callbacks.check_number(number, src=src)

    async def request_callback(self, queue_name: str, number: str, *, src: str = "-") -> Entry:
        """A callback asked for from outside a call: joins the end of the line.
        DialRefused when the number may not be called back; QueueError
        (``callback-exists``) when it already has one pending in the queue."""
        return await self._callbacks.request(queue_name, number, src=src)

    async def cancel_callback(self, callback_id: str) -> dict[str, Any]:
        """Mark a pending callback cancelled; its row as it was. NotFound
        (``no-such-callback``); QueueError (``callback-not-pending``) when it is
        no longer pending, or being dialed now."""
        return await self._callbacks.cancel(callback_id)

    # --- figures ---

    def snapshot(self) -> list[QueueSnapshot]:
        """Each queue now: callers, longest wait, agents by state, pending callbacks, today's stats."""
        return self._figures.snapshot()

    def queue_snapshot(self, line: Line) -> QueueSnapshot:
        return self._figures.queue_snapshot(line)
