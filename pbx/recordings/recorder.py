"""Call recording: a bridged call's two directions written to a WAV file.

Each direction's channel has what the other party hears from it: what the
peer on that side says, or what the server sends the other party instead of
it (music on hold while that peer holds).

Nothing here blocks the event loop or the media clock. The relay's
``on_audio`` and ``on_played`` taps only append ``(tick, payload, codec)`` to
a list per channel; one timer for all open recordings hands each
recording's batch, about once a second, to one shared writer thread, which
decodes, places and writes the audio (:mod:`pbx.recordings.files`). So the
loop never decodes a packet or touches the disk. Half a second behind the
clock, audio is final: each flush has the writer write both channels up to
that point.

A recording's row is stored only once its file is complete, closed and
renamed to its final name. A write error (disk full, a file where a folder
should be) fails that recording alone, on the writer thread: the partial
file goes, an ERROR is logged once and ``recording_failed`` is emitted; the
call itself never notices.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.media.audio_taps import listen, unlisten
from pbx.media.clock import MediaClock
from pbx.media.relay_side import RelaySide
from pbx.recordings.files import (
    FRAME,
    RATE,
    Packet,
    RecordingFile,
    delete_files,
    file_stem,
    remove_partial_files,
    unlisted_recording_rows,
)
from pbx.store.db import Store
from pbx.store.reconcile import index_unlisted
from pbx.tasks import Background

logger = logging.getLogger(__name__)

SETTLE_TICKS = 25  # audio this far (0.5 s) behind the clock is final at a flush
FLUSH_INTERVAL = 1.0  # seconds between flushes
RETENTION_INTERVAL = 24 * 3600.0  # seconds between retention passes


class Recording:
    """One call being recorded; made by :meth:`Recorder.begin`.

    ``failed`` becomes True (and ``error`` says why) when the file could not
    be written; the recording then ends without a file or row.
    """

    def __init__(
        self,
        call_id: str,
        *,
        recording_id: str | None = None,
        queue: str | None,
        agent: str | None,
        caller_id: str,
        callee: str,
        started: datetime,
        sink: RecordingFile,
    ) -> None:
        self.call_id = call_id
        self.id = recording_id or call_id  # a call recorded twice (the API's start after stop) has two
        self.queue = queue
        self.agent = agent
        self.caller_id = caller_id
        self.callee = callee
        self.started = started
        self.paused = False
        self.failed = False
        self.error: str | None = None
        self._sink = sink  # writes on the writer thread only; its start_tick is read on the loop too
        # Packets not yet handed to the writer: caller (left), agent (right).
        self._pending: list[list[Packet]] = [[], []]
        self._taps: list[tuple[RelaySide, Callable[[bytes, int], None]]] = []  # on_audio
        self._played_taps: list[tuple[RelaySide, Callable[[bytes], None]]] = []  # on_played
        self._exception: BaseException | None = None
        self._reported = False
        self._finishing: asyncio.Task[dict[str, Any] | None] | None = None

    @property
    def channels(self) -> int:
        return 2 if self._sink.stereo else 1

    def pause(self) -> None:
        """Record silence from now on (card numbers); the recording's time keeps running."""
        self.paused = True

    def resume(self) -> None:
        """Record the call's audio again after :meth:`pause`."""
        self.paused = False

    def _tap(self, side: RelaySide, channel: int, clock: MediaClock) -> Callable[[bytes, int], None]:
        """The ``on_audio`` listener of ``side``: one append per packet, nothing more.

        A channel has what the other party hears from that direction, so what
        the other side holds back (a holder's microphone while the other party
        hears music) is left out; :meth:`_tap_played` brings what it hears instead.
        """
        pending = self._pending
        other = side.other

        def on_audio(payload: bytes, payload_type: int) -> None:
            codec = side.codec
            # Other payload types (comfort noise) are not audio in the side's codec.
            if codec is None or payload_type != codec.payload_type or self.paused or self.failed or other.holds_back:
                return
            pending[channel].append((clock.tick_at(side.heard_at), payload, codec.name))

        return on_audio

    def _tap_played(self, side: RelaySide, channel: int, clock: MediaClock) -> Callable[[bytes], None]:
        """The ``on_played`` listener of the side opposite ``side``: the frames
        the server sends the other party in place of ``side``'s peer (music while
        that peer holds) go on ``side``'s channel."""
        pending = self._pending
        other = side.other

        def on_played(payload: bytes) -> None:
            codec = other.codec
            if codec is None or self.paused or self.failed:
                return
            pending[channel].append((clock.tick, payload, codec.name))

        return on_played

    def _take_pending(self) -> tuple[list[Packet], list[Packet]]:
        pending = self._pending
        batch = (pending[0], pending[1])
        pending[0] = []
        pending[1] = []
        return batch


class Recorder:
    """Records bridged calls to ``data_dir/recordings/YYYY/MM/DD/<call-id>.wav``.

    Events: ``recording_saved`` (recording_id, call_id, queue, agent, seconds) and ``recording_failed``
    (call_id, error).
    """

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: Store,
        events: EventBus,
        clock: MediaClock,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.config = config
        self._store = store
        self._events = events
        self._clock = clock
        self._flush_interval = flush_interval
        # One thread decodes and writes every recording, in submission order.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")
        self._open: dict[Recording, None] = {}  # ordered set
        self._finishing = Background("recorder")  # recordings being finished
        self._timer: asyncio.TimerHandle | None = None
        self._retention: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifetime ---

    async def start(self) -> None:
        """Remove temporary files a crash left behind, index the complete ones
        it left without a row, apply retention once, then daily."""
        loop = self._loop = asyncio.get_running_loop()
        data_dir = self.config().storage.data_dir
        folders = [data_dir / "recordings", data_dir / "voicemail"]
        try:
            removed = await loop.run_in_executor(None, remove_partial_files, folders)
        except OSError as exc:
            logger.error("could not clean up unfinished files under %s: %s", data_dir, exc)
        else:
            if removed:
                logger.warning("removed %d unfinished recording/voicemail files left by an earlier run", removed)
            else:
                logger.debug("no unfinished recording/voicemail files under %s", data_dir)
        await index_unlisted(self._store, data_dir, "recordings", unlisted_recording_rows)
        await self._retain()
        self._retention = asyncio.create_task(self._retention_loop(), name="recording retention")

    async def stop(self) -> None:
        """Finish every open recording (as :meth:`end` does), then stop the writer."""
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.gather(self._retention, return_exceptions=True)
            self._retention = None
        await asyncio.gather(*(self.end(r) for r in list(self._open)), *self._finishing, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.get_running_loop().run_in_executor(None, self._writer.shutdown)

    # --- recording ---

    def begin(
        self,
        call_id: str,
        caller: RelaySide,
        agent: RelaySide,
        *,
        queue: str | None,
        agent_ext: str | None,
        caller_id: str,
        callee: str,
        recording_id: str | None = None,
    ) -> Recording:
        """Start recording: ``caller`` (relay side a) left, ``agent`` (side b) right.
        The row's id is ``recording_id``, by default the call id.

        Taps both sides' ``on_audio`` and ``on_played`` until :meth:`end`.
        Never raises for disk trouble: that shows later as ``failed``.
        """
        self._loop = asyncio.get_running_loop()
        config = self.config()
        started = datetime.now(UTC)
        relative = PurePosixPath("recordings", started.strftime("%Y/%m/%d"), f"{file_stem(call_id)}.wav")
        sink = RecordingFile(config.storage.data_dir, relative, config.recording.stereo, self._clock.tick)
        recording = Recording(
            call_id,
            recording_id=recording_id,
            queue=queue,
            agent=agent_ext,
            caller_id=caller_id,
            callee=callee,
            started=started,
            sink=sink,
        )
        for channel, side in enumerate((caller, agent)):
            tap = recording._tap(side, channel, self._clock)
            listen(side, tap)  # beside a supervisor listening in (pbx.calls.monitor)
            recording._taps.append((side, tap))
            played = recording._tap_played(side, channel, self._clock)
            side.other.on_played = played
            recording._played_taps.append((side.other, played))
        self._open[recording] = None
        self._submit(recording, sink.open)
        if self._timer is None:
            self._timer = self._loop.call_later(self._flush_interval, self._on_timer)
        logger.debug("recording %s started: %s", call_id, relative)
        return recording

    async def end(self, recording: Recording) -> dict[str, Any] | None:
        """Stop recording and finish the file: the stored row, or None when it failed.

        Safe to call twice (both get the same answer) and to cancel (the
        file is still finished). Never raises.
        """
        task = recording._finishing
        if task is None:
            task = recording._finishing = self._finishing.spawn(self._finish(recording))
        return await asyncio.shield(task)

    async def flush(self) -> None:
        """Hand every open recording's audio to the writer now and wait until written.

        The timer does this on its own; useful to bound what a crash loses.
        """
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._flush_all()))

    async def _finish(self, recording: Recording) -> dict[str, Any] | None:
        try:
            self._open.pop(recording, None)
            for side, tap in recording._taps:
                unlisten(side, tap)
            for side, played in recording._played_taps:
                if side.on_played is played:
                    side.on_played = None
            # The taps' closures hold the recording: a cycle for the garbage collector's full collections.
            recording._taps.clear()
            recording._played_taps.clear()
            future = self._submit(recording, recording._sink.finish, recording._take_pending())
            if future is not None:
                await asyncio.wrap_future(future)
            if recording.failed:
                self._report_failure(recording)
                return None
            return await self._save(recording)
        except Exception as exc:  # a bug here must not end the call with an exception
            logger.exception("recording %s: finishing failed", recording.call_id)
            self._fail(recording, exc)
            return None

    async def _save(self, recording: Recording) -> dict[str, Any] | None:
        sink = recording._sink
        row: dict[str, Any] = {
            "id": recording.id,
            "call_id": recording.call_id,
            "queue": recording.queue,
            "agent": recording.agent,
            "caller": recording.caller_id,
            "callee": recording.callee,
            "started": recording.started.isoformat(timespec="milliseconds"),
            "seconds": round(sink.frames / RATE, 3),
            "bytes": sink.size,
            "channels": recording.channels,
            "path": str(sink.relative),
        }
        try:
            await self._store.insert("recordings", row)
        except Exception as exc:
            # The audio stays on disk: losing it would be worse than an unlisted file.
            self._fail(recording, exc, f"{exc} (file {sink.relative} kept, not listed)")
            return None
        self._events.emit(
            "recording_saved", recording_id=row["id"], call_id=row["call_id"], queue=row["queue"], agent=row["agent"], seconds=row["seconds"]
        )
        logger.info("recording %s saved: %s (%.1f s)", recording.call_id, sink.relative, row["seconds"])
        return row

    # --- the writer thread ---

    def _submit(self, recording: Recording, step: Callable[..., None], *args: Any) -> concurrent.futures.Future[None] | None:
        """Queue ``step(*args)`` for the writer thread; None if it cannot run."""
        try:
            return self._writer.submit(self._run, recording, step, *args)
        except RuntimeError as exc:  # the writer was shut down: stop() has run
            self._fail(recording, exc, "the recorder is stopped")
            return None

    def _run(self, recording: Recording, step: Callable[..., None], *args: Any) -> None:
        """On the writer thread: one step of a recording; a failure ends only that recording."""
        if recording.failed:
            return  # later batches of a failed recording are dropped
        try:
            step(*args)
        except Exception as exc:
            recording._exception = exc
            recording.error = str(exc) or type(exc).__name__
            recording.failed = True
            recording._sink.discard()
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._report_failure, recording)
                except RuntimeError:  # the loop is closed: nobody left to tell
                    pass

    def _fail(self, recording: Recording, exc: BaseException, error: str | None = None) -> None:
        """On the loop: mark ``recording`` failed and report it."""
        if not recording.failed:
            recording._exception = exc
            recording.error = error or str(exc) or type(exc).__name__
            recording.failed = True
        self._report_failure(recording)

    def _report_failure(self, recording: Recording) -> None:
        """On the loop: log and emit a failure once per recording."""
        if recording._reported:
            return
        recording._reported = True
        exc = recording._exception
        # Disk trouble explains itself; anything else is a bug worth a traceback.
        trace = exc if exc is not None and not isinstance(exc, OSError) else None
        logger.error("recording %s failed: %s", recording.call_id, recording.error, exc_info=trace)
        self._events.emit("recording_failed", call_id=recording.call_id, error=recording.error)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self._flush_all()
        except Exception:
            logger.exception("recording flush failed")
        if self._open and self._loop is not None:
            self._timer = self._loop.call_later(self._flush_interval, self._on_timer)

    def _flush_all(self) -> list[concurrent.futures.Future[None]]:
        futures = []
        tick = self._clock.tick
        for recording in self._open:
            if recording.failed:
                recording._take_pending()
                continue
            final = (tick - recording._sink.start_tick - SETTLE_TICKS) * FRAME
            future = self._submit(recording, recording._sink.write, recording._take_pending(), final)
            if future is not None:
                futures.append(future)
        return futures

    async def delete(self, row: dict[str, Any]) -> bool:
        """Delete one indexed recording: its file, then its row. False (and
        the row kept) when the file cannot be deleted."""
        data_dir = self.config().storage.data_dir
        gone = await asyncio.get_running_loop().run_in_executor(None, delete_files, data_dir, [row])
        if not gone:
            return False
        await self._store.delete_where("recordings", "id = ?", [row["id"]])
        logger.info("recording %s deleted", row["id"])
        return True

    # --- retention ---

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL)
            await self._retain()

    async def _retain(self) -> None:
        try:
            await self.apply_retention()
        except Exception:
            logger.exception("recording retention failed")

    async def apply_retention(self) -> int:
        """Delete recordings older than ``recording.retention_days`` (0: keep all): file, then row.

        Returns how many went. A file that cannot be deleted keeps its row,
        so the next pass tries again.
        """
        config = self.config()
        days = config.recording.retention_days
        if days <= 0:
            return 0
        cutoff = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds")
        rows = await self._store.rows("recordings", "started < ?", [cutoff])
        if not rows:
            return 0
        loop = asyncio.get_running_loop()
        gone = await loop.run_in_executor(None, delete_files, config.storage.data_dir, rows)
        for start in range(0, len(gone), 500):  # below SQLite's limit of variables per statement
            chunk = gone[start : start + 500]
            await self._store.delete_where("recordings", f"id in ({', '.join('?' * len(chunk))})", chunk)
        logger.info("retention: deleted %d recordings older than %d days", len(gone), days)
        return len(gone)
