"""Call queues: callers wait with music and announcements, agents are offered
calls fairly, and a caller may leave a number to be called back without
losing their place in line.

Each queue keeps one line of entries ordered by arrival: callers on the phone,
and callbacks, which keep the arrival time of the call that asked for them.
A dispatcher per queue offers the first entries not yet being offered to the
free agents the strategy picks. An agent is free when logged in, not paused,
registered, out of wrap-up, and on no call at all (queue or direct). A
callback is offered only to a free agent, so there are never more callbacks
being dialed than agents to take them; the agent's phone rings first, then
the customer's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pbx.config import Config, Destination, Queue
from pbx.events import EventBus
from pbx.ivr.audio import CallAudio
from pbx.media.moh import MusicOnHold
from pbx.media.prompts import PromptLibrary, number_parts
from pbx.queues import strategies
from pbx.sip.b2bua import Call, CallService, Unreachable
from pbx.sip.registrar import Registrar
from pbx.sip.routing import DialRefused
from pbx.sip.messages import uri_user
from pbx.store.db import Store, iso_time
from pbx.tasks import Background

logger = logging.getLogger(__name__)

AGENT_STATES = ("logged_out", "available", "ringing", "busy", "wrapup", "paused")
HANDLE_TIME_HISTORY = 20  # recent calls the expected wait is computed from
MISSES_BEFORE_PAUSE = 2
DISPATCH_INTERVAL = 1.0  # seconds: wrap-up ends and callback retries are noticed this often


@dataclass
class Member:
    """An agent as a member of one queue."""

    extension: str
    logged_in: bool = True
    paused: bool = False
    misses: int = 0  # offers not answered in a row
    calls: int = 0  # queue calls answered today (fewest-calls)


@dataclass
class Entry:
    """A place in line: a caller on the phone, or a callback keeping a caller's place."""

    id: str  # the call's id, or the callback's
    number: str  # caller id, or the number to call back
    entered: float  # when the caller joined the line (a callback keeps it)
    call: Call | None = None
    callback: bool = False
    attempts: int = 0  # callback dials that reached nobody
    next_attempt: float = 0.0
    offering: asyncio.Task[None] | None = None
    tried: set[str] = field(default_factory=set)  # agents this entry was offered to in vain
    outcome: asyncio.Future[str] | None = None  # a caller's: answered


@dataclass
class Stats:
    """Today's figures for one queue."""

    day: str = ""
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    timeouts: int = 0
    callbacks_requested: int = 0
    callbacks_completed: int = 0
    callbacks_failed: int = 0
    answered_in_service_level: int = 0
    answer_wait_total: float = 0.0
    longest_wait: float = 0.0  # of the callers who left the line today, answered or not

    @property
    def service_level(self) -> float | None:
        return self.answered_in_service_level / self.answered if self.answered else None

    @property
    def average_speed_of_answer(self) -> float | None:
        return self.answer_wait_total / self.answered if self.answered else None


@dataclass
class Line:
    """One queue's waiting entries, members and figures."""

    name: str
    entries: list[Entry] = field(default_factory=list)
    members: dict[str, Member] = field(default_factory=dict)
    last_agent: str | None = None  # round-robin goes on after this one
    handle_times: deque[float] = field(default_factory=lambda: deque(maxlen=HANDLE_TIME_HISTORY))
    stats: Stats = field(default_factory=Stats)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.entries.sort(key=lambda e: e.entered)
        self.wake.set()

    def remove(self, entry: Entry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)

    def position(self, entry: Entry) -> int:
        return self.entries.index(entry) + 1


@dataclass(frozen=True)
class QueueSnapshot:
    """What metrics and the API read of a queue."""

    name: str
    callers: int
    longest_wait: float
    agents: dict[str, int]  # state -> count
    callbacks_pending: int
    stats: Stats

    @property
    def service_level(self) -> float | None:
        return self.stats.service_level


class QueueService:
    """Every queue of the configuration, and the callbacks they owe."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallService,
        registrar: Registrar,
        store: Store,
        events: EventBus,
        moh: MusicOnHold,
        prompts: Callable[[], PromptLibrary],
    ) -> None:
        self.config = config
        self.calls = calls
        self.registrar = registrar
        self.store = store
        self.events = events
        self.moh = moh
        self.prompts = prompts
        self.lines: dict[str, Line] = {}
        self._ringing: dict[str, Entry] = {}  # agents a queue offer rings now, and the entry it offers
        self._wrapup_until: dict[str, float] = {}  # by extension, time.time()
        self._idle_since: dict[str, float] = {}  # by extension: end of the last queue call
        self._tasks = Background("queue")
        self._writes = Background("queue log")  # rows on their way: awaited, never cancelled
        self._dispatcher: asyncio.Task[None] | None = None
        events.subscribe("call_ended", lambda **_: self._wake_all())
        events.subscribe("registrations_changed", lambda **_: self._wake_all())

    # --- lifetime ---

    async def start(self) -> None:
        """Restore agents' login and pause states and the pending callbacks, then dispatch."""
        self._sync_lines()
        for row in await self.store.rows("queue_log", "event in ('login', 'logout', 'pause', 'unpause') order by id"):
            member = self._member(row["queue"], row["agent"])
            if member is not None:
                _apply(member, row["event"])
        for row in await self.store.rows("callbacks", "status = 'pending' order by entered"):
            line = self.lines.get(row["queue"])
            if line is None:
                continue
            line.add(
                Entry(
                    id=row["id"],
                    number=row["number"],
                    entered=row["entered"],
                    callback=True,
                    attempts=row["attempts"],
                    next_attempt=row["next_attempt"],
                )
            )
        pending = sum(len(line.entries) for line in self.lines.values())
        if pending:
            logger.info("%d pending callbacks restored", pending)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def stop(self) -> None:
        """Stop offering; pending callbacks stay in the database for the next start."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await self._tasks.close()
        await asyncio.gather(*self._writes, return_exceptions=True)

    def _sync_lines(self) -> None:
        """Lines and members as the configuration (maybe just reloaded) has them."""
        queues = self.config().queues
        for name, queue in queues.items():
            line = self.lines.setdefault(name, Line(name))
            line.members = {ext: line.members.get(ext) or Member(ext) for ext in queue.agents}

    def _member(self, queue: str, extension: str) -> Member | None:
        line = self.lines.get(queue)
        return line.members.get(extension) if line else None

    def _wake_all(self) -> None:
        for line in self.lines.values():
            line.wake.set()

    # --- what the call service asks ---

    def exists(self, name: str) -> bool:
        return name in self.config().queues

    async def wait(self, call: Call, queue_name: str) -> Destination | None:
        """Keep ``call`` in the queue: music, announcements, the callback offer;
        None once an agent has it or it has been hung up here."""
        self._sync_lines()
        queue = self.config().queues[queue_name]
        line = self.lines[queue_name]
        codec = self.calls.answer_here(call)
        if queue.on_no_agents is not None and not self._staffed(line):
            logger.info("call %s: queue %s has no agent logged in", call.id, queue_name)
            self._log(queue_name, "exit-empty", call_id=call.id)
            return queue.on_no_agents
        decided: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = Entry(id=call.id, number=call.caller, entered=time.time(), call=call, outcome=decided)
        line.add(entry)
        self._today(line).offered += 1
        self._log(queue_name, "enter", call_id=call.id, number=call.caller, position=line.position(entry))
        assert call.relay is not None
        side = call.relay.a
        audio = CallAudio(side, self.prompts(), codec.name)
        outcome = "abandoned"  # unless it ends otherwise: hanging up cancels us
        try:
            # Inside the try: a caller who hangs up while the music loads leaves the line too.
            await self.moh.join(queue.moh, side, codec.name)
            outcome = await self._wait_in_line(line, entry, queue, audio)
        finally:
            if decided.done():
                outcome = decided.result()
            self.moh.leave(side)
            audio.stop()
            line.remove(entry)
            if outcome != "answered" and entry.offering is not None:
                entry.offering.cancel()
            if outcome != "answered":
                self._caller_left(line, entry, outcome)
            line.wake.set()
        if outcome == "timeout":
            logger.info("call %s: waited %d s in queue %s", call.id, queue.max_wait, queue_name)
            if queue.on_timeout is not None:
                return queue.on_timeout
            self.calls.hang_up(call, "timeout")
        elif outcome == "callback":
            self.calls.hang_up(call, "callback")
        return None

    async def _wait_in_line(self, line: Line, entry: Entry, queue: Queue, audio: CallAudio) -> str:
        """Music until an agent answers (answered), max_wait (timeout) or a
        callback request (callback); hanging up cancels it."""
        assert entry.outcome is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + queue.max_wait
        announce_at = start
        offer_at = start + queue.callback.offer_after if queue.callback.enabled else math.inf
        offered = False
        while not entry.outcome.done():
            now = loop.time()
            if now >= deadline:
                return "timeout"
            parts: list[str] = []
            if now >= announce_at:
                wait = self._expected_wait(line, entry)
                parts += self._announcement(line, entry, queue, wait)
                announce_at = now + queue.announce.every if queue.announce.every > 0 else math.inf
                if wait is not None and wait > queue.callback.offer_after:
                    offer_at = now
            if not offered and now >= offer_at:
                parts.append("callback-offer")
                offered = True
                logger.info("call %s: queue %s offers a callback", entry.id, line.name)
            key = await self._unless_answered(entry, audio, audio.play(parts, interruptible=True)) if parts else None
            if key is None and not entry.outcome.done():
                wake_at = min(deadline, announce_at, offer_at if not offered else math.inf)
                key = await self._unless_answered(entry, audio, audio.digit(max(wake_at - loop.time(), 0.0)))
            if entry.outcome.done():
                break
            if key is not None and offered and key == queue.callback.digit:
                await self._take_callback(line, entry, queue, audio)
        return entry.outcome.result()

    async def _unless_answered(self, entry: Entry, audio: CallAudio, work: Coroutine[Any, Any, str | None]) -> str | None:
        """The key ``work`` (an announcement, a wait for a key) ends with, or
        None. An agent answering cancels it and stops what it played at once,
        so no word of it reaches the conversation."""
        assert entry.outcome is not None
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait(_futures(task, entry.outcome), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                audio.side.stop_playback()
        return task.result() if task.done() and not task.cancelled() else None

    def _announcement(self, line: Line, entry: Entry, queue: Queue, wait: float | None) -> list[str]:
        parts: list[str] = []
        position = line.position(entry)
        if queue.announce.position and position <= 999:
            parts += ["queue-position", *number_parts(position)]
        minutes = None if wait is None else math.ceil(wait / 60)
        if queue.announce.wait_time and minutes is not None and minutes <= 999:
            parts.append("queue-wait")
            parts += ["less-than-a-minute"] if wait is not None and wait < 60 else [*number_parts(minutes), "minute" if minutes == 1 else "minutes"]
        logger.info(
            "call %s: queue %s announces position %d, expected wait %s",
            entry.id,
            line.name,
            position,
            "unknown" if wait is None else "under a minute" if wait < 60 else f"{minutes} min",
        )
        return parts

    def _expected_wait(self, line: Line, entry: Entry) -> float | None:
        """Seconds until ``entry`` is likely answered: one recent average
        handle time per round of the agents on duty; None without history."""
        agents = sum(1 for m in line.members.values() if m.logged_in and not m.paused and self._registered(m.extension))
        if not line.handle_times or agents == 0:
            return None
        average = sum(line.handle_times) / len(line.handle_times)
        return line.position(entry) * average / agents

    # --- callbacks ---

    async def _take_callback(self, line: Line, entry: Entry, queue: Queue, audio: CallAudio) -> None:
        """The caller pressed the callback digit: get the number, keep the place
        (the entry's outcome becomes callback), or say why not."""
        assert entry.outcome is not None and entry.call is not None
        number: str | None = entry.number if _dialable(entry.number) else None
        if number is None:
            number = await self._collect_number(audio)
            if number is None or entry.outcome.done():
                return
        try:
            self.check_callback_number(number, src=_source(entry.call))
        except DialRefused as exc:
            logger.info("call %s: no callback to %s from queue %s: %s", entry.id, number, line.name, exc)
            await audio.play(["callback-not-allowed"], interruptible=True)
            return  # the caller keeps waiting in line
        if _has_callback(line, number):
            logger.info("call %s: %s already has a callback pending in %s", entry.id, number, line.name)
            await audio.play(["callback-already"], interruptible=True)
            return
        entry.outcome.set_result("callback")
        if entry.offering is not None:
            entry.offering.cancel()
        line.remove(entry)
        await self._new_callback(line, number, entry.entered, entry.call.id)
        await audio.play(["callback-confirm", "goodbye"], interruptible=False)

    async def _collect_number(self, audio: CallAudio) -> str | None:
        """Digits the caller types, ended by #; None when nothing usable came."""
        key = await audio.play(["callback-enter-number"], interruptible=True)
        digits = ""
        while key != "#":
            if key is not None and key.isdigit():
                digits += key
            if len(digits) > 15:
                return None
            key = await audio.digit(10)
            if key is None:
                return None
        return digits or None

    def check_callback_number(self, number: str, *, src: str = "-") -> None:
        """DialRefused (with its security event from ``src``) when ``number`` may
        not be called back: an extension may, a number only when an outbound
        rule lets the server itself dial it (a callback is the server's call,
        whoever asked for it: a caller's ID or digits, or the API)."""
        if number not in self.config().extensions:
            self.calls.dialing.outbound_trunk(self._callback_destination(number), None, src=src, now=False)

    async def request_callback(self, queue_name: str, number: str, *, src: str = "-") -> Entry:
        """A callback asked for from outside a call (the API): joins the end of
        the line. DialRefused when the number may not be called back."""
        self._sync_lines()
        line = self.lines[queue_name]
        self.check_callback_number(number, src=src)
        if _has_callback(line, number):
            raise ValueError(f"{number} already has a callback pending in {queue_name}")
        return await self._new_callback(line, number, time.time(), None)

    async def _new_callback(self, line: Line, number: str, entered: float, call_id: str | None) -> Entry:
        """A pending callback to ``number``, placed in ``line`` as if it had
        joined at ``entered``, before any await: a second request for the
        same number finds it."""
        entry = Entry(id=f"cb-{uuid.uuid4().hex[:12]}", number=number, entered=entered, callback=True)
        line.add(entry)
        self._today(line).callbacks_requested += 1
        self.events.emit("callback", queue=line.name, outcome="requested")
        position = line.position(entry)
        then = f"callback {entry.id} to {number} requested in queue {line.name} at position {position}"
        self._log(line.name, "callback-request", call_id=call_id, number=number, callback=entry.id, position=position, then=then)
        await self.store.upsert(
            "callbacks",
            {
                "id": entry.id,
                "queue": line.name,
                "number": number,
                "entered": entered,
                "requested": iso_time(time.time()),
                "status": "pending",
                "attempts": 0,
                "next_attempt": 0.0,
                "call_id": call_id,
            },
        )
        return entry

    async def cancel_callback(self, callback_id: str) -> dict[str, Any]:
        """Take a pending callback out of its line and mark it cancelled; its
        row as it was. KeyError: no such callback; ValueError: it is no longer
        pending, or being dialed right now."""
        rows = await self.store.rows("callbacks", "id = ?", [callback_id])
        if not rows:
            raise KeyError(callback_id)
        row = rows[0]
        if row["status"] != "pending":
            raise ValueError(f"callback {callback_id} is {row['status']}")
        line = self.lines.get(row["queue"])
        entry = next((e for e in line.entries if e.id == callback_id), None) if line else None
        if entry is not None and entry.offering is not None:
            raise ValueError(f"callback {callback_id} is being dialed now")
        if line is not None and entry is not None:
            line.remove(entry)
        await self.store.update("callbacks", callback_id, {"status": "cancelled", "ended": iso_time(time.time())})
        self.events.emit("callback", queue=row["queue"], outcome="cancelled")
        then = f"callback {callback_id} to {row['number']} cancelled"
        self._log(row["queue"], "callback-cancel", number=row["number"], callback=callback_id, then=then)
        return row

    def _callback_due(self, entry: Entry, queue: Queue) -> bool:
        if time.time() < entry.next_attempt:
            return False
        hours = queue.callback.hours
        return hours is None or hours.is_open(datetime.now(ZoneInfo(self.config().timezone)))

    async def _dial_callback(self, line: Line, entry: Entry, agent: str, queue: Queue) -> None:
        """Ring the agent, then the customer; a customer who cannot be reached is tried again later."""
        destination = self._callback_destination(entry.number)
        refused = self.calls.dialing.refusal(destination) if destination.kind == "external" else None
        if refused is not None:  # asked for before the rules changed (a reload, or an older version)
            line.remove(entry)
            await self._finish_callback(line, entry, "failed", f"unattempted: {refused}")
            return
        logger.info("queue %s offers callback %s (%s) to %s", line.name, entry.id, entry.number, agent)
        self._log(line.name, "callback-dial", agent=agent, number=entry.number, callback=entry.id, attempt=entry.attempts + 1)
        result = await self.calls.originate(
            agent,
            destination,
            caller_id=entry.number,
            timeout=queue.ring_timeout,
            direction="callback",
        )
        self._release(entry, [agent])
        if isinstance(result, Unreachable):
            self._missed(line, agent, entry, result)
            return
        call = result
        call.queue, call.agent = line.name, agent
        await asyncio.wait(_futures(call.done, call.bridged), return_when=asyncio.FIRST_COMPLETED)
        if call.bridged.done():
            line.remove(entry)
            self._answered(line, agent, call, wait=None)  # before any await: the call may end meanwhile
            await self._finish_callback(line, entry, "completed", f"by {agent}")
            return
        entry.attempts += 1
        reason = call.done.result()
        if entry.attempts > queue.callback.retries:
            line.remove(entry)
            await self._finish_callback(line, entry, "failed", f"after {entry.attempts} attempts ({reason})")
            return
        entry.next_attempt = time.time() + queue.callback.retry_interval
        logger.info("callback %s: %s not reached (%s); next try in %d s", entry.id, entry.number, reason, queue.callback.retry_interval)
        self._log(line.name, "callback-retry", agent=agent, number=entry.number, callback=entry.id, reason=reason)
        await self.store.update("callbacks", entry.id, {"attempts": entry.attempts, "next_attempt": entry.next_attempt})

    async def _finish_callback(self, line: Line, entry: Entry, outcome: str, how: str) -> None:
        stats = self._today(line)
        if outcome == "completed":
            stats.callbacks_completed += 1
        else:
            stats.callbacks_failed += 1
        self.events.emit("callback", queue=line.name, outcome=outcome)
        event = "callback-complete" if outcome == "completed" else "callback-fail"
        then = f"callback {entry.id} to {entry.number} {outcome} {how}"
        self._log(line.name, event, number=entry.number, callback=entry.id, then=then)
        await self.store.update("callbacks", entry.id, {"status": outcome, "attempts": entry.attempts, "ended": iso_time(time.time())})

    def _callback_destination(self, number: str) -> Destination:
        """An extension, or a number outside: the outbound rules pick its trunk."""
        if number in self.config().extensions:
            return Destination("extension", number)
        return Destination("external", number)

    # --- offering calls to agents ---

    async def _dispatch_forever(self) -> None:
        while True:
            self._sync_lines()
            for line in list(self.lines.values()):
                line.wake.clear()
                try:
                    self._dispatch(line)
                except Exception:
                    logger.exception("queue %s: dispatch failed", line.name)
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
        free = [m.extension for m in line.members.values() if self._state(m) == "available" and self._registered(m.extension)]
        for entry in list(line.entries):
            if not free:
                return
            if entry.offering is not None or (entry.callback and not self._callback_due(entry, queue)):
                continue
            if entry.callback and self.calls.draining:  # the server is stopping: the callback waits for the next start
                continue
            if entry.callback and self._trunk_full(entry.number):  # waits for a free line, holding no agent
                continue
            agents = self._pick(line, queue, entry, free)
            if not agents:
                continue
            for agent in agents:
                free.remove(agent)
                self._ringing[agent] = entry
            if entry.callback:
                work: Coroutine[Any, Any, None] = self._dial_callback(line, entry, agents[0], queue)
            else:
                work = self._offer(line, entry, agents, queue)
            entry.offering = self._tasks.spawn(self._offering(line, entry, agents, work))

    def _trunk_full(self, number: str) -> bool:
        destination = self._callback_destination(number)
        if destination.kind != "external":
            return False
        refused = self.calls.dialing.refusal(destination)
        return refused is not None and refused.error == "call-limit"

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
            choice = strategies.longest_idle(candidates, order, self._idle_since)
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
            self._release(entry, agents)
            entry.offering = None
            line.wake.set()

    def _release(self, entry: Entry, agents: list[str]) -> None:
        """``entry``'s offer no longer rings ``agents``. An agent a later offer
        already rings stays claimed by that one: a callback's offering ends only
        after its call, when the agent may be ringing for the next entry."""
        for agent in agents:
            if self._ringing.get(agent) is entry:
                del self._ringing[agent]

    async def _offer(self, line: Line, entry: Entry, agents: list[str], queue: Queue) -> None:
        call = entry.call
        assert call is not None and entry.outcome is not None
        logger.info("queue %s offers %s to %s", line.name, call.id, ",".join(agents))
        for agent in agents:
            self._log(line.name, "offer", call_id=call.id, agent=agent)
        result = await self.calls.dial(
            [Destination("extension", a) for a in agents],
            caller=call.caller,
            offer=self.calls.offer_sdp(call),
            timeout=queue.ring_timeout,
        )
        self._release(entry, agents)
        if isinstance(result, Unreachable):
            for agent in agents:
                self._missed(line, agent, entry, result)
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
        wait = time.time() - entry.entered
        line.remove(entry)
        entry.outcome.set_result("answered")
        stats = self._today(line)
        stats.answer_wait_total += wait
        stats.longest_wait = max(stats.longest_wait, wait)
        if wait <= queue.service_level:
            stats.answered_in_service_level += 1
        self.events.emit("queue_caller_left", queue=line.name, outcome="answered", wait=wait)
        self._log(line.name, "answer", call_id=call.id, agent=agent, wait=round(wait, 3))
        self._answered(line, agent, call, wait)

    def _answered(self, line: Line, agent: str, call: Call, wait: float | None) -> None:
        """An agent took a queue call or a callback: count it, then wrap-up when it ends."""
        member = line.members.get(agent)
        if member is not None:
            member.misses = 0
            member.calls += 1
        if wait is not None:  # a caller, not a callback
            self._today(line).answered += 1
        self._wrapup_until[agent] = math.inf  # once the call is over, not offered again before _after_call has logged its end
        self._tasks.spawn(self._after_call(line, agent, call))

    async def _after_call(self, line: Line, agent: str, call: Call) -> None:
        started = time.time()
        await call.done
        queue = self.config().queues.get(line.name)
        wrapup = queue.wrapup if queue else 0
        now = time.time()
        line.handle_times.append(now - started + wrapup)
        self._idle_since[agent] = now
        self._wrapup_until[agent] = now + wrapup
        then = f"queue {line.name}: {agent} done with {call.id} after {now - started:.1f} s"
        self._log(line.name, "complete", call_id=call.id, agent=agent, then=then, talk=round(now - started, 3))
        if wrapup:
            await asyncio.sleep(wrapup)  # the agent's wrap-up time: nothing to await but the clock
        line.wake.set()

    def _missed(self, line: Line, agent: str, entry: Entry, why: Unreachable) -> None:
        """An offer the agent did not take; twice in a row pauses the agent."""
        entry.tried.add(agent)
        self._log(line.name, "ring-no-answer", call_id=entry.id, agent=agent, reason=why.disposition)
        member = line.members.get(agent)
        if member is None or why.disposition not in ("no-answer", "rejected"):
            return
        member.misses += 1
        if member.misses >= MISSES_BEFORE_PAUSE and not member.paused:
            member.paused = True
            then = f"queue {line.name}: agent {agent} missed {member.misses} calls in a row: paused"
            self._log(line.name, "pause", agent=agent, then=then, warn=True, reason="auto")

    # --- agents ---

    def _state(self, member: Member) -> str:
        ext = member.extension
        if not member.logged_in:
            return "logged_out"
        if ext in self._ringing:
            return "ringing"
        if self.calls.extension_busy(ext):
            return "busy"
        if member.paused:
            return "paused"
        if time.time() < self._wrapup_until.get(ext, 0.0):
            return "wrapup"
        return "available"

    def agent_states(self, queue: str) -> dict[str, str]:
        """Each agent of ``queue`` and its state now (one of AGENT_STATES)."""
        self._sync_lines()
        line = self.lines.get(queue)
        return {m.extension: self._state(m) for m in line.members.values()} if line else {}

    def _registered(self, extension: str) -> bool:
        return bool(self.registrar.contacts(extension))

    def _staffed(self, line: Line) -> bool:
        return any(m.logged_in and self._registered(m.extension) for m in line.members.values())

    def feature(self, extension: str, code: str) -> str:
        """*45 toggles login and *46 pause, in every queue the agent belongs to."""
        self._sync_lines()
        members = [(line, line.members[extension]) for line in self.lines.values() if extension in line.members]
        if not members:
            logger.info("%s dialed %s but is an agent of no queue", extension, code)
            return "invalid"
        if code == self.config().features.agent_login:
            action = "logout" if any(m.logged_in for _, m in members) else "login"
        else:
            action = "unpause" if any(m.paused for _, m in members) else "pause"
        for line, member in members:
            self.set_agent(line.name, extension, action)
        return {"login": "agent-logged-in", "logout": "agent-logged-out", "pause": "agent-paused", "unpause": "agent-unpaused"}[action]

    def set_agent(self, queue: str, extension: str, action: str) -> None:
        """login, logout, pause or unpause an agent in one queue."""
        member = self._member(queue, extension)
        if member is None:
            raise KeyError(f"{extension} is no agent of queue {queue}")
        _apply(member, action)
        logger.info("queue %s: agent %s: %s", queue, extension, action)
        self._log(queue, action, agent=extension)
        self.lines[queue].wake.set()

    # --- figures ---

    def _today(self, line: Line) -> Stats:
        day = datetime.now(ZoneInfo(self.config().timezone)).date().isoformat()
        if line.stats.day != day:
            line.stats = Stats(day=day)
            for member in line.members.values():
                member.calls = 0
        return line.stats

    def _caller_left(self, line: Line, entry: Entry, outcome: str) -> None:
        wait = time.time() - entry.entered
        stats = self._today(line)
        stats.longest_wait = max(stats.longest_wait, wait)
        if outcome == "abandoned":
            stats.abandoned += 1
        elif outcome == "timeout":
            stats.timeouts += 1
        self.events.emit("queue_caller_left", queue=line.name, outcome=outcome, wait=wait)
        if outcome != "callback":  # the callback-request row says it
            event = "abandon" if outcome == "abandoned" else outcome
            then = f"call {entry.id} left queue {line.name}: {outcome} after {wait:.1f} s"
            self._log(line.name, event, call_id=entry.id, then=then, wait=round(wait, 3))

    def snapshot(self) -> list[QueueSnapshot]:
        """Each queue now: callers, longest wait, agents by state, pending callbacks, today's stats."""
        return [self.queue_snapshot(line) for line in self.lines.values()]

    def queue_snapshot(self, line: Line) -> QueueSnapshot:
        now = time.time()
        callers = [e for e in line.entries if not e.callback]
        agents = dict.fromkeys(AGENT_STATES, 0)
        for member in line.members.values():
            agents[self._state(member)] += 1
        return QueueSnapshot(
            name=line.name,
            callers=len(callers),
            longest_wait=max((now - e.entered for e in callers), default=0.0),
            agents=agents,
            callbacks_pending=len(line.entries) - len(callers),
            stats=self._today(line),
        )

    # --- plumbing ---

    def _log(
        self,
        queue: str,
        event: str,
        *,
        call_id: str | None = None,
        agent: str | None = None,
        then: str | None = None,
        warn: bool = False,
        **data: Any,
    ) -> None:
        """One queue_log row, written in order by the store's single thread;
        ``then`` is logged (as a warning with ``warn``) once the row is stored,
        so whoever reads the log line finds the row."""
        row = {
            "time": iso_time(time.time()),
            "queue": queue,
            "call_id": call_id,
            "agent": agent,
            "event": event,
            "data": json.dumps(data) if data else None,
        }
        self._writes.spawn(self._write_log(row, then, logging.WARNING if warn else logging.INFO))

    async def _write_log(self, row: dict[str, Any], then: str | None, level: int) -> None:
        await self.store.insert("queue_log", row)
        if then:
            logger.log(level, "%s", then)



def _apply(member: Member, action: str) -> None:
    if action in ("login", "logout"):
        member.logged_in = action == "login"
        member.misses = 0
    elif action in ("pause", "unpause"):
        member.paused = action == "pause"
        member.misses = 0


def _futures(*futures: asyncio.Future[Any]) -> list[asyncio.Future[Any]]:
    return list(futures)


def _has_callback(line: Line, number: str) -> bool:
    return any(e.callback and e.number == number for e in line.entries)


def _source(call: Call) -> str:
    """The address to name in a security event about what ``call``'s caller
    asked: its phone's, for an extension; none for a caller from a trunk (the
    trunk's address is not theirs, and must not be banned for them)."""
    return call.a.flow.addr[0] if call.direction != "inbound" else "-"


def _dialable(number: str) -> bool:
    digits = number.removeprefix("+")
    return digits.isdigit() and len(digits) >= 2
