"""Callbacks: a caller (or the API) leaves a number to be called back, and
keeps their place in line.

A callback is an entry of the line, kept in the callbacks table until it is
completed, failed or cancelled, so a restart loses none. It is offered only
to a free agent, so there are never more callbacks being dialed than agents
to take them; the agent's phone rings first, then the customer's. A customer
who cannot be reached is tried again after the queue's retry interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from pbx.calls.control import CallControl
from pbx.calls.model import Unreachable
from pbx.calls.routing import DialRefused
from pbx.config.model import Config, Destination, Queue
from pbx.errors import NotFound, QueueError
from pbx.events import EventBus
from pbx.ivr.audio import CallAudio
from pbx.queues.agents import Agents
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines
from pbx.queues.stats import Figures
from pbx.store.db import Store, iso_time

logger = logging.getLogger(__name__)


class MessageWork(Protocol):
    """What a callback about a voicemail message needs (pbx.queues.voicemail_work)."""

    async def play(self, entry: Entry, audio: CallAudio) -> None:
        """Play ``entry``'s message to the agent who answered, before its caller is dialed."""

    async def handled(self, entry: Entry) -> None:
        """``entry``'s caller was called back: its message is handled."""


class Callbacks:
    """The callbacks the queues owe: asked for, kept, dialed, finished."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        store: Store,
        events: EventBus,
        lines: Lines,
        agents: Agents,
        figures: Figures,
        log: QueueLog,
    ) -> None:
        self.config = config
        self.calls = calls
        self.store = store
        self.events = events
        self.lines = lines
        self.agents = agents
        self.figures = figures
        self.log = log
        self.messages: MessageWork | None = None  # callbacks about voicemail messages: their message and its handling

    async def restore(self) -> None:
        """The pending callbacks of the database, back in their lines (those
        about a voicemail message are voicemail work's to restore)."""
        for row in await self.store.rows("callbacks", "status = 'pending' and message is null order by entered"):
            line = self.lines.get(row["queue"])
            if line is None:
                continue
            line.add(Entry.pending_callback(row))
        pending = sum(len(line.entries) for line in self.lines.values())
        if pending:
            logger.info("%d pending callbacks restored", pending)

    # --- asking for one ---

    def check_number(self, number: str, *, src: str = "-") -> None:
        """DialRefused (with its security event from ``src``) when ``number`` may
        not be called back: an extension may, a number only when an outbound
        rule lets the server itself dial it (a callback is the server's call,
        whoever asked for it: a caller's ID or digits, or the API)."""
        if number not in self.config().extensions:
            self.calls.dialing.outbound_trunk(self.destination(number), None, src=src, now=False)

    def refusal(self, number: str) -> DialRefused | None:
        """Why ``number`` may never be called back, quietly: :meth:`check_number`
        without its security event, for a number nobody asked to dial (a
        voicemail's caller). A trunk that is full now is no reason."""
        destination = self.destination(number)
        return self.calls.dialing.refusal(destination, now=False) if destination.kind == "external" else None

    async def request(self, queue_name: str, number: str, *, src: str = "-") -> Entry:
        """A callback asked for from outside a call (the API): joins the end of
        the line. DialRefused when the number may not be called back; KeyError
        when there is no such queue; QueueError (``callback-exists``) when
        ``number`` already has one pending there."""
        self.lines.sync(self.config().queues)
        line = self.lines[queue_name]
        self.check_number(number, src=src)
        if line.has_callback(number):
            raise QueueError(f"{number} already has a callback pending in {queue_name}", code="callback-exists")
        return await self.create(line, number, time.time(), None)

    async def create(
        self, line: Line, number: str, entered: float, call_id: str | None, *, message: str | None = None, mailbox: str | None = None
    ) -> Entry:
        """A pending callback to ``number``, placed in ``line`` as if it had
        joined at ``entered``, before any await: a second request for the
        same number finds it. With ``message`` (of ``mailbox``), the agent
        hears that voicemail message before the number is dialed."""
        entry = Entry(id=f"cb-{uuid.uuid4().hex[:12]}", number=number, entered=entered, callback=True, message=message, mailbox=mailbox)
        line.add(entry)
        self.figures.today(line).callbacks_requested += 1
        self.events.emit("callback", queue=line.name, outcome="requested", callback_id=entry.id, number=number)
        position = line.position(entry)
        then = f"callback {entry.id} to {number} requested in queue {line.name} at position {position}"
        self.log.write(line.name, "callback-request", call_id=call_id, number=number, callback=entry.id, position=position, then=then)
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
                "message": message,
            },
        )
        return entry

    async def cancel(self, callback_id: str) -> dict[str, Any]:
        """Take a pending callback out of its line and mark it cancelled; its
        row as it was. NotFound (``no-such-callback``); QueueError
        (``callback-not-pending``) when it is no longer pending, or being dialed right now."""
        rows = await self.store.rows("callbacks", "id = ?", [callback_id])
        if not rows:
            raise NotFound(f"there is no callback {callback_id}", code="no-such-callback")
        row = rows[0]
        if row["status"] != "pending":
            raise QueueError(f"callback {callback_id} is {row['status']}", code="callback-not-pending")
        line = self.lines.get(row["queue"])
        entry = next((e for e in line.entries if e.id == callback_id), None) if line else None
        if entry is not None and entry.offering is not None:
            raise QueueError(f"callback {callback_id} is being dialed now", code="callback-not-pending")
        if line is not None and entry is not None:
            line.remove(entry)
        await self.store.update("callbacks", callback_id, {"status": "cancelled", "ended": iso_time(time.time())})
        self.events.emit("callback", queue=row["queue"], outcome="cancelled", callback_id=callback_id, number=row["number"])
        then = f"callback {callback_id} to {row['number']} cancelled"
        self.log.write(row["queue"], "callback-cancel", number=row["number"], callback=callback_id, then=then)
        return row

    # --- dialing it ---

    def due(self, entry: Entry, queue: Queue) -> bool:
        """Whether callback ``entry`` may be dialed now: its retry time has
        come, within the queue's callback hours."""
        if time.time() < entry.next_attempt:
            return False
        hours = queue.callback.hours
        return hours is None or hours.is_open(datetime.now(ZoneInfo(self.config().timezone)))

    def trunk_full(self, number: str) -> bool:
        """Whether the trunk that would dial ``number`` is at its call limit."""
        destination = self.destination(number)
        if destination.kind != "external":
            return False
        refused = self.calls.dialing.refusal(destination)
        return refused is not None and refused.code == "call-limit"

    async def dial(self, line: Line, entry: Entry, agent: str, queue: Queue) -> None:
        """Ring the agent, then the customer; a customer who cannot be reached is tried again later."""
        destination = self.destination(entry.number)
        refused = self.calls.dialing.refusal(destination) if destination.kind == "external" else None
        if refused is not None:  # asked for before the rules changed (a reload, or an older version)
            line.remove(entry)
            await self._finish(line, entry, "failed", f"unattempted: {refused}")
            return
        logger.info("queue %s offers callback %s (%s) to %s", line.name, entry.id, entry.number, agent)
        self.log.write(line.name, "callback-dial", agent=agent, number=entry.number, callback=entry.id, attempt=entry.attempts + 1)
        self.events.emit("callback", queue=line.name, outcome="dialed", callback_id=entry.id, number=entry.number)
        result = await self.calls.originate(
            agent,
            destination,
            caller_id=entry.number,
            timeout=queue.ring_timeout,
            direction="callback",
            before=partial(self.messages.play, entry) if entry.message is not None and self.messages is not None else None,
        )
        self.agents.release(entry, [agent])
        if isinstance(result, Unreachable):
            self.agents.missed(line, agent, entry, result)
            return
        call = result
        call.queue, call.agent = line.name, agent
        call.bridge.moh_class = queue.moh  # what a party on hold plays the other
        ends: list[asyncio.Future[Any]] = [call.done, call.bridged]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        if call.bridged.done():
            line.remove(entry)
            self.agents.answered(line, agent, call)  # before any await: the call may end meanwhile
            await self._finish(line, entry, "completed", f"by {agent}")
            return
        entry.attempts += 1
        reason = call.done.result()
        if entry.attempts > queue.callback.retries:
            line.remove(entry)
            await self._finish(line, entry, "failed", f"after {entry.attempts} attempts ({reason})")
            return
        entry.next_attempt = time.time() + queue.callback.retry_interval
        logger.info("callback %s: %s not reached (%s); next try in %d s", entry.id, entry.number, reason, queue.callback.retry_interval)
        self.log.write(line.name, "callback-retry", agent=agent, number=entry.number, callback=entry.id, reason=reason)
        await self.store.update("callbacks", entry.id, {"attempts": entry.attempts, "next_attempt": entry.next_attempt})

    async def _finish(self, line: Line, entry: Entry, outcome: str, how: str) -> None:
        stats = self.figures.today(line)
        if outcome == "completed":
            stats.callbacks_completed += 1
        else:
            stats.callbacks_failed += 1
        self.events.emit("callback", queue=line.name, outcome=outcome, callback_id=entry.id, number=entry.number)
        event = "callback-complete" if outcome == "completed" else "callback-fail"
        then = f"callback {entry.id} to {entry.number} {outcome} {how}"
        self.log.write(line.name, event, number=entry.number, callback=entry.id, then=then)
        await self.store.update("callbacks", entry.id, {"status": outcome, "attempts": entry.attempts, "ended": iso_time(time.time())})
        if outcome == "completed" and entry.message is not None and self.messages is not None:
            await self.messages.handled(entry)

    def destination(self, number: str) -> Destination:
        """An extension, or a number outside: the outbound rules pick its trunk."""
        if number in self.config().extensions:
            return Destination("extension", number)
        return Destination("external", number)
