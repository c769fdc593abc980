"""Which agent a queue rings next: one pure function per strategy.

Each takes the agents that may be rung now (free, not yet tried for this
caller), the queue's member order, and what the strategy looks at; it
returns the one agent to ring. Ties go to the agent listed first. ``ringall``
rings every free agent and needs no choice, so it is not here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence


def linear(candidates: Sequence[str], order: Sequence[str]) -> str:
    """The first candidate in the queue's ``agents`` list, every time."""
    return min(candidates, key=order.index)


def round_robin(candidates: Sequence[str], order: Sequence[str], last: str | None) -> str:
    """The first candidate after ``last`` (the agent rung last) in member
    order, wrapping around; from the top when ``last`` is no member."""
    after = order.index(last) if last in order else -1
    return min(candidates, key=lambda agent: (order.index(agent) - after - 1) % len(order))


def longest_idle(candidates: Sequence[str], order: Sequence[str], idle_since: Mapping[str, float]) -> str:
    """The candidate whose last queue call ended longest ago; one who has
    had none counts as idle since the beginning of time."""
    return min(candidates, key=lambda agent: (idle_since.get(agent, 0.0), order.index(agent)))


def fewest_calls(candidates: Sequence[str], order: Sequence[str], calls: Mapping[str, int]) -> str:
    """The candidate who has answered the fewest of the queue's calls today."""
    return min(candidates, key=lambda agent: (calls.get(agent, 0), order.index(agent)))


def random_agent(candidates: Sequence[str], choose: Callable[[Sequence[str]], str] = random.choice) -> str:
    """Any candidate, by ``choose`` (``random.choice``; tests pass their own)."""
    return choose(candidates)
