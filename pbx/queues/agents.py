"""Agents: who may be offered a queue call now, and what agents do about it.

An agent is free when logged in, not paused, not in do-not-disturb (``*78``),
registered with a phone that answers (pbx.sip.qualify), out of wrap-up, and
on no call at all (queue or direct). Agents log in and out and pause with
feature codes or the API; two offers missed in a row pause them too. After
a queue call the agent has the queue's wrap-up time before the next offer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from pbx.calls.control import CallControl
from pbx.calls.model import Call, Unreachable
from pbx.config.model import Config
from pbx.errors import NotFound
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines, Member
from pbx.sip.registrar import Registrar
from pbx.tasks import Background

logger = logging.getLogger(__name__)

AGENT_STATES = ("logged_out", "available", "ringing", "busy", "wrapup", "paused", "dnd")
MISSES_BEFORE_PAUSE = 2


class Agents:
    """The members of every queue, and what they are doing now."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        registrar: Registrar,
        lines: Lines,
        log: QueueLog,
        tasks: Background,
    ) -> None:
        self.config = config
        self.calls = calls
        self.registrar = registrar
        self.lines = lines
        self.log = log
        self.tasks = tasks
        self.idle_since: dict[str, float] = {}  # by extension: end of the last queue call
        self._ringing: dict[str, Entry] = {}  # agents a queue offer rings now, and the entry it offers
        self._wrapup_until: dict[str, float] = {}  # by extension, time.time()
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}  # (queue, extension) -> state last reported, since when

    async def restore(self) -> None:
        """Login and pause states as the queue log left them."""
        for row in await self.log.agent_actions():
            member = self.lines.member(row["queue"], row["agent"])
            if member is not None:
                member.apply(row["event"])

    # --- states ---

    def state(self, member: Member) -> str:
        """One of AGENT_STATES."""
        ext = member.extension
        if not member.logged_in:
            return "logged_out"
        if ext in self._ringing:
            return "ringing"
        if self.calls.extension_busy(ext):
            return "busy"
        if self.calls.extension_dnd(ext):
            return "dnd"
        if member.paused:
            return "paused"
        if time.time() < self._wrapup_until.get(ext, 0.0):
            return "wrapup"
        return "available"

    def states(self, queue: str) -> dict[str, str]:
        """Each agent of ``queue`` and its state now."""
        self.lines.sync(self.config().queues)
        line = self.lines.get(queue)
        return {m.extension: self.state(m) for m in line.members.values()} if line else {}

    def changed(self) -> list[tuple[str, str, str, float]]:
        """(queue, extension, state, since) of each agent whose state differs
        from the one this last returned (every agent, the first time)."""
        self.lines.sync(self.config().queues)
        now = time.time()
        changes = []
        for line in self.lines.values():
            for member in line.members.values():
                state, key = self.state(member), (line.name, member.extension)
                seen = self._seen.get(key)
                if seen is None or seen[0] != state:
                    self._seen[key] = (state, now)
                    changes.append((line.name, member.extension, state, now))
        return changes

    def since(self, queue: str, extension: str) -> float | None:
        """When the agent's state last reported by :meth:`changed` began."""
        seen = self._seen.get((queue, extension))
        return seen[1] if seen is not None else None

    def registered(self, extension: str) -> bool:
        return bool(self.registrar.contacts(extension))

    def staffed(self, line: Line) -> bool:
        """Whether any agent of ``line`` is logged in and registered, paused or not."""
        return any(m.logged_in and self.registered(m.extension) for m in line.members.values())

    def on_duty(self, line: Line) -> int:
        """The agents of ``line`` taking its calls: logged in, not paused, not in do-not-disturb, registered."""
        return sum(
            1
            for m in line.members.values()
            if m.logged_in and not m.paused and not self.calls.extension_dnd(m.extension) and self.registered(m.extension)
        )

    def free(self, line: Line) -> list[str]:
        """The agents of ``line`` that may be offered a call now, in member order."""
        return [m.extension for m in line.members.values() if self.state(m) == "available" and self.registered(m.extension)]

    # --- what agents do ---

    async def feature(self, extension: str, code: str) -> str:
        """*45 toggles login and *46 pause, in every queue the agent belongs to;
        the prompt that confirms it, once the new state is stored."""
        self.lines.sync(self.config().queues)
        members = [(line, line.members[extension]) for line in self.lines.values() if extension in line.members]
        if not members:
            logger.info("%s dialed %s but is an agent of no queue", extension, code)
            return "invalid"
        if code == self.config().features.agent_login:
            action = "logout" if any(m.logged_in for _, m in members) else "login"
        else:
            action = "unpause" if any(m.paused for _, m in members) else "pause"
        for line, member in members:
            self.apply(line.name, extension, action)
        await self.log.flush()
        return {"login": "agent-logged-in", "logout": "agent-logged-out", "pause": "agent-paused", "unpause": "agent-unpaused"}[action]

    def apply(self, queue: str, extension: str, action: str) -> None:
        """login, logout, pause or unpause an agent in one queue; NotFound
        (``no-such-agent``) when ``extension`` is no agent of ``queue``."""
        member = self.lines.member(queue, extension)
        if member is None:
            raise NotFound(f"{extension} is no agent of queue {queue}", code="no-such-agent")
        member.apply(action)
        logger.info("queue %s: agent %s: %s", queue, extension, action)
        self.log.write(queue, action, agent=extension)
        self.lines[queue].wake.set()

    # --- offers ---

    def ring(self, agent: str, entry: Entry) -> None:
        """``agent`` is being offered ``entry``: no other offer until :meth:`release`."""
        self._ringing[agent] = entry

    def release(self, entry: Entry, agents: list[str]) -> None:
        """``entry``'s offer no longer rings ``agents``. An agent a later offer
        already rings stays claimed by that one: a callback's offering ends only
        after its call, when the agent may be ringing for the next entry."""
        for agent in agents:
            if self._ringing.get(agent) is entry:
                del self._ringing[agent]

    def missed(self, line: Line, agent: str, entry: Entry, why: Unreachable) -> None:
        """An offer the agent did not take; twice in a row pauses the agent."""
        entry.tried.add(agent)
        self.log.write(line.name, "ring-no-answer", call_id=entry.id, agent=agent, reason=why.disposition)
        member = line.members.get(agent)
        if member is None or why.disposition not in ("no-answer", "rejected"):
            return
        member.misses += 1
        if member.misses >= MISSES_BEFORE_PAUSE and not member.paused:
            member.paused = True
            then = f"queue {line.name}: agent {agent} missed {member.misses} calls in a row: paused"
            self.log.write(line.name, "pause", agent=agent, then=then, warn=True, reason="auto")

    def answered(self, line: Line, agent: str, call: Call) -> None:
        """An agent took a queue call or a callback: count it, then wrap-up when it ends."""
        member = line.members.get(agent)
        if member is not None:
            member.misses = 0
            member.calls += 1
        self._wrapup_until[agent] = math.inf  # once the call is over, not offered again before _after_call has logged its end
        self.tasks.spawn(self._after_call(line, agent, call))

    async def _after_call(self, line: Line, agent: str, call: Call) -> None:
        started = time.time()
        # The agent is done when the call ends, or when it hung up first and the caller went on into the survey.
        done: list[asyncio.Future[Any]] = [call.done, call.agent_left]
        await asyncio.wait(done, return_when=asyncio.FIRST_COMPLETED)
        queue = self.config().queues.get(line.name)
        wrapup = queue.wrapup if queue else 0
        now = time.time()
        line.handle_times.append(now - started + wrapup)
        self.idle_since[agent] = now
        self._wrapup_until[agent] = now + wrapup
        then = f"queue {line.name}: {agent} done with {call.id} after {now - started:.1f} s"
        self.log.write(line.name, "complete", call_id=call.id, agent=agent, then=then, talk=round(now - started, 3))
        if wrapup:
            await asyncio.sleep(wrapup)  # the agent's wrap-up time: nothing to await but the clock
        line.wake.set()
