"""The files of recordings: one being written, and those at rest.

Nothing here runs on the event loop: :class:`RecordingFile` runs on the
recorder's one writer thread, which decodes, places and writes a
recording's audio; :func:`remove_partial_files` and :func:`delete_files` run
in an executor, :func:`unlisted_recording_rows` on the store thread.

Placement is by arrival time, not by RTP timestamp: a packet belongs at the
sample position of the media clock tick it arrived on (160 samples per 20 ms
tick, counted from the tick the recording began on), so both channels share
one time base whatever their peers' clocks and SSRC changes do. A channel
more than three frames behind a packet's arrival gets silence up to it (a
gap, a muted or held phone, a side that sends nothing); a smaller lag is
jitter, and the packet follows the previous one. What the recorder says is
final is padded with silence on both channels up to that point and written.

A file is written as ``.<name>.wav.part`` and renamed to ``<name>.wav`` only
once complete and closed, so a ``.part`` file is always a crash's leftover;
a complete file without its row (a crash between rename and row) is indexed
at the next start (:mod:`pbx.store.reconcile`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import wave
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import sqlite_utils

from pbx.media.codecs import Decoder, UnsupportedCodec
from pbx.store.db import iso_time
from pbx.store.durable import make_folders, sync_folder
from pbx.store.reconcile import FoundWav, free_id

logger = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]
Packet = tuple[int, bytes, str]  # (clock tick of arrival, payload, codec name)

RATE = 8000
FRAME = 160  # samples per media clock tick (20 ms at 8 kHz)
JITTER_FRAMES = 3  # a channel further behind a packet's arrival gets silence up to it
AHEAD_FRAMES = 10  # packets that would land further ahead of their arrival are dropped
PARTIAL_SUFFIX = ".part"

_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")
_LATER = re.compile(r"-[0-9]+$")  # a call's second, third... recording: <stem>-2, <stem>-3
_NO_SAMPLES: Samples = np.zeros(0, dtype=np.int16)


def file_stem(call_id: str) -> str:
    """A file name (without extension) for ``call_id``, safe in any folder.

    Characters outside ``[A-Za-z0-9._@-]`` become ``_`` and leading dots too;
    a name that had to change (or is very long) gets a hash of the call id,
    so two call ids never share a file.
    """
    stem = _UNSAFE.sub("_", call_id)
    stem = "_" * (len(stem) - len(stem.lstrip("."))) + stem.lstrip(".")
    if stem != call_id or not stem or len(stem) > 100:
        digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = f"{stem[:100]}-{digest}"
    return stem


class _Track:
    """One channel on the writer thread: placed samples not yet in the file."""

    __slots__ = ("start", "end", "chunks", "decoders")

    def __init__(self) -> None:
        self.start = 0  # sample position of the first sample in chunks: all before is written
        self.end = 0  # where the next packet follows on
        self.chunks: list[Samples] = []
        self.decoders: dict[str, Decoder] = {}  # by codec name: G.722 keeps state between packets

    def place(self, arrival: int, samples: Samples) -> None:
        """Add a packet's samples for arrival position ``arrival``."""
        lag = arrival - self.end
        if lag > JITTER_FRAMES * FRAME:
            self.chunks.append(np.zeros(lag, dtype=np.int16))
            self.end = arrival
        elif -lag > AHEAD_FRAMES * FRAME:
            # Faster than real time (a peer clock running fast, a burst after
            # a gap): dropping keeps the channel in step with the other one.
            return
        self.chunks.append(samples)
        self.end += len(samples)

    def take(self, upto: int) -> Samples:
        """The samples from ``start`` to ``upto``, silence where none came; the rest stays."""
        if self.end < upto:
            self.chunks.append(np.zeros(upto - self.end, dtype=np.int16))
            self.end = upto
        data = np.concatenate(self.chunks) if self.chunks else _NO_SAMPLES
        count = upto - self.start
        head, tail = data[:count], data[count:]
        self.chunks = [tail] if tail.size else []
        self.start = upto
        return head

    def decode(self, codec_name: str, payload: bytes) -> Samples:
        """Decode one payload to 8 kHz samples."""
        decoder = self.decoders.get(codec_name)
        if decoder is None:
            decoder = self.decoders[codec_name] = Decoder(codec_name)
        return decoder(payload)


class RecordingFile:
    """The WAV file of one recording; every method runs on the writer thread."""

    def __init__(self, data_dir: Path, relative: PurePosixPath, stereo: bool, start_tick: int) -> None:
        self.data_dir = data_dir
        self.relative = relative  # final name, relative to data_dir
        self.stereo = stereo
        self.start_tick = start_tick
        final = data_dir / relative
        self.partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        self.tracks = (_Track(), _Track())
        self.frames = 0  # written so far
        self.size = 0  # of the finished file
        self._file: BinaryIO | None = None
        self._wav: wave.Wave_write | None = None

    def open(self) -> None:
        make_folders(self.partial.parent)  # a new day's folder is durable too
        self._file = open(self.partial, "wb")
        wav = wave.open(self._file, "wb")
        wav.setnchannels(2 if self.stereo else 1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        self._wav = wav

    def write(self, batches: tuple[list[Packet], list[Packet]], final: int) -> None:
        """Place the packets; write what is final up to sample position ``final``."""
        self._place(batches)
        self._emit(max(final, self.tracks[0].start))

    def finish(self, batches: tuple[list[Packet], list[Packet]]) -> None:
        """Write everything, close the file and give it its final name."""
        self._place(batches)
        self._emit(max(track.end for track in self.tracks))
        assert self._wav is not None and self._file is not None
        self._wav.close()  # patches the header's lengths
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._free_name()
        os.replace(self.partial, final)
        sync_folder(final.parent)  # the new name too, before the row points at it
        self.size = final.stat().st_size

    def discard(self) -> None:
        """After a failure: close what is open and remove the partial file, as far as possible."""
        for close in (self._wav.close if self._wav else None, self._file.close if self._file else None):
            if close is not None:
                try:
                    close()
                except Exception:  # the same full disk again, most likely
                    pass
        self._wav = None
        self._file = None
        try:
            self.partial.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s: %s", self.partial, exc)

    def _place(self, batches: tuple[list[Packet], list[Packet]]) -> None:
        for track, batch in zip(self.tracks, batches):
            for tick, payload, codec_name in batch:
                try:
                    samples = track.decode(codec_name, payload)
                except UnsupportedCodec:
                    continue  # becomes silence
                track.place((tick - self.start_tick) * FRAME, samples)

    def _emit(self, upto: int) -> None:
        left, right = (track.take(upto) for track in self.tracks)
        if not left.size:
            return
        if self.stereo:
            frames = np.empty(2 * left.size, dtype="<i2")
            frames[0::2] = left
            frames[1::2] = right
        else:
            mixed = left.astype(np.int32) + right
            frames = np.clip(mixed, -32768, 32767).astype("<i2")
        assert self._wav is not None and self._file is not None
        self._wav.writeframesraw(frames.tobytes())
        # Into the OS now, so a full disk shows during the call, not at its end.
        self._file.flush()
        self.frames += left.size

    def _free_name(self) -> Path:
        """The final path; a second recording of the same call id gets ``-2``, ``-3``, ...

        Never replaces a file: only this thread creates recordings, so
        checking first cannot race.
        """
        stem = self.relative.stem
        final = self.data_dir / self.relative
        number = 1
        while final.exists():
            number += 1
            self.relative = self.relative.with_name(f"{stem}-{number}.wav")
            final = self.data_dir / self.relative
        return final


def remove_partial_files(folders: Iterable[Path]) -> int:
    """Delete every ``*.part`` file under ``folders``; how many went."""
    removed = 0
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                if name.endswith(PARTIAL_SUFFIX):
                    try:
                        os.unlink(os.path.join(root, name))
                    except FileNotFoundError:
                        continue
                    removed += 1
    return removed


def delete_files(data_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Delete the recordings' files (and emptied date folders); the ids whose file is gone."""
    gone = []
    recordings = data_dir / "recordings"
    for row in rows:
        relative = PurePosixPath(row["path"] or "")
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            logger.warning("retention: recording %s has an odd path %r; dropping only its row", row["id"], row["path"])
            gone.append(row["id"])
            continue
        path = data_dir / relative
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("retention: could not delete %s: %s", path, exc)
            continue
        gone.append(row["id"])
        folder = path.parent
        while folder != recordings and recordings in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): the folders above are not empty either
                break
            folder = folder.parent
    return gone


def unlisted_recording_rows(db: sqlite_utils.Database, found: list[FoundWav], taken: set[str]) -> list[dict[str, Any]]:
    """Rows for recordings whose file a crash left without one; on the store thread.

    A file's stem is its call id (:func:`file_stem`; ``-2``, ``-3``... for a
    call's later recordings). The call's ``cdr`` row, when there is one,
    gives queue, agent, caller, callee and started; otherwise the file is
    all there is: it started its length before its mtime, and queue, agent,
    caller and callee are unknown (null). The id is the stem, made unique
    among ``taken``, as a recording's id is its call id.
    """
    stems = {wav.path.stem for wav in found}
    wanted = sorted(stems | {_LATER.sub("", stem) for stem in stems})
    calls: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):  # below SQLite's limit of variables per statement
        chunk = wanted[start : start + 500]
        sql = f"select call_id, queue, agent, from_number, to_number, started from cdr where call_id in ({', '.join('?' * len(chunk))})"
        calls.update((row["call_id"], row) for row in db.query(sql, chunk))
    rows = []
    for wav in found:
        stem = wav.path.stem
        call = calls.get(stem) or calls.get(_LATER.sub("", stem)) or {}
        rows.append(
            {
                "id": free_id(stem, taken),
                "call_id": call.get("call_id", stem),
                "queue": call.get("queue"),
                "agent": call.get("agent"),
                "caller": call.get("from_number"),
                "callee": call.get("to_number"),
                "started": call.get("started") or iso_time(wav.modified - wav.seconds),
                "seconds": wav.seconds,
                "bytes": wav.size,
                "channels": wav.channels,
                "path": str(wav.path),
            }
        )
    return rows
