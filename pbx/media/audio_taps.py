"""Several listeners on the audio a relay side's peer sends.

A side has one ``on_audio`` listener (:class:`pbx.media.relay_side.RelaySide`),
which the hot path calls and the relay process asks about (a listened-to
side has every packet shown to the server). A recording and a supervisor
listening in (pbx.calls.monitor) may both want a side's audio at once: each
adds its listener with :func:`listen` and takes it away with
:func:`unlisten`, and the side's one listener calls them all, in the order
they came. Nobody has to know who else listens.
"""

from __future__ import annotations

from collections.abc import Callable

from pbx.media.relay_side import RelaySide

AudioListener = Callable[[bytes, int], None]  # (payload, payload type)


class _Listeners:
    """The one ``on_audio`` of a side that more than one listens to."""

    __slots__ = ("listeners",)

    def __init__(self, listeners: tuple[AudioListener, ...]) -> None:
        self.listeners = listeners

    def __call__(self, payload: bytes, payload_type: int) -> None:
        for listener in self.listeners:
            listener(payload, payload_type)


def listen(side: RelaySide, listener: AudioListener) -> None:
    """Tell ``listener`` of every audio packet ``side``'s peer sends, besides whoever is told already."""
    current = side.on_audio
    if current is None:
        side.on_audio = listener
    elif isinstance(current, _Listeners):
        side.on_audio = _Listeners((*current.listeners, listener))
    else:
        side.on_audio = _Listeners((current, listener))


def unlisten(side: RelaySide, listener: AudioListener) -> None:
    """Stop telling ``listener``; the others go on. A no-op when it does not listen."""
    current = side.on_audio
    if current == listener:  # == : a bound method is a new object at each access
        side.on_audio = None
    elif isinstance(current, _Listeners):
        rest = tuple(other for other in current.listeners if other != listener)
        if len(rest) != len(current.listeners):
            side.on_audio = rest[0] if len(rest) == 1 else _Listeners(rest)
