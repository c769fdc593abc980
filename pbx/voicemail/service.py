"""Voicemail: callers leave messages, mailbox owners hear them by phone.

A deposit plays the mailbox's own greeting (``voicemail/<box>/greeting.wav``,
recorded by phone) or the configured default, then a beep, and records what
the caller says until ``#``, 3 s of silence (trimmed off), hang-up or
``voicemail.max_seconds``. A message shorter than ``min_seconds`` is dropped;
the others become ``voicemail/<box>/<id>.wav`` (written under a temporary
name, renamed when complete) and a ``voicemail`` row; a message a crash left
without its row is indexed at the next start. Every change tells the
message-waiting service, and a mailbox with ``email`` gets the WAV by mail
when ``smtp`` is configured; a failed send stays pending and is retried.

Voicemail by phone (``*97`` or the ``voicemail:main`` destination) asks for
the mailbox (unless known) and the PIN (skipped for the mailbox's own
extension when it has no PIN: a mailbox without a PIN opens only from its
own phone), says how many new and old messages there are, then takes keys:
1 next message, 2 replay, 7 delete, 9 save, 5 record the greeting, # hang
up. Hearing a message makes it old.

PINs cannot be guessed across calls: five wrong PINs in a row lock the
mailbox for 15 minutes (:class:`pbx.pin_locks.PinLocks`; then even the right PIN
is refused, the caller is told so and hung up), and every wrong PIN is a
``pin_failure`` security event and a failure of the caller's address in the
SIP address guard, which bans it as it bans password guessers. A caller who
came through a trunk has the carrier's address: banning it would cut off
every customer of that carrier, so such wrong PINs lock the mailbox but do
not count against the address.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
import wave
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.ivr.audio import CallAudio
from pbx.ivr.engine import read_digits
from pbx.media.clock import MediaClock
from pbx.media.codecs import Decoder
from pbx.media.prompts import number_parts
from pbx.media.relay_side import RelaySide
from pbx.pin_locks import PinLocks
from pbx.security import security_event
from pbx.sip.auth import AddressGuard
from pbx.store.db import Store, iso_time
from pbx.store.durable import make_folders, sync_folder
from pbx.store.reconcile import FoundWav, free_id, index_unlisted
from pbx.tasks import Background
from pbx.voicemail.mailer import MailError, send_voicemail

logger = logging.getLogger(__name__)

RATE = 8000  # messages are 16-bit mono at 8 kHz
FRAME = 160  # samples per 20 ms packet
SILENCE_RMS = 300  # a packet quieter than this (about -41 dBFS) is silence
SILENCE_END = 3.0  # seconds of silence that end a message
GREETING_MAX = 60  # seconds
PIN_TRIES = 3  # per call
IDLE_PROMPTS = 3  # menu prompts without a key before hanging up
EMAIL_RETRY = 60.0  # seconds between attempts for messages whose mail failed
UNKNOWN_CALLER = "unknown"  # of a message indexed from its file alone: only the row knew the caller


class MessageWaiting(Protocol):
    def changed(self, mailbox: str) -> None:
        """A mailbox's messages changed: tell its phones."""


class Take:
    """What one caller says into the line, as 8 kHz samples, from now on.

    Packets are placed by their arrival on the media clock, so a gap in the
    stream (a phone that stops sending during silence) stays a gap. The tap
    replaces ``side.on_audio`` until :meth:`stop`.
    """

    def __init__(self, side: RelaySide, clock: MediaClock) -> None:
        assert side.codec is not None
        self.side = side
        self.clock = clock
        self.payload_type = side.codec.payload_type
        self.decode = Decoder(side.codec.name)
        self.chunks: list[npt.NDArray[np.int16]] = []
        self.length = 0  # samples taken so far
        self.voiced = 0  # samples up to the end of the last sound
        self.start = clock.tick
        self.last_sound = clock.tick
        side.on_audio = self._heard

    def _heard(self, payload: bytes, payload_type: int) -> None:
        if payload_type != self.payload_type:
            return
        pcm = self.decode(payload)
        gap = (self.clock.tick - self.start) * FRAME - self.length
        if gap > 3 * FRAME:
            self.chunks.append(np.zeros(gap, dtype=np.int16))
            self.length += gap
        self.chunks.append(pcm)
        self.length += len(pcm)
        if pcm.size and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) >= SILENCE_RMS:
            self.voiced = self.length
            self.last_sound = self.clock.tick

    def silent_for(self) -> float:
        """Seconds since the caller last made a sound (or since the start)."""
        return (self.clock.tick - self.last_sound) * self.clock.interval

    def stop(self) -> None:
        if self.side.on_audio == self._heard:
            self.side.on_audio = None

    def samples(self, *, trim: bool) -> npt.NDArray[np.int16]:
        """Everything taken; with ``trim``, without the silence at the end."""
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)
        return pcm[: self.voiced] if trim else pcm


class VoicemailService:
    """Mailboxes: deposits, voicemail by phone, message counts and mail."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: Store,
        events: EventBus,
        clock: MediaClock,
        guard: AddressGuard,
    ) -> None:
        self.config = config
        self.store = store
        self.events = events
        self.clock = clock
        self.guard = guard
        self.locks = PinLocks()
        self.mwi: MessageWaiting | None = None
        self.counts: dict[str, tuple[int, int]] = {}  # mailbox -> (new, old), for the metrics
        self._tasks = Background("voicemail")

    async def start(self) -> None:
        """Index the messages a crash left without a row, count the mailboxes'
        messages, and retry pending mail from now on."""
        data_dir = self.config().storage.data_dir
        await index_unlisted(self.store, data_dir, "voicemail", unlisted_message_rows, depth=1, skip={"greeting.wav"})
        rows = await self.store.run(
            lambda: list(self.store.db.query("select mailbox, heard, count(*) as n from voicemail group by mailbox, heard"))
        )
        for row in rows:
            new, old = self.counts.get(row["mailbox"], (0, 0))
            self.counts[row["mailbox"]] = (new + row["n"], old) if not row["heard"] else (new, old + row["n"])
        self._retry = self._tasks.spawn(self._retry_mail())

    async def stop(self) -> None:
        self._retry.cancel()
        await self._tasks.close(grace=10)  # messages being saved and mailed

    def exists(self, mailbox: str) -> bool:
        return self.config().mailbox(mailbox) is not None

    def _folder(self, mailbox: str) -> Path:
        return self.config().storage.data_dir / "voicemail" / mailbox

    # --- leaving a message ---

    async def deposit(self, audio: CallAudio, mailbox: str, caller: str) -> None:
        """Greeting, beep, and the caller's message into ``mailbox``.

        The message is kept however the recording ends, hang-up included
        (the call's task is then cancelled: the saving goes on without it).
        """
        cfg = self.config()
        greeting = self._folder(mailbox) / "greeting.wav"
        if await asyncio.to_thread(greeting.is_file):
            await audio.play_file(greeting, interruptible=False)
        else:
            await audio.play([cfg.voicemail.greeting], interruptible=False)
        await audio.play(["beep"], interruptible=False)
        audio.flush()
        take = Take(audio.side, self.clock)
        logger.info("voicemail for %s from %s: recording", mailbox, caller)
        ended = "hang-up"
        try:
            ended = await self._listen(audio, take, cfg.voicemail.max_seconds)
        finally:
            take.stop()
            pcm = take.samples(trim=ended == "silence")
            saving = self._tasks.spawn(self._save(mailbox, caller, pcm, ended))
        await asyncio.shield(saving)  # the goodbye or hang-up that follows confirms a stored message
        if ended != "max":
            return
        await audio.play(["goodbye"], interruptible=False)

    async def _listen(self, audio: CallAudio, take: Take, max_seconds: float) -> str:
        """Wait for what ends a recording: "#", "silence" or "max"."""
        deadline = asyncio.get_running_loop().time() + max_seconds
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            if await audio.digit(min(0.2, remaining)) == "#":
                return "#"
            if take.silent_for() >= SILENCE_END:
                return "silence"
        return "max"

    async def _save(self, mailbox: str, caller: str, pcm: npt.NDArray[np.int16], ended: str) -> None:
        cfg = self.config()
        seconds = len(pcm) / RATE
        if seconds < cfg.voicemail.min_seconds or not len(pcm):
            logger.info("voicemail for %s from %s dropped: %.1f s is shorter than %d s", mailbox, caller, seconds, cfg.voicemail.min_seconds)
            return
        message_id = uuid.uuid4().hex[:16]
        relative = Path("voicemail") / mailbox / f"{message_id}.wav"
        try:
            await asyncio.to_thread(write_wav, cfg.storage.data_dir / relative, pcm)
        except OSError as exc:
            logger.error("voicemail for %s from %s lost: cannot write %s: %s", mailbox, caller, relative, exc)
            return
        box = cfg.mailbox(mailbox)
        wants_mail = box is not None and box.email is not None
        row = {
            "id": message_id,
            "mailbox": mailbox,
            "caller": caller,
            "received": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "seconds": round(seconds, 2),
            "heard": 0,
            "path": relative.as_posix(),
            "email": "pending" if wants_mail else "",
        }
        await self.store.insert("voicemail", row)
        logger.info("voicemail %s for %s from %s: %.1f s, ended by %s", message_id, mailbox, caller, seconds, ended)
        self._count(mailbox, new=1)
        self.events.emit("voicemail_left", mailbox=mailbox, message_id=message_id, caller=caller, seconds=row["seconds"])
        if wants_mail:
            self._tasks.spawn(self._mail(row))

    # --- mail ---

    async def _mail(self, row: Mapping[str, Any]) -> bool:
        cfg = self.config()
        box = cfg.mailbox(row["mailbox"])
        address = box.email if box is not None else None
        if cfg.smtp is None or address is None:
            await self.store.update("voicemail", row["id"], {"email": ""})
            return True
        try:
            await send_voicemail(
                cfg.smtp,
                address,
                mailbox=row["mailbox"],
                caller=row["caller"],
                received=row["received"],
                seconds=row["seconds"],
                wav=cfg.storage.data_dir / row["path"],
            )
        except MailError as exc:
            logger.warning("voicemail %s: mail to %s failed, will retry: %s", row["id"], address, exc)
            return False
        except OSError as exc:  # the message's file is gone: sending again cannot help
            logger.error("voicemail %s: not mailed: %s", row["id"], exc)
            await self.store.update("voicemail", row["id"], {"email": "failed"})
            return True
        await self.store.update("voicemail", row["id"], {"email": "sent"})
        logger.info("voicemail %s mailed to %s", row["id"], address)
        return True

    async def _retry_mail(self) -> None:
        while True:
            await asyncio.sleep(EMAIL_RETRY)
            for row in await self.store.rows("voicemail", "email = ?", ["pending"]):
                if not await self._mail(row):
                    break  # the server is still down: try again next round

    # --- voicemail by phone ---

    async def main(self, audio: CallAudio, mailbox: str | None, *, own: bool, source: str) -> None:
        """Voicemail by phone. ``mailbox`` None: ask for it. ``own``: the caller
        is the mailbox's extension, signed in by digest, so no PIN is asked
        when the mailbox has none. ``source``: the caller's signalling address,
        charged with its wrong PINs."""
        box = await self._sign_in(audio, mailbox, own, source)
        if box is not None:
            await self._menu(audio, box)
        await audio.play(["goodbye"], interruptible=False)

    async def _sign_in(self, audio: CallAudio, mailbox: str | None, own: bool, source: str) -> str | None:
        cfg = self.config()
        for _ in range(PIN_TRIES):
            number = mailbox or await read_digits(audio, ["vm-enter-mailbox"], 10, "#", 5)
            box = cfg.mailbox(number)
            pin = box.pin if box is not None else None
            if own and box is not None and pin is None:
                logger.info("voicemail: mailbox %s signed in from its own phone", number)
                return number
            entered = await read_digits(audio, ["vm-enter-pin"], 12, "#", 5)
            right = pin is not None and hmac.compare_digest(entered.encode(), pin.encode())
            # A locked mailbox is checked after the PIN is typed, and refuses
            # the right one too: the answer tells a guesser nothing.
            locked = box is not None and self.locks.locked(number)
            if right and not locked:
                self.locks.succeeded(number)
                logger.info("voicemail: mailbox %s signed in", number)
                return number
            if not right and entered:  # no key at all is no guess
                locked = self._wrong_pin(number if box is not None else None, source) or locked
            if locked:
                logger.warning("voicemail: mailbox %s is locked after wrong PINs: sign-in refused", number)
                await audio.play(["vm-locked"], interruptible=False)
                return None
            logger.warning("voicemail: wrong PIN or mailbox for %r", number)
            await audio.play(["vm-invalid-pin"], interruptible=False)  # keys typed meanwhile are kept
        return None

    def _wrong_pin(self, mailbox: str | None, source: str) -> bool:
        """Charge a wrong PIN to ``mailbox`` (None: no such mailbox) and to
        the caller's address unless that is a trunk's; True when it locks the mailbox."""
        trunk = self.config().trunk_for_source(source)
        # trunk= comes first, right after src=: the fail2ban filter skips such
        # lines (they name the carrier), and no client value can stand there.
        security_event(self.events, "pin_failure", source, trunk=trunk.name if trunk else None, mailbox=mailbox)
        if trunk is None:
            self.guard.record_failure(source)
        if mailbox is None or not self.locks.failed(mailbox):
            return False
        logger.warning("voicemail: mailbox %s locked for %d s after %d wrong PINs", mailbox, self.locks.seconds, self.locks.failures)
        return True

    async def _menu(self, audio: CallAudio, mailbox: str) -> None:
        messages = await self.store.rows("voicemail", "mailbox = ? order by heard, received", [mailbox])
        key = await self._say_counts(audio, mailbox)
        current: int | None = None  # index of the message last played
        idle = 0
        while idle < IDLE_PROMPTS:
            key = key or await audio.play(["vm-options"], interruptible=True) or await audio.digit(5)
            if key is None:
                idle += 1
                continue
            idle = 0
            pressed, key = key, None
            if pressed == "#":
                return
            if pressed == "5":
                await self._record_greeting(audio, mailbox)
            elif pressed == "1":
                current = 0 if current is None else current + 1
                if current >= len(messages):
                    current = len(messages)
                    await audio.play(["vm-no-messages"], interruptible=False)
                else:
                    key = await self._play(audio, messages, current)
            elif pressed in "279" and current is not None and current < len(messages):
                if pressed == "2":
                    key = await self._play(audio, messages, current)
                elif pressed == "7":
                    await self.delete(messages.pop(current))
                    current -= 1  # "next" is the one after the deleted one
                    await audio.play(["vm-deleted"], interruptible=False)
                else:
                    await audio.play(["vm-saved"], interruptible=False)
            else:
                await audio.play(["invalid"], interruptible=False)

    async def _say_counts(self, audio: CallAudio, mailbox: str) -> str | None:
        """"You have 2 new messages and 1 old message"; a key pressed meanwhile."""
        new, old = self.counts.get(mailbox, (0, 0))
        if not new and not old:
            return await audio.play(["vm-no-messages"], interruptible=True)
        parts = ["vm-you-have"]
        for count, folder in ((new, "vm-new"), (old, "vm-old")):
            if count:
                parts += [*number_parts(min(count, 999)), folder, "vm-message" if count == 1 else "vm-messages"]
        return await audio.play(parts, interruptible=True)

    async def _play(self, audio: CallAudio, messages: list[dict[str, Any]], index: int) -> str | None:
        """"Message 1" and the message; a key pressed meanwhile stops it and is returned."""
        message = messages[index]
        key = await audio.play(["vm-message", *number_parts(min(index + 1, 999))], interruptible=True)
        if key is None:
            key = await audio.play_file(self.config().storage.data_dir / message["path"], interruptible=True)
        await self.mark_heard(message, True)
        message["heard"] = 1
        logger.info("voicemail %s of %s played", message["id"], message["mailbox"])
        return key

    async def delete(self, message: Mapping[str, Any]) -> None:
        """Remove a message: its file, then its row."""
        path = self.config().storage.data_dir / message["path"]
        await asyncio.to_thread(path.unlink, missing_ok=True)
        await self.store.delete_where("voicemail", "id = ?", [message["id"]])
        logger.info("voicemail %s of %s deleted", message["id"], message["mailbox"])
        self._count(message["mailbox"], new=-1 if not message["heard"] else 0, old=-1 if message["heard"] else 0)

    async def mark_heard(self, message: Mapping[str, Any], heard: bool) -> None:
        """Make a message old (heard) or new again: its row, the counts and the phones' lamps."""
        if bool(message["heard"]) == heard:
            return
        await self.store.update("voicemail", message["id"], {"heard": int(heard)})
        self._count(message["mailbox"], new=-1 if heard else 1, old=1 if heard else -1)
        logger.info("voicemail %s of %s marked %s", message["id"], message["mailbox"], "heard" if heard else "new")

    async def _record_greeting(self, audio: CallAudio, mailbox: str) -> None:
        await audio.play(["vm-record-greeting", "beep"], interruptible=False)
        audio.flush()
        take = Take(audio.side, self.clock)
        logger.info("voicemail: mailbox %s is recording its greeting", mailbox)
        try:
            ended = await self._listen(audio, take, GREETING_MAX)
        finally:
            take.stop()
        pcm = take.samples(trim=ended == "silence")
        if len(pcm) < RATE:
            await audio.play(["invalid"], interruptible=False)
            return
        try:
            await asyncio.to_thread(write_wav, self._folder(mailbox) / "greeting.wav", pcm)
        except OSError as exc:
            logger.error("voicemail: greeting of %s not saved: %s", mailbox, exc)
            return
        logger.info("voicemail: mailbox %s recorded a greeting of %.1f s", mailbox, len(pcm) / RATE)
        await audio.play(["vm-greeting-saved"], interruptible=False)

    # --- counts ---

    def _count(self, mailbox: str, *, new: int = 0, old: int = 0) -> None:
        was_new, was_old = self.counts.get(mailbox, (0, 0))
        self.counts[mailbox] = (max(was_new + new, 0), max(was_old + old, 0))
        if self.mwi is not None:
            self.mwi.changed(mailbox)


def unlisted_message_rows(_db: Any, found: list[FoundWav], taken: set[str]) -> list[dict[str, Any]]:
    """Rows for messages whose file (``voicemail/<box>/<id>.wav``) a crash
    left without one: what the file tells (received when its writing ended),
    the caller unknown, new, and not mailed: it waits in its mailbox, counted
    and lit like any new message."""
    return [
        {
            "id": free_id(wav.path.stem, taken),
            "mailbox": wav.path.parts[1],
            "caller": UNKNOWN_CALLER,
            "received": iso_time(wav.modified),
            "seconds": round(wav.seconds, 2),
            "heard": 0,
            "path": str(wav.path),
            "email": "",
        }
        for wav in found
    ]


def write_wav(path: Path, pcm: npt.NDArray[np.int16]) -> None:
    """Write 8 kHz mono ``pcm`` to ``path`` through a temporary file renamed
    when complete, so a crash never leaves a half message under its name.
    The data and the folder's new entry are fsynced before this returns: the
    database row written next never points at a file a power cut took."""
    make_folders(path.parent)
    temp = path.with_name(f".{path.name}.part")
    try:
        with open(temp, "wb") as raw:
            with wave.open(raw, "wb") as out:  # closing it patches the header, leaves `raw` open
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(RATE)
                out.writeframes(pcm.astype("<i2").tobytes())
            raw.flush()
            os.fsync(raw.fileno())
        temp.replace(path)
        sync_folder(path.parent)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
