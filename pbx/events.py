"""Domain events: services announce what happened, observers (metrics, logs) react.

Keeps counters and gauges out of business logic (STYLE §8): a service calls
``events.emit("call_ended", direction="internal", disposition="answered")`` and
never imports prometheus.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Listener = Callable[..., None]

# What CRMs, webhooks and the wallboard follow (pbx.live.feed makes them of the domain events).
EVENT_TYPES = (
    "call.started",
    "call.answered",
    "call.transferred",
    "call.ended",
    "queue.joined",
    "queue.left",
    "agent.state",
    "callback.requested",
    "callback.dialed",
    "callback.done",
    "voicemail.left",
    "recording.ready",
    "survey.answered",
)


class EventBus:
    """Synchronous publish/subscribe by event name."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = defaultdict(list)

    def subscribe(self, name: str, listener: Listener) -> None:
        self._listeners[name].append(listener)

    def emit(self, name: str, **fields: Any) -> None:
        for listener in self._listeners.get(name, ()):
            try:
                listener(**fields)
            except Exception:
                logger.exception("listener for %s failed", name)


def logfmt(value: object) -> str:
    """One value of a ``key=value`` log line: floats get one decimal; values
    with spaces, quotes or ``=`` are double-quoted, so the line splits on spaces."""
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    # JSON string escaping: a Call-ID or caller name from the wire cannot break the line.
    return json.dumps(text, ensure_ascii=False)


_NEEDS_QUOTES = re.compile(r'[\s"=\\]|[^\x21-\x7e]')
