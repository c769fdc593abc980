"""The caller of an IVR session on a real call: prompts out through the caller's
relay side, keys in from RFC 4733 events or SIP INFO."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pbx.media.playback import Playback
from pbx.media.prompts import PromptLibrary, PromptNotFound
from pbx.media.relay_side import RelaySide

logger = logging.getLogger(__name__)


class CallAudio:
    """Implements :class:`pbx.ivr.engine.Caller` for one call leg."""

    def __init__(self, side: RelaySide, prompts: PromptLibrary, codec: str) -> None:
        self.side = side
        self.prompts = prompts
        self.codec = codec
        self._keys: asyncio.Queue[str] = asyncio.Queue()
        self._playback: Playback | None = None  # the last thing this caller's session played
        side.on_dtmf = self.press

    def press(self, key: str) -> None:
        """A key the caller pressed (from RTP or a SIP INFO)."""
        self._keys.put_nowait(key)

    async def play(self, parts: Sequence[str], *, interruptible: bool) -> str | None:
        for part in parts:
            try:
                frames = await self.prompts.frames(part, self.codec)
            except PromptNotFound as exc:
                logger.error("prompt %s: %s", part, exc)
                continue
            key = await self.play_frames(frames, interruptible=interruptible)
            if key is not None:
                return key
        return None

    async def play_file(self, path: Path, *, interruptible: bool) -> str | None:
        """Play a sound file from outside the sounds folder (a message, a greeting)."""
        try:
            frames = await self.prompts.file_frames(path, self.codec)
        except PromptNotFound as exc:
            logger.error("%s: %s", path, exc)
            return None
        return await self.play_frames(frames, interruptible=interruptible)

    async def play_frames(self, frames: Sequence[bytes], *, interruptible: bool) -> str | None:
        """Play encoded frames; with ``interruptible``, the key that stopped them."""
        if interruptible and not self._keys.empty():
            return self._keys.get_nowait()
        playback = self._playback = self.side.play(frames)
        if not interruptible:
            await playback.done
            return None
        key = asyncio.ensure_future(self._keys.get())
        waiting: list[asyncio.Future[Any]] = [playback.done, key]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pressed = key.done()
            if not pressed:  # also when the call hangs up and cancels us
                key.cancel()
        if pressed:
            playback.stop()
            return key.result()
        return None

    async def digit(self, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(self._keys.get(), timeout)
        except TimeoutError:
            return None

    def flush(self) -> None:
        while not self._keys.empty():
            self._keys.get_nowait()

    def silence(self) -> None:
        """Stop what this session plays. Only that: whatever plays to the side
        since (a survey's prompt, a transfer's ringback) belongs to someone else,
        and a session that ends late must not cut it off."""
        if self._playback is not None:
            self._playback.stop()
            self._playback = None

    def stop(self) -> None:
        """The call leaves the IVR: silence what it played and stop listening for keys."""
        self.silence()
        if self.side.on_dtmf == self.press:  # not the keys of a bridged call (pbx.calls.feature_keys)
            self.side.on_dtmf = None
