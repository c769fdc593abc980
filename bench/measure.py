"""What the benchmarks share: one measured run, bounded in time, in a folder of its own."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar


class Measured(Protocol):
    calls: int
    failed: int
    error: str

    def summary(self, index: int) -> str: ...


R = TypeVar("R", bound=Measured)


async def run_bounded(
    index: int, run: R, runner: Callable[[R, Path], Awaitable[None]], *, limit: float, keep: bool, prefix: str
) -> None:
    """Carry out ``runner(run, folder)`` within ``limit`` seconds; a run that
    times out or breaks off counts all its calls as failed. Prints the run's
    summary; its folder is kept when it failed or ``keep`` says so."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        async with asyncio.timeout(limit):
            await runner(run, work)
    except TimeoutError:
        run.failed, run.error = run.calls, f"run exceeded {limit:.0f} s"
    except Exception as exc:  # a server did not start, a port was taken, ...
        print(f"run {index} broke off: {type(exc).__name__}: {exc}", file=sys.stderr)
        run.failed, run.error = run.calls, type(exc).__name__
    print(run.summary(index), flush=True)
    if run.error or keep:
        print(f"  logs kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
