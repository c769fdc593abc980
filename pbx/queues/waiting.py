"""A caller waiting in a queue: music on hold, their position and expected
wait announced now and then, the offer of a callback, and max_wait.

The caller waits until the dispatcher connects an agent (the entry's outcome
becomes answered), max_wait passes, the caller takes a callback, or hangs up.
An agent answering cuts off whatever the caller hears at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pbx.calls.control import CallControl
from pbx.calls.model import Call
from pbx.calls.routing import DialRefused
from pbx.config.model import Config, Destination, Queue
from pbx.ivr.audio import CallAudio
from pbx.media.moh import MusicOnHold
from pbx.media.prompts import PromptLibrary, number_parts
from pbx.queues.agents import Agents
from pbx.queues.callbacks import Callbacks
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines
from pbx.queues.stats import Figures

logger = logging.getLogger(__name__)


class Waiting:
    """Keeps callers in line until an agent has them."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        moh: MusicOnHold,
        prompts: Callable[[], PromptLibrary],
        lines: Lines,
        agents: Agents,
        figures: Figures,
        callbacks: Callbacks,
        log: QueueLog,
    ) -> None:
        self.config = config
        self.calls = calls
        self.moh = moh
        self.prompts = prompts
        self.lines = lines
        self.agents = agents
        self.figures = figures
        self.callbacks = callbacks
        self.log = log

    async def wait(self, call: Call, queue_name: str) -> Destination | None:
        """Keep ``call`` in the queue: music, announcements, the callback offer;
        None once an agent has it or it has been hung up here."""
        self.lines.sync(self.config().queues)
        queue = self.config().queues[queue_name]
        line = self.lines[queue_name]
        codec = self.calls.answer(call)
        if queue.on_no_agents is not None and not self.agents.staffed(line):
            logger.info("call %s: queue %s has no agent logged in", call.id, queue_name)
            self.log.write(queue_name, "exit-empty", call_id=call.id)
            return queue.on_no_agents
        decided: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = Entry(id=call.id, number=call.caller, entered=time.time(), call=call, outcome=decided)
        line.add(entry)
        self.figures.caller_joined(line, entry)
        assert call.bridge.relay is not None
        side = call.bridge.relay.a
        audio = CallAudio(side, self.prompts(), codec.name)
        outcome = "abandoned"  # unless it ends otherwise: hanging up cancels us
        try:
            # Inside the try: a caller who hangs up while the music loads leaves the line too.
            await self.moh.join(queue.moh, side, codec.name)
            outcome = await self._wait_in_line(line, entry, queue, audio)
        finally:
            if decided.done():
                outcome = decided.result()
            if outcome != "answered":  # else the agent's bridge stopped the music, and a hold may have started it again
                self.moh.leave(side)
            audio.stop()
            line.remove(entry)
            if outcome != "answered" and entry.offering is not None:
                entry.offering.cancel()
            if outcome != "answered":
                self.figures.caller_left(line, entry, outcome)
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
                await self._take_callback(line, entry, audio)
        return entry.outcome.result()

    async def _unless_answered(self, entry: Entry, audio: CallAudio, work: Coroutine[Any, Any, str | None]) -> str | None:
        """The key ``work`` (an announcement, a wait for a key) ends with, or
        None. An agent answering cancels it and stops what it played at once,
        so no word of it reaches the conversation."""
        assert entry.outcome is not None
        task = asyncio.ensure_future(work)
        first: list[asyncio.Future[Any]] = [task, entry.outcome]
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                audio.silence()
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
        agents = self.agents.on_duty(line)
        if not line.handle_times or agents == 0:
            return None
        average = sum(line.handle_times) / len(line.handle_times)
        return line.position(entry) * average / agents

    async def _take_callback(self, line: Line, entry: Entry, audio: CallAudio) -> None:
        """The caller pressed the callback digit: get the number, keep the place
        (the entry's outcome becomes callback), or say why not."""
        assert entry.outcome is not None and entry.call is not None
        number: str | None = entry.number if _dialable(entry.number) else None
        if number is None:
            number = await self._collect_number(audio)
            if number is None or entry.outcome.done():
                return
        try:
            self.callbacks.check_number(number, src=_source(entry.call))
        except DialRefused as exc:
            logger.info("call %s: no callback to %s from queue %s: %s", entry.id, number, line.name, exc)
            await audio.play(["callback-not-allowed"], interruptible=True)
            return  # the caller keeps waiting in line
        if line.has_callback(number):
            logger.info("call %s: %s already has a callback pending in %s", entry.id, number, line.name)
            await audio.play(["callback-already"], interruptible=True)
            return
        entry.outcome.set_result("callback")
        entry.call.left_queue = "callback"  # the CDR's disposition too, however the call ends now
        if entry.offering is not None:
            entry.offering.cancel()
        line.remove(entry)
        await self.callbacks.create(line, number, entry.entered, entry.call.id)
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


def _source(call: Call) -> str:
    """The address to name in a security event about what ``call``'s caller
    asked: its phone's, for an extension; none for a caller from a trunk (the
    trunk's address is not theirs, and must not be banned for them)."""
    return call.a.flow.addr[0] if call.direction != "inbound" else "-"


def _dialable(number: str) -> bool:
    digits = number.removeprefix("+")
    return digits.isdigit() and len(digits) >= 2
