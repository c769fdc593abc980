"""Hold in a bridged call, answered by the server as Asterisk does.

A party holds with a re-INVITE offering sendonly or inactive audio, or no
address (``c=0.0.0.0``, RFC 3264 §8.4; Asterisk takes the same three for a
hold). The relay anchors both parties' media, so the server answers that
re-INVITE itself and the other party is not re-INVITEd: it goes on
receiving one RTP stream from the relay, in which the call's music-on-hold
class (:mod:`pbx.media.moh`) now plays (silence until the class is loaded,
or without one), while the relay holds back what the holder sends (a phone
on hold may keep sending its microphone). The holder resuming stops the
music, and relaying continues in that same stream.

What the listener goes on sending still reaches the holder, whose phone
ignores it as its SDP said; a recording keeps it, as Asterisk's does.
"""

from __future__ import annotations

import asyncio
import logging

from pbx.media.moh import MusicOnHold
from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)

DEFAULT_MOH_CLASS = "default"
"""The class a call hears unless a queue's agent took it (then the queue's ``moh``)."""

HOLDING = ("sendonly", "inactive")
"""The directions a party offers to hold (with no address, any direction holds)."""


class Hold:
    """Who holds in one call, and the music each holder's other party hears meanwhile."""

    def __init__(self) -> None:
        # Relay side -> the direction its peer last offered, while not plain sendrecv.
        self._offered: dict[RelaySide, str] = {}
        # Listener side -> the music it joined and that join, while its other party holds.
        self._music: dict[RelaySide, tuple[MusicOnHold, asyncio.Task[None]] | None] = {}

    @property
    def on(self) -> bool:
        """Whether a peer's last offer was anything but sendrecv to an address: it
        may send nothing for a long time (``rtp.hold_timeout`` applies)."""
        return bool(self._offered)

    def direction(self, side: RelaySide) -> str:
        """The direction ``side``'s peer offered last."""
        return self._offered.get(side, "sendrecv")

    def offered(self, side: RelaySide, direction: str, *, bridged: bool, music: MusicOnHold | None, moh_class: str) -> None:
        """``side``'s peer offered ``direction`` in a re-INVITE (``side`` already
        points at its address). Bridged, a hold starts or ends there: the other
        side's peer hears ``moh_class`` from ``music`` (silence without it) instead
        of the holder, until the holder offers to receive again."""
        if direction == "sendrecv" and not side.held:
            self._offered.pop(side, None)
        else:
            self._offered[side] = direction
        if not bridged:
            return
        holds = direction in HOLDING or side.held
        listener = side.other
        if holds and listener not in self._music:
            listener.start_filling()
            self._music[listener] = self._join(music, moh_class, listener)
        elif not holds and listener in self._music:
            self._stop(listener)

    def end(self) -> None:
        """The call ends: no more music to anyone."""
        for listener in list(self._music):
            self._stop(listener)

    def _join(self, music: MusicOnHold | None, moh_class: str, listener: RelaySide) -> tuple[MusicOnHold, asyncio.Task[None]] | None:
        codec = listener.codec
        if music is None or codec is None:
            return None
        joining = asyncio.ensure_future(music.join(moh_class, listener, codec.name))
        joining.add_done_callback(_report)
        return music, joining

    def _stop(self, listener: RelaySide) -> None:
        joined = self._music.pop(listener)
        if joined is not None:
            music, joining = joined
            music.leave(listener)  # also makes a join still loading give up
            joining.cancel()
        listener.hand_over()


def _report(joining: asyncio.Task[None]) -> None:
    if not joining.cancelled() and joining.exception() is not None:
        logger.error("music on hold failed to start", exc_info=joining.exception())
