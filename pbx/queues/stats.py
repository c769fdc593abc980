"""Today's figures of each queue (offered, answered, abandoned, waits, service
level, callbacks) and the snapshot metrics and the API read of a queue.
A queue's figures start over at midnight in the configured timezone."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.queues.agents import AGENT_STATES, Agents
from pbx.queues.log import QueueLog
from pbx.queues.model import Entry, Line, Lines, Stats


def is_overdue(config: Config, entry: Entry, now: float) -> bool:
    """Whether voicemail work ``entry`` (pbx.queues.voicemail_work) is still
    pending ``respond_within`` after its message was left."""
    box = config.mailbox(entry.mailbox) if entry.message is not None and entry.mailbox is not None else None
    return box is not None and box.respond_within is not None and now > entry.entered + box.respond_within


@dataclass(frozen=True)
class QueueSnapshot:
    """What metrics and the API read of a queue."""

    name: str
    callers: int
    longest_wait: float
    agents: dict[str, int]  # state -> count
    callbacks_pending: int  # voicemail work included
    stats: Stats
    voicemail_pending: int = 0  # of the callbacks pending, those about a voicemail message (pbx.queues.voicemail_work)
    voicemail_overdue: int = 0  # of those, the ones pending past their mailbox's respond_within

    @property
    def service_level(self) -> float | None:
        return self.stats.service_level


class Figures:
    """Counts what happens in the queues, day by day."""

    def __init__(self, *, config: Callable[[], Config], lines: Lines, agents: Agents, events: EventBus, log: QueueLog) -> None:
        self.config = config
        self.lines = lines
        self.agents = agents
        self.events = events
        self.log = log

    def today(self, line: Line) -> Stats:
        """``line``'s figures for today, started over (with its agents' call counts) on a new day."""
        day = datetime.now(ZoneInfo(self.config().timezone)).date().isoformat()
        if line.stats.day != day:
            line.stats = Stats(day=day)
            for member in line.members.values():
                member.calls = 0
        return line.stats

    def caller_joined(self, line: Line, entry: Entry) -> None:
        """A caller joined ``line``: offered to it today."""
        self.today(line).offered += 1
        position = line.position(entry)
        self.log.write(line.name, "enter", call_id=entry.id, number=entry.number, position=position)
        self.events.emit("queue_joined", queue=line.name, call_id=entry.id, caller=entry.number, position=position)

    def caller_answered(self, line: Line, wait: float, service_level: float) -> None:
        """A caller of ``line`` reached an agent after ``wait`` seconds."""
        stats = self.today(line)
        stats.answered += 1
        stats.answer_wait_total += wait
        stats.longest_wait = max(stats.longest_wait, wait)
        if wait <= service_level:
            stats.answered_in_service_level += 1

    def caller_left(self, line: Line, entry: Entry, outcome: str) -> None:
        """A caller left ``line`` unanswered: abandoned, timeout or callback."""
        wait = time.time() - entry.entered
        stats = self.today(line)
        stats.longest_wait = max(stats.longest_wait, wait)
        if outcome == "abandoned":
            stats.abandoned += 1
        elif outcome == "timeout":
            stats.timeouts += 1
        self.events.emit("queue_caller_left", queue=line.name, outcome=outcome, wait=wait, call_id=entry.id)
        if outcome != "callback":  # the callback-request row says it
            event = "abandon" if outcome == "abandoned" else outcome
            then = f"call {entry.id} left queue {line.name}: {outcome} after {wait:.1f} s"
            self.log.write(line.name, event, call_id=entry.id, then=then, wait=round(wait, 3))

    def survey_answered(self, queue: str | None, score: int, **_: object) -> None:
        """A caller of ``queue`` rated the call ``score`` (the ``survey_answered`` event): today's CSAT."""
        line = self.lines.get(queue) if queue is not None else None
        if line is not None:
            stats = self.today(line)
            stats.surveys += 1
            stats.survey_score_total += score

    def snapshot(self) -> list[QueueSnapshot]:
        """Each queue now: callers, longest wait, agents by state, pending callbacks, today's stats."""
        return [self.queue_snapshot(line) for line in self.lines.values()]

    def queue_snapshot(self, line: Line) -> QueueSnapshot:
        now = time.time()
        callers = [e for e in line.entries if not e.callback]
        messages = [e for e in line.entries if e.message is not None]
        agents = dict.fromkeys(AGENT_STATES, 0)
        for member in line.members.values():
            agents[self.agents.state(member)] += 1
        return QueueSnapshot(
            name=line.name,
            callers=len(callers),
            longest_wait=max((now - e.entered for e in callers), default=0.0),
            agents=agents,
            callbacks_pending=len(line.entries) - len(callers),
            stats=self.today(line),
            voicemail_pending=len(messages),
            voicemail_overdue=sum(1 for e in messages if is_overdue(self.config(), e, now)),
        )
