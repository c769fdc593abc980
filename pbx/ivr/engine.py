"""Walks one caller through an IVR flow (CONTRACT §3) until it reaches a destination.

The engine only decides; what the caller hears and presses goes through a
:class:`Caller`, so the same walk serves a phone call (``pbx.ivr.audio``) and a
scripted caller in unit tests. A session keeps the flow version it started
with: a reload swaps the server's flows, never a running session's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import aiohttp

from pbx.config.model import Destination
from pbx.events import EventBus
from pbx.ivr.nodes import (
    BranchNode,
    CollectNode,
    Flow,
    GotoNode,
    HangupNode,
    HoursNode,
    HttpNode,
    MenuNode,
    PlayNode,
    Prompt,
    RateNode,
    SetNode,
    Target,
    expand,
)

logger = logging.getLogger(__name__)

HANGUP = Destination("hangup", "")
# Node visits without the caller hearing or pressing anything; past this a
# flow is looping on itself (goto -> set -> goto ...) and the call is ended.
MAX_SILENT_STEPS = 200


class Caller(Protocol):
    """What the engine needs from the person on the line."""

    async def play(self, parts: Sequence[str], *, interruptible: bool) -> str | None:
        """Play the prompt parts in order; with ``interruptible``, a key pressed
        meanwhile stops playback and is returned (barge-in)."""

    async def digit(self, timeout: float) -> str | None:
        """The next key pressed within ``timeout`` seconds, or None."""

    def flush(self) -> None:
        """Forget keys pressed so far."""


class IvrSession:
    """One caller's walk through the flows as they were when the call arrived."""

    def __init__(
        self,
        flows: Mapping[str, Flow],
        start: str,
        caller: Caller,
        *,
        variables: Mapping[str, str],
        timezone: str,
        http: aiohttp.ClientSession,
        events: EventBus,
        available: Callable[[Destination], bool] = lambda d: True,
        now: Callable[[ZoneInfo], datetime] = datetime.now,
        rated: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """``rated(score)``: what a rate node's score is for (stored as the
        call's survey score) before the flow goes on; None: only logged."""
        self.flows = flows
        self.flow = flows[start]
        self.caller = caller
        self.vars: dict[str, str] = dict(variables)
        self.tz = ZoneInfo(timezone)
        self.http = http
        self.events = events
        self.available = available
        self.now = now
        self.rated = rated

    async def run(self) -> Destination:
        """Walk the flow; return where the call goes next (``hangup`` included)."""
        node_id = self.flow.start
        silent = 0
        while True:
            node = self.flow.nodes[node_id]
            logger.debug("ivr %s: %s", self.flow.name, node.id)
            self.events.emit("ivr_node_visit", flow=self.flow.name, node=node.id)
            if isinstance(node, HangupNode):
                return HANGUP
            target, interacted = await self._step(node)
            silent = 0 if interacted else silent + 1
            if silent > MAX_SILENT_STEPS:
                logger.error("flow %s loops without talking to the caller at node %s; hanging up", self.flow.name, node.id)
                return HANGUP
            target = self._usable(target, node)
            if isinstance(target, Destination):
                if target.kind != "ivr":
                    return target
                self.flow = self.flows[target.target]
                node_id = self.flow.start
            else:
                node_id = target

    def _usable(self, target: Target, node: object) -> Target:
        """A destination that cannot be served yet falls back to the node's on_fail."""
        if not isinstance(target, Destination) or target.kind == "ivr" or self.available(target):
            return target
        fallback = getattr(node, "on_fail", None)
        logger.warning(
            "flow %s: %s is not available on this server yet; taking %s",
            self.flow.name, target, fallback if fallback is not None else "hangup",
        )  # fmt: skip
        if fallback is None or fallback == target:
            return HANGUP
        return fallback  # type: ignore[no-any-return]

    async def _step(self, node: object) -> tuple[Target, bool]:
        """Carry out one node; return the next target and whether the caller was involved."""
        if isinstance(node, PlayNode):
            await self.caller.play(self._parts(node.prompt), interruptible=False)
            return node.next, True
        if isinstance(node, MenuNode):
            return await self._menu(node), True
        if isinstance(node, CollectNode):
            return await self._collect(node), True
        if isinstance(node, RateNode):
            return await self._rate(node), True
        if isinstance(node, HoursNode):
            now = self.now(self.tz)
            is_open = now.date() not in node.holidays and node.open.is_open(now)
            return (node.if_open if is_open else node.if_closed), False
        if isinstance(node, BranchNode):
            return node.cases.get(self.vars.get(node.var, ""), node.default), False
        if isinstance(node, SetNode):
            for name, template in node.values.items():
                self.vars[name] = expand(template, self.vars)
            return node.next, False
        if isinstance(node, HttpNode):
            return await self._http(node), True
        if isinstance(node, GotoNode):
            return node.target, False
        raise TypeError(f"unknown node type {type(node).__name__}")

    def _parts(self, prompt: Prompt) -> list[str]:
        return [expand(part, self.vars) for part in prompt.parts]

    async def _menu(self, node: MenuNode) -> Target:
        key = await self._ask(node, lambda key: key in node.options, "an option")
        if key is None:
            return node.on_fail if node.on_fail is not None else HANGUP
        return node.options[key]

    async def _rate(self, node: RateNode) -> Target:
        key = await self._ask(node, lambda key: node.score(key) is not None, "a score")
        score = node.score(key) if key is not None else None
        if score is None:
            return node.on_fail if node.on_fail is not None else HANGUP
        logger.info("flow %s %s: the caller rated %d", self.flow.name, node.id, score)
        if self.rated is not None:
            await self.rated(score)
        return node.next

    async def _ask(self, node: MenuNode | RateNode, fits: Callable[[str], bool], what: str) -> str | None:
        """Play ``node``'s prompt and wait for a key that ``fits``; replay on no
        or a wrong key (after ``invalid``) ``retries`` times; None when none came."""
        key: str | None = None  # a key pressed during the invalid prompt is the next try
        for _ in range(1 + node.retries):
            if key is None:
                self.caller.flush()
                key = await self.caller.play(self._parts(node.prompt), interruptible=True)
            if key is None:
                key = await self.caller.digit(node.timeout)
            if key is None:
                continue
            if fits(key):
                return key
            logger.info("flow %s %s: key %s is not %s", self.flow.name, node.id, key, what)
            key = None
            if node.invalid is not None:
                key = await self.caller.play(self._parts(node.invalid), interruptible=True)
        return None

    async def _collect(self, node: CollectNode) -> Target:
        self.caller.flush()
        keys = await read_digits(self.caller, self._parts(node.prompt), node.max_digits, node.terminator, node.timeout)
        self.vars[node.var] = keys
        if not keys and node.on_fail is not None:
            return node.on_fail
        return node.next

    async def _http(self, node: HttpNode) -> Target:
        quoted = {k: urllib.parse.quote(v, safe="") for k, v in self.vars.items()}
        url = expand(node.url, quoted)
        try:
            async with asyncio.timeout(node.timeout):
                async with self.http.request(node.method, url) as response:
                    response.raise_for_status()
                    reply = json.loads(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.warning("flow %s node %s: %s %s failed: %s", self.flow.name, node.id, node.method, url, exc or "timeout")
            return node.on_error
        if not isinstance(reply, dict):
            logger.warning("flow %s node %s: %s did not answer a JSON object", self.flow.name, node.id, url)
            return node.on_error
        for name, value in reply.items():
            self.vars[str(name)] = _text(value)
        return node.next


async def read_digits(caller: Caller, prompt: Sequence[str], max_digits: int, terminator: str | None, timeout: float) -> str:
    """Keys pressed after (or during) ``prompt`` until ``terminator``, ``max_digits``
    keys, or ``timeout`` seconds without a key; the terminator is not included.
    Keys pressed before the prompt count (type-ahead)."""
    keys = ""
    key = await caller.play(prompt, interruptible=True)
    while True:
        if key is None:
            key = await caller.digit(timeout)
        if key is None or key == terminator:
            return keys
        keys += key
        if len(keys) >= max_digits:
            return keys
        key = None


def _text(value: object) -> str:
    """A JSON value as a flow variable: true/false in lower case, null as empty."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
