"""Music on hold: one looping stream per class, shared by every caller waiting on it.

A class is a folder ``<sounds dir>/moh/<class>/``; its sound files, in file
name order, make one loop. Like a radio station, a class has one position in
that loop, which moves on by one 20 ms frame per tick of the process's
``MediaClock`` while anyone listens, and every listener gets the frame at that
position, in its own codec, through ``RelaySide.send_frame``. So a class costs
one clock callback however many callers hold (STYLE §4: no player per call),
and a caller who joins late hears the music from where it is.

The frames come from the ``PromptLibrary`` (decoded in its worker threads),
once per class and codec; every listener shares the same ``bytes`` objects.

An announcement played to a listener with ``side.play()`` takes precedence:
the class passes that listener over until the announcement has ended, then
the music carries on in the same RTP stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pbx.media.clock import ClockSubscription, MediaClock
from pbx.media.playback import Playback
from pbx.media.prompts import AUDIO_RATE, FRAME_MS, PromptLibrary, PromptNotFound
from pbx.media.relay_side import RelaySide
from pbx.tasks import Shared

logger = logging.getLogger(__name__)

MOH_DIR = "moh"
"""The folder under the sounds folder that holds one folder per class."""

Music = tuple[bytes, ...]
"""The 20 ms frames of a class in one codec, in loop order."""


class MusicOnHold:
    """Music-on-hold classes: one looping stream per class, shared by every listener."""

    def __init__(self, clock: MediaClock, prompts: Callable[[], PromptLibrary]) -> None:
        """``prompts`` returns the current library, so a reload's new sounds folder counts."""
        self._clock = clock
        self._prompts = prompts
        self._streams: dict[str, _Stream] = {}
        # The latest join() of each side still loading: a leave() or a later
        # join() meanwhile makes it give up.
        self._joining: dict[RelaySide, object] = {}
        self._library: PromptLibrary | None = None  # the one _music was loaded from
        self._music: dict[tuple[str, str], Music] = {}
        self._loading = Shared()  # classes being loaded, by (library, class, codec)

    async def join(self, moh_class: str, side: RelaySide, codec: str) -> None:
        """Start sending the music of ``moh_class`` to ``side``, from where the class is now.

        ``codec`` is the side's negotiated codec name (PCMU, PCMA or G722).
        The class is loaded on its first use with that codec. A side that
        listens to another class moves over once this one is ready. An unknown
        class, an empty folder or another codec logs a warning and leaves the
        side in silence; nothing is raised.
        """
        token = object()
        self._joining[side] = token
        try:
            music = await self._load_class(moh_class, codec.upper())
        finally:
            current = self._joining.get(side) is token
            if current:
                del self._joining[side]
        if not current:
            return  # left, or joined elsewhere, while this class was loading
        for other in self._streams.values():
            if other.name != moh_class or not music or side.closed:
                other.remove(side)
        if not music or side.closed:
            return
        stream = self._streams.get(moh_class)
        if stream is None:
            stream = self._streams[moh_class] = _Stream(moh_class, self._clock)
        stream.add(_Listener(side, music))

    def leave(self, side: RelaySide) -> None:
        """Stop sending music to ``side`` (also a join still loading); a no-op if not listening."""
        self._joining.pop(side, None)
        for stream in self._streams.values():
            stream.remove(side)

    async def _load_class(self, moh_class: str, codec: str) -> Music:
        """The frames of ``moh_class`` in ``codec``, loaded once; empty when there are none."""
        if codec not in AUDIO_RATE:
            logger.warning("music on hold %s: no encoder for %s; the caller hears silence", moh_class, codec)
            return ()
        library = self._prompts()
        if library is not self._library:
            # A reload brought another sounds folder: later joins load from it,
            # while callers already listening keep the frames they have.
            self._library = library
            self._music.clear()
        music = self._music.get((moh_class, codec))
        if music is not None:
            return music
        # A joiner that is cancelled (its caller hung up) leaves the load to the others.
        return await self._loading.run((library, moh_class, codec), lambda: self._load(library, moh_class, codec))

    async def _load(self, library: PromptLibrary, moh_class: str, codec: str) -> Music:
        """Decode every sound file of the class into one loop (warns when there is nothing)."""
        folder = library.sounds_dir / MOH_DIR / moh_class
        try:
            names = await asyncio.get_running_loop().run_in_executor(None, _sound_names, library, moh_class)
        except OSError as exc:
            logger.warning("music on hold %s: cannot read %s: %s; callers on it hear silence", moh_class, folder, exc)
            return ()
        if names is None:
            logger.warning("music on hold %s: no folder %s; callers on it hear silence", moh_class, folder)
            return ()
        frames: list[bytes] = []
        for name in names:
            try:
                frames += await library.frames(name, codec)
            except PromptNotFound as exc:  # one unreadable file does not silence the class
                logger.warning("music on hold %s: skipping %s: %s", moh_class, name, exc)
        if not frames:
            logger.warning("music on hold %s: no playable sound file in %s; callers on it hear silence", moh_class, folder)
            return ()
        music = tuple(frames)
        if library is self._library:
            # Only a class that has music is kept: an empty one may be filled later.
            self._music[(moh_class, codec)] = music
        seconds = len(music) * FRAME_MS / 1000
        logger.info("music on hold %s loaded for %s: %d files, %.1f s", moh_class, codec, len(names), seconds)
        return music


@dataclass(eq=False, slots=True)
class _Listener:
    """One side listening to a class, with the frames of its codec."""

    side: RelaySide
    music: Music
    announcement: Playback | None = None  # the last one seen playing to the side
    announcement_over: bool = False  # its done callback has run

    def waits(self) -> bool:
        """True while an announcement to the side has the floor.

        The side's own clock callback may run before the class's in a tick
        and end its announcement there, so the peer already has that tick's
        frame: music resumes from the next tick, which ``done``'s callback
        (run between ticks) tells.
        """
        playback = self.side.playback
        if playback is not None:
            if playback is not self.announcement:
                self.announcement = playback
                self.announcement_over = False
                playback.done.add_done_callback(partial(self._ended, playback))
            return True
        if self.announcement is None:
            return False
        if not self.announcement_over:
            return True
        self.announcement = None
        return False

    def _ended(self, playback: Playback, _: asyncio.Future[bool]) -> None:
        if playback is self.announcement:
            self.announcement_over = True


class _Stream:
    """The one looping stream of a class and the sides listening to it."""

    def __init__(self, name: str, clock: MediaClock) -> None:
        self.name = name
        self.position = 0  # in the loop, of the frame the next tick sends
        self.listeners: dict[RelaySide, _Listener] = {}
        self._clock = clock
        self._subscription: ClockSubscription | None = None

    def add(self, listener: _Listener) -> None:
        """Send to ``listener.side`` from the next tick (replacing its earlier listener)."""
        self.listeners[listener.side] = listener
        if self._subscription is None:
            self._subscription = self._clock.subscribe(self._tick)

    def remove(self, side: RelaySide) -> None:
        """Stop sending to ``side``; the last one out stops the class's clock callback."""
        self.listeners.pop(side, None)
        if not self.listeners and self._subscription is not None:
            self._clock.unsubscribe(self._subscription)
            self._subscription = None

    def _tick(self, tick: int) -> None:
        """Send every listener the frame at the class's position: the per-packet path."""
        position = self.position
        self.position = position + 1
        # A copy: closed and failing sides are dropped along the way.
        for side, listener in tuple(self.listeners.items()):
            if side.closed:
                self.remove(side)
                continue
            if listener.waits():
                continue
            music = listener.music
            try:
                side.send_frame(music[position % len(music)], tick)
            except Exception:
                # Dropped rather than retried, so a broken side logs one
                # traceback instead of fifty a second; the others play on.
                logger.exception("music on hold %s: relay side %s failed; it gets no more music", self.name, side.name)
                self.remove(side)


def _sound_names(library: PromptLibrary, moh_class: str) -> list[str] | None:
    """Sound names of the class's files in file name order; None: no such class (blocking)."""
    if not moh_class or moh_class in (".", "..") or any(c in moh_class for c in "/\\\0"):
        return None  # would name a folder outside moh/
    folder = library.sounds_dir / MOH_DIR / moh_class
    if not folder.is_dir():
        return None
    names: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda path: path.name):
        name = f"{MOH_DIR}/{moh_class}/{entry.stem}"
        # exists() leaves out hidden and non-audio files (a README); one
        # name covers calm.wav and calm.mp3, of which the library picks one.
        if not entry.name.startswith(".") and name not in names and entry.is_file() and library.exists(name):
            names.append(name)
    return names
