"""Music on hold: one looping stream per class, shared by every caller waiting on it.

A class is a folder ``<sounds dir>/moh/<class>/``; its sound files, in file
name order, make one loop. Like a radio station, a class has one position in
that loop: from the tick of the process's ``MediaClock`` at which its first
listener joined, it moves on by one 20 ms frame per tick, and every listener
gets the frame at that position, in its own codec. A listener's relay side
picks that frame itself in its own clock callback (``RelaySide.tune_in``),
the one in which it also sends its prompts and its silence, so nothing here
runs per tick and a side never sends two frames in one tick. A caller who
joins late hears the music from where it is.

The frames come from the ``PromptLibrary`` (decoded in its worker threads),
once per class and codec; every listener shares the same ``bytes`` objects.

An announcement played to a listener with ``side.play()`` takes precedence:
the music carries on under it, and the listener hears it again, in the same
RTP stream, from the tick after the announcement's last frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pbx.media.clock import MediaClock
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
        self._origins: dict[str, int] = {}  # class -> the clock tick at which its loop began
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
        side without music (in the silence of ``start_filling()`` when the
        server answers it); nothing is raised.
        """
        token, handovers = object(), side.handovers
        self._joining[side] = token
        try:
            music = await self._load_class(moh_class, codec.upper())
        finally:
            current = self._joining.get(side) is token
            if current:
                del self._joining[side]
        if not current or side.handovers != handovers:
            return  # left, joined elsewhere or handed over to a person while this class was loading
        if not music or side.closed:
            side.tune_out()
            return
        side.tune_in(music, self._origins.setdefault(moh_class, self._clock.tick + 1))

    def leave(self, side: RelaySide) -> None:
        """Stop sending music to ``side`` (also a join still loading); a no-op if not listening."""
        self._joining.pop(side, None)
        side.tune_out()

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
