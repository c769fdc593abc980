"""Each queue strategy on its own: which agent it rings, given the free
agents not yet tried, the queue's member order and what it looks at."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pbx.queues import strategies

ORDER = ["1001", "1002", "1003", "1004"]


def test_linear_always_rings_the_first_free_agent_in_the_list() -> None:
    assert strategies.linear(["1003", "1002", "1004"], ORDER) == "1002"
    assert strategies.linear(["1004"], ORDER) == "1004"


@pytest.mark.parametrize(
    ("candidates", "last", "rung"),
    [
        (ORDER, None, "1001"),  # nobody rung yet: from the top
        (ORDER, "1001", "1002"),
        (ORDER, "1004", "1001"),  # wraps around
        (["1001", "1002"], "1002", "1001"),  # 1003 and 1004 busy: on past them to the top
        (["1002", "1004"], "1002", "1004"),  # the last one rung is free but comes last
        (ORDER, "9999", "1001"),  # the last agent left the queue
    ],
)
def test_round_robin_goes_on_after_the_agent_rung_last(candidates: Sequence[str], last: str | None, rung: str) -> None:
    assert strategies.round_robin(candidates, ORDER, last) == rung


def test_longest_idle_rings_whoever_finished_a_call_longest_ago() -> None:
    idle_since = {"1001": 300.0, "1002": 100.0, "1003": 200.0}
    assert strategies.longest_idle(["1001", "1002", "1003"], ORDER, idle_since) == "1002"
    # 1004 has had no call yet: idle the longest of all.
    assert strategies.longest_idle(ORDER, ORDER, idle_since) == "1004"
    # A tie goes to the agent listed first.
    assert strategies.longest_idle(["1003", "1001"], ORDER, {}) == "1001"


def test_fewest_calls_rings_whoever_answered_fewest_today() -> None:
    calls = {"1001": 5, "1002": 2, "1003": 2, "1004": 7}
    assert strategies.fewest_calls(ORDER, ORDER, calls) == "1002"  # tie with 1003: listed first
    assert strategies.fewest_calls(["1001", "1004"], ORDER, calls) == "1001"
    assert strategies.fewest_calls(["1004", "1003"], ORDER, {}) == "1003"


def test_random_leaves_the_choice_to_its_chooser_among_the_candidates_only() -> None:
    seen: list[Sequence[str]] = []

    def last(options: Sequence[str]) -> str:
        seen.append(options)
        return options[-1]

    assert strategies.random_agent(["1002", "1003"], last) == "1003"
    assert seen == [["1002", "1003"]]
    assert all(strategies.random_agent(["1002", "1004"]) in ("1002", "1004") for _ in range(50))
