"""Domain events: services announce what happened, observers (metrics, logs) react.

Keeps counters and gauges out of business logic (STYLE §8): a service calls
``events.emit("call_ended", direction="internal", disposition="answered")`` and
never imports prometheus.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Listener = Callable[..., None]


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
