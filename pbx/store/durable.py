"""Making a renamed file survive a crash: the file's data and the folder's
entry for it both reach the disk before the database points at it.

A rename is a change of the folder, not of the file: after ``os.replace``
only an fsync of the folder makes the new name durable (ext4 and XFS may
otherwise lose it in a power cut even though the file's data was synced).
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` itself, so the names created or renamed in it are on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: Path) -> None:
    """``mkdir -p`` whose new folders are durable too: each created one is
    synced in its parent."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        sync_folder(new.parent)
