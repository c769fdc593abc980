"""What the benchmarks share: one measured run, bounded in time, in a folder of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from tests.support.sipp import SIPP

if TYPE_CHECKING:
    from tests.support.server import Server
    from tests.support.sipp import SippResult


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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after "pid (comm)": [0] is field 3 of
    proc(5) (state), [3] field 6 (session), [11] and [12] fields 14 and 15
    (utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` and of the processes it started (the
    server's media relay process) so far: all their threads, also ended ones."""
    return process_cpu_seconds(pid) + children_cpu_seconds(pid)


def children_cpu_seconds(pid: int) -> float:
    """CPU time of the processes ``pid`` started (the server's media relay process) so far."""
    return sum(cpu_seconds(child) for child in _children(pid))


def pin(pid: int, cpus: set[int]) -> None:
    """Run process ``pid``, every thread of it and the processes it started on ``cpus`` only."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), cpus)
    for child in _children(pid):
        pin(child, cpus)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(child) for child in f.read().split())
    return children


def process_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far: all its threads, also ended ones.

    Read from the process's CPU-time clock (clock_getcpuclockid(3): what
    utime + stime of /proc/PID/stat add up to, in nanoseconds rather than
    clock ticks, which matters for small figures); /proc/PID/stat where that
    clock cannot be read."""
    with contextlib.suppress(OSError):
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sipp_ready(pcap: Path | None, *, hint: str = "") -> bool:
    """Whether SIPp (and ``pcap``, the audio its callers play, unless None) is
    here, saying on stderr what is missing; warns when not root, since
    play_pcap_audio needs CAP_NET_RAW. ``hint`` ends the pcap messages."""
    if shutil.which(SIPP) is None:
        print("sipp is not installed (Debian: apt-get install sip-tester; make bench does)", file=sys.stderr)
        return False
    if pcap is None:
        return True
    if not pcap.exists():
        print(f"{pcap} is missing (it comes with sip-tester){hint}", file=sys.stderr)
        return False
    if os.geteuid() != 0:
        print(f"warning: not root; SIPp's play_pcap_audio needs CAP_NET_RAW to send RTP{hint}", file=sys.stderr)
    return True


def num(value: float | None, fmt: str = ".4f") -> str:
    """A figure for a table, "n/a" when it was not measured."""
    return format(value, fmt) if value is not None else "n/a"


def problems_and_error(log_problems: dict[str, int], error: str) -> str:
    """How a run's summary line ends: the server's log lines by level, and why the run failed."""
    text = ""
    if log_problems:
        text += "; server log: " + ", ".join(f"{n} {level}" for level, n in sorted(log_problems.items()))
    return text + (f" [{error}]" if error else "")


def aligned(rows: list[list[str]]) -> str:
    """Rows of cells right-aligned in columns, the first row the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show_failure(what: str, result: SippResult) -> None:
    """Print a failed SIPp run's report to stderr."""
    print(f"--- {what} failed ---", file=sys.stderr)
    print(result.report(lines=30), file=sys.stderr)


async def stop_server(server: Server, work: Path, problems: dict[str, int]) -> None:
    """Stop a benchmarked `pbx serve`, keep its log in ``work``, count its
    WARNING/ERROR/CRITICAL lines into ``problems`` and show the end of the log
    when it exited with an error."""
    code = await server.stop()
    (work / "pbx.log").write_text("\n".join(server.log) + "\n")
    for line in server.log:
        level = next((lv for lv in ("WARNING", "ERROR", "CRITICAL") if f" {lv} " in line), None)
        if level is not None:
            problems[level] = problems.get(level, 0) + 1
    if code:
        print(f"pbx serve exited with {code}; its last lines:", file=sys.stderr)
        print("\n".join(server.log[-20:]), file=sys.stderr)
