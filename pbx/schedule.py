"""Opening hours, as IVR `hours` nodes and queue callback hours write them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()


@dataclass(frozen=True)
class TimeWindow:
    """Open on weekday ``day`` (0 = Monday) from minute ``start`` up to, not including, minute ``end``."""

    day: int
    start: int  # minutes after midnight
    end: int  # 1..1440


@dataclass(frozen=True)
class Schedule:
    """Opening hours, written like ``mon-fri 09:00-12:30; mon-thu 13:30-17:00; sat 10:00-12:00``."""

    windows: tuple[TimeWindow, ...]
    text: str = field(default="", compare=False)  # as written, for display

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (already in the configured time zone) falls in a window; ends are exclusive."""
        day, minute = when.weekday(), when.hour * 60 + when.minute
        return any(w.day == day and w.start <= minute < w.end for w in self.windows)

    def __str__(self) -> str:
        return self.text


_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})")
_SCHEDULE_EXAMPLE = "like 'mon-fri 09:00-17:00; sat 10:00-12:00'"


def parse_schedule(text: str) -> Schedule:
    """Parse opening hours; raise ValueError saying what is wrong.

    Entries are separated by ``;`` or ``,``; each is ``[DAYS] HH:MM-HH:MM ...``
    where DAYS is a day (``mon`` .. ``sun``) or a range of them (``mon-fri``;
    ``fri-mon`` wraps around the week), every day when left out. Times are 24h;
    an end must be after its start, ``24:00`` being the end of the day.
    """
    windows: list[TimeWindow] = []
    entries = [entry.strip() for entry in re.split(r"[;,]", text)]
    if not any(entries):
        raise ValueError(f"opening hours are empty: write them {_SCHEDULE_EXAMPLE}")
    for entry in filter(None, entries):
        tokens = re.sub(r"\s*-\s*", "-", entry).split()
        days: list[int] | None = None
        spans: list[tuple[int, int]] = []
        for token in tokens:
            if any(c.isdigit() for c in token):
                spans.append(_parse_span(token, entry))
            elif days is None and not spans:
                days = _parse_days(token, entry)
            else:
                raise ValueError(f"{token!r} in {entry!r}: write the days first, then times ({_SCHEDULE_EXAMPLE})")
        if not spans:
            raise ValueError(f"{entry!r} has no time range like 09:00-17:00 (entries are separated by ';' or ',')")
        for day in range(7) if days is None else days:
            windows.extend(TimeWindow(day, start, end) for start, end in spans)
    return Schedule(tuple(windows), text)


def _parse_days(token: str, entry: str) -> list[int]:
    first, dash, last = token.lower().partition("-")
    names = [first, last] if dash else [first]
    for name in names:
        if name not in DAYS:
            raise ValueError(f"unknown day {name!r} in {entry!r}: use {', '.join(DAYS)}")
    start = DAYS.index(names[0])
    length = (DAYS.index(names[-1]) - start) % 7 + 1
    return [(start + i) % 7 for i in range(length)]


def _parse_span(token: str, entry: str) -> tuple[int, int]:
    first, dash, last = token.partition("-")
    if not dash:
        raise ValueError(f"{token!r} in {entry!r} is not a time range like 09:00-17:00")
    start, end = _parse_time(first, entry), _parse_time(last, entry)
    if start == 24 * 60:
        raise ValueError(f"{token!r} in {entry!r}: a range cannot start at 24:00")
    if end <= start:
        raise ValueError(
            f"{token!r} in {entry!r}: the end must be after the start"
            " (split a range past midnight, like 'fri 22:00-24:00; sat 00:00-02:00')"
        )
    return start, end


def _parse_time(text: str, entry: str) -> int:
    match = _TIME.fullmatch(text)
    if match:
        hours, minutes = int(match[1]), int(match[2])
        if (hours < 24 and minutes < 60) or (hours, minutes) == (24, 0):
            return hours * 60 + minutes
    raise ValueError(f"bad time {text!r} in {entry!r}: use HH:MM from 00:00 to 24:00")
