"""The typed IVR flow (CONTRACT §3): its nodes, and the ``{var}`` templates their texts hold.

This is all the engine needs to walk a caller through a flow; reading and
validating flow files is `pbx.ivr.schema` (each node's fields) and
`pbx.ivr.flows` (files, the folder and checks of a whole flow). Everything
here is frozen: a session keeps the flow it started with while a reload swaps
the server's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Final

from pbx.config.model import Destination
from pbx.schedule import Schedule

Target = str | Destination  # a node id of the same flow, or a destination


@dataclass(frozen=True)
class Prompt:
    """What a node plays: sound names (files under ``sounds.dir``) and ``say:TEXT`` parts, in order.

    Parts may hold ``{var}`` placeholders, filled in with `expand` when played.
    """

    parts: tuple[str, ...]


@dataclass(frozen=True)
class PlayNode:
    """Play a prompt, then go on."""

    id: str
    line: int
    prompt: Prompt
    next: Target


@dataclass(frozen=True)
class MenuNode:
    """Play a prompt and go where the key pressed says; replay on no or a wrong key."""

    id: str
    line: int
    prompt: Prompt
    options: Mapping[str, Target]  # DTMF key ("0"-"9", "*", "#") -> target
    timeout: float = 5  # seconds to wait for a key after the prompt
    retries: int = 3  # replays after no or an invalid key
    invalid: Prompt | None = None  # played after a key that is no option
    on_fail: Target | None = None  # after the last retry; None: hang up


@dataclass(frozen=True)
class CollectNode:
    """Read several keys into variable ``var``, up to ``max_digits`` or the terminator."""

    id: str
    line: int
    prompt: Prompt
    var: str
    next: Target
    max_digits: int = 20
    terminator: str = "#"
    timeout: float = 5  # seconds to wait for each key
    on_fail: Target | None = None  # when no key at all was pressed; None: `next` with an empty var


@dataclass(frozen=True)
class RateNode:
    """Ask the caller to rate the call with one key (a post-call survey):
    the key is the score, stored with the call's queue and agent; replay on
    no or a wrong key, like a menu."""

    id: str
    line: int
    prompt: Prompt
    next: Target  # after a score
    keys: range = range(1, 6)  # the scores, one key each: 1-5 by default
    timeout: float = 5  # seconds to wait for a key after the prompt
    retries: int = 3  # replays after no or an invalid key
    invalid: Prompt | None = None  # played after a key that is no score
    on_fail: Target | None = None  # after the last retry; None: hang up

    def score(self, key: str) -> int | None:
        """The score ``key`` gives, or None when it is no score."""
        return int(key) if key.isdigit() and int(key) in self.keys else None


@dataclass(frozen=True)
class HoursNode:
    """Go to ``if_open`` within the schedule and outside holidays, else to ``if_closed``."""

    id: str
    line: int
    open: Schedule
    holidays: frozenset[date]
    if_open: Target  # YAML key "true"
    if_closed: Target  # YAML key "false"

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (already in the configured time zone) is in opening hours."""
        return when.date() not in self.holidays and self.open.is_open(when)


@dataclass(frozen=True)
class BranchNode:
    """Go to the case matching the value of variable ``var``, else to ``default``."""

    id: str
    line: int
    var: str
    cases: Mapping[str, Target]
    default: Target


@dataclass(frozen=True)
class SetNode:
    """Set variables (YAML key ``vars``); values may hold ``{var}`` placeholders."""

    id: str
    line: int
    values: Mapping[str, str]
    next: Target


@dataclass(frozen=True)
class HttpNode:
    """Request ``url`` (placeholders expanded); the fields of a JSON object reply become variables."""

    id: str
    line: int
    url: str
    next: Target
    on_error: Target  # on a network error, timeout, error status or a reply that is no JSON object
    method: str = "GET"
    timeout: float = 2


@dataclass(frozen=True)
class GotoNode:
    """Go to a destination or another node (YAML key ``to``, or ``next``)."""

    id: str
    line: int
    target: Destination | str


@dataclass(frozen=True)
class HangupNode:
    """End the call."""

    id: str
    line: int


Node = PlayNode | MenuNode | CollectNode | RateNode | HoursNode | BranchNode | SetNode | HttpNode | GotoNode | HangupNode


@dataclass(frozen=True)
class Flow:
    """A valid flow; ``name`` is its file name without ``.yaml``."""

    name: str
    path: Path
    start: str
    nodes: Mapping[str, Node]

    def node(self, id: str) -> Node:
        """The node called ``id``; KeyError if there is none."""
        return self.nodes[id]


# --- Placeholders -------------------------------------------------------------

VARIABLE_NAME: Final = r"[A-Za-z_][A-Za-z0-9_]*"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(" + VARIABLE_NAME + r")\}")
_BRACES = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")


def expand(template: str, variables: Mapping[str, str]) -> str:
    """Fill ``{var}`` placeholders from ``variables``; unknown ones become ""; ``{{`` and ``}}`` are braces."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return variables.get(match.group(1), "")

    return _PLACEHOLDER.sub(substitute, template)


def placeholders(template: str) -> list[str]:
    """The variable names ``template`` refers to, in order."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def brace_problem(template: str) -> str | None:
    """What is wrong with the braces in ``template``, or None."""
    for match in _BRACES.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            return f"a lone {token!r} in {template!r} (write {token * 2!r} for a brace)"
        if not re.fullmatch(VARIABLE_NAME, token[1:-1]):
            return f"{token!r} in {template!r} is not a variable name (letters, digits and _)"
    return None

