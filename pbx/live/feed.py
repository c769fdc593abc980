"""The public event feed: what happened, as the JSON events CRMs, webhooks
and the wallboard follow.

Services announce domain events on the pbx.events.EventBus, as they do for
metrics; :class:`EventFeed` turns the ones a CRM cares about into events of
the types in :data:`pbx.events.EVENT_TYPES` and hands each to its listeners (the
``/api/events`` WebSockets, pbx.live.webhooks). Every event has ``type``,
``id`` (a sequence number, rising by one: a gap tells a listener it missed
some) and ``time`` (ISO 8601, UTC), then the fields of its type. Listening
never slows a call: a listener only queues the event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pbx.events import EventBus
from pbx.store.db import iso_time

logger = logging.getLogger(__name__)

Event = dict[str, Any]
Listener = Callable[[Event], None]


# Domain event -> public type, for the events whose fields go out as they are.
_SAME_FIELDS = {
    "call_answered": "call.answered",
    "call_transferred": "call.transferred",
    "queue_joined": "queue.joined",
    "queue_caller_left": "queue.left",
    "agent_state": "agent.state",
    "voicemail_left": "voicemail.left",
    "recording_saved": "recording.ready",
    "survey_answered": "survey.answered",
}
# The callback event's outcomes: requested and dialed have their own type; the others end it.
_CALLBACK_TYPES = {"requested": "callback.requested", "dialed": "callback.dialed"}


class EventFeed:
    """Domain events in, public events out to every listener."""

    def __init__(self, events: EventBus) -> None:
        self._listeners: list[Listener] = []
        self._last_id = 0
        for name, kind in _SAME_FIELDS.items():
            events.subscribe(name, self._forward(kind))
        events.subscribe("call_started", self._call_started)
        events.subscribe("call_ended", self._call_ended)
        events.subscribe("callback", self._callback)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Hand every event from now on to ``listener``; returns what stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def publish(self, kind: str, **fields: Any) -> None:
        self._last_id += 1
        event: Event = {"type": kind, "id": self._last_id, "time": iso_time(time.time())}
        event.update((key, value) for key, value in fields.items() if key not in event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("listener of the event feed failed on %s", kind)

    def _forward(self, kind: str) -> Callable[..., None]:
        return lambda **fields: self.publish(kind, **fields)

    def _call_started(self, call_id: str, direction: str, from_: str = "", to: str = "", **_: object) -> None:
        self.publish("call.started", call_id=call_id, direction=direction, **{"from": from_, "to": to})

    def _call_ended(self, call_id: str, direction: str, disposition: str, cdr: dict[str, Any] | None = None, **_: object) -> None:
        self.publish("call.ended", call_id=call_id, direction=direction, disposition=disposition, cdr=cdr)

    def _callback(self, outcome: str, **fields: Any) -> None:
        kind = _CALLBACK_TYPES.get(outcome, "callback.done")
        self.publish(kind, outcome=outcome, **fields)
