"""What a queue holds: its line of entries ordered by arrival (callers on the
phone, and callbacks keeping the arrival time of the call that asked for
them), its members, and today's figures.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pbx.calls.model import Call
from pbx.config.model import Queue

HANDLE_TIME_HISTORY = 20  # recent calls the expected wait is computed from


@dataclass
class Member:
    """An agent as a member of one queue."""

    extension: str
    logged_in: bool = True
    paused: bool = False
    misses: int = 0  # offers not answered in a row
    calls: int = 0  # queue calls answered today (fewest-calls)

    def apply(self, action: str) -> None:
        """login, logout, pause or unpause; each starts the count of misses over."""
        if action in ("login", "logout"):
            self.logged_in = action == "login"
            self.misses = 0
        elif action in ("pause", "unpause"):
            self.paused = action == "pause"
            self.misses = 0


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
    message: str | None = None  # voicemail work: the message's id (a callback that plays it to the agent first)
    mailbox: str | None = None  # voicemail work: the mailbox it was left in

    @classmethod
    def pending_callback(cls, row: Mapping[str, Any]) -> Entry:
        """The place in line of a pending ``callbacks`` row (with ``mailbox`` when the query joined it)."""
        return cls(
            id=row["id"],
            number=row["number"],
            entered=row["entered"],
            callback=True,
            attempts=row["attempts"],
            next_attempt=row["next_attempt"],
            message=row.get("message"),
            mailbox=row.get("mailbox"),
        )


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
    surveys: int = 0  # scores callers gave in the queue's survey today
    survey_score_total: int = 0

    @property
    def service_level(self) -> float | None:
        return self.answered_in_service_level / self.answered if self.answered else None

    @property
    def average_speed_of_answer(self) -> float | None:
        return self.answer_wait_total / self.answered if self.answered else None

    @property
    def csat(self) -> float | None:
        """Today's average survey score (customer satisfaction), None before the first."""
        return self.survey_score_total / self.surveys if self.surveys else None


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

    def has_callback(self, number: str) -> bool:
        return any(e.callback and e.number == number for e in self.entries)


class Lines(dict[str, Line]):
    """Every queue's line, by queue name: one dict the parts of the queue service share."""

    def sync(self, queues: Mapping[str, Queue]) -> None:
        """Lines and members as the configuration (maybe just reloaded) has them."""
        for name, queue in queues.items():
            line = self.setdefault(name, Line(name))
            line.members = {ext: line.members.get(ext) or Member(ext) for ext in queue.agents}

    def member(self, queue: str, extension: str) -> Member | None:
        line = self.get(queue)
        return line.members.get(extension) if line else None

    def wake_all(self) -> None:
        for line in self.values():
            line.wake.set()
