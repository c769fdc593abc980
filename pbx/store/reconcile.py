"""Crash recovery's second half at start-up: complete audio files that no row points at.

A recording or voicemail message is written under a temporary name, renamed
when complete, and only then given its row, so that no row ever points at a
half file. A crash (SIGKILL, power cut) between the rename and the row's
commit leaves a whole WAV that nothing lists. The ``.part`` sweep
(:func:`pbx.recordings.files.remove_partial_files`) removes the half files;
:func:`index_unlisted` finds the whole ones and stores the rows their
capability makes of them, so nothing a caller left or a call recorded is lost.

It stays cheap with any number of files: the paths the table lists are read
in one query into a set, the folder is walked once, and only the files
missing from the set are opened.

A file under a final name that is not a WAV as this server writes them
(16-bit 8 kHz mono or stereo, holding as many frames as its header says)
cannot come from a crash, since only complete files are renamed: it is left
where it is, for a person to judge, and named in a warning at every start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import wave
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import sqlite_utils

from pbx.store.db import Store

logger = logging.getLogger(__name__)

RATE = 8000  # what recordings and messages are written at


@dataclass(frozen=True)
class FoundWav:
    """A complete WAV that no row lists, and what its header and inode tell."""

    path: PurePosixPath  # relative to data_dir, as rows store it
    seconds: float
    channels: int
    size: int  # bytes
    modified: float  # mtime: when its writing ended (a rename keeps it)


# (the store's database, the files found, the ids the table has) -> rows to insert.
# Runs on the store thread; adds the ids it gives to the set.
RowMaker = Callable[[sqlite_utils.Database, list[FoundWav], set[str]], list[dict[str, Any]]]


def free_id(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when a row already has it; added to ``taken``."""
    candidate, number = stem, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate


def read_wav(data_dir: Path, relative: PurePosixPath) -> FoundWav | None:
    """What a complete WAV of ours holds; None when the file is not one."""
    full = data_dir / relative
    try:
        with open(full, "rb") as raw, wave.open(raw, "rb") as wav:
            frames, channels = wav.getnframes(), wav.getnchannels()
            if wav.getsampwidth() != 2 or wav.getframerate() != RATE or channels not in (1, 2):
                return None
            if frames:  # the last frame its header counts is there: no truncated file
                wav.setpos(frames - 1)
                if len(wav.readframes(1)) != 2 * channels:
                    return None
            status = os.fstat(raw.fileno())
    except (OSError, EOFError, wave.Error):
        return None
    return FoundWav(relative, round(frames / RATE, 3), channels, status.st_size, status.st_mtime)


def find_unlisted(
    data_dir: Path, top: str, listed: Collection[str], *, depth: int | None = None, skip: Collection[str] = ()
) -> tuple[list[FoundWav], list[PurePosixPath]]:
    """The ``*.wav`` files under ``data_dir/top`` whose relative path is not
    in ``listed``: those that are complete WAVs, and those that are not.

    Hidden files (``.part`` ones) and names in ``skip`` are passed over;
    with ``depth``, only files exactly that many folders below ``top``."""
    found: list[FoundWav] = []
    unreadable: list[PurePosixPath] = []
    base = data_dir / top
    for root, dirs, files in os.walk(base, onerror=_unreadable_folder):
        below = PurePosixPath(top, Path(root).relative_to(base).as_posix())
        level = len(below.parts) - 1
        if depth is not None:
            if level >= depth:
                dirs.clear()
            if level != depth:
                continue
        for name in files:
            relative = below / name
            if name.startswith(".") or not name.endswith(".wav") or name in skip or str(relative) in listed:
                continue
            wav = read_wav(data_dir, relative)
            if wav is None:
                unreadable.append(relative)
            else:
                found.append(wav)
    return found, unreadable


def _unreadable_folder(exc: OSError) -> None:
    if not isinstance(exc, FileNotFoundError):  # no folder yet: nothing was ever written there
        logger.warning("could not look for unlisted files in %s: %s", exc.filename, exc)


async def index_unlisted(
    store: Store,
    data_dir: Path,
    table: str,
    make_rows: RowMaker,
    *,
    depth: int | None = None,
    skip: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Store a row, made by ``make_rows``, for every complete WAV under
    ``data_dir/<table>`` that no row of ``table`` points at; the rows stored.

    Logs a warning with how many there were, and one for each file that is
    not a WAV of ours (left in place), or a folder that cannot be read:
    start-up goes on."""

    def listed() -> tuple[set[str], set[str]]:
        rows = store.db.execute(f"select id, path from [{table}]").fetchall()
        return {row[1] for row in rows}, {row[0] for row in rows}

    paths, ids = await store.run(listed)
    try:
        found, unreadable = await asyncio.to_thread(find_unlisted, data_dir, table, paths, depth=depth, skip=skip)
    except OSError as exc:
        logger.error("could not look for unlisted files under %s: %s", data_dir / table, exc)
        return []
    for path in unreadable:
        logger.warning("%s has no row and is not a complete WAV: left where it is, not listed", path)
    if not found:
        return []

    def insert() -> list[dict[str, Any]]:
        rows = make_rows(store.db, found, ids)
        store.db.table(table).insert_all(rows)
        return rows

    rows: list[dict[str, Any]] = await store.run(insert)
    logger.warning("indexed %d %s files that an earlier run left without a row (it stopped between file and row)", len(rows), table)
    for row in rows:
        logger.info("indexed %s as %s %s", row["path"], table, row["id"])
    return rows
