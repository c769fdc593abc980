"""Benchmark: what recording bridged calls costs the PBX, against the same calls unrecorded.

Two runs of `pbx serve`, each on a temporary folder, with the calls of
bench/bridge.py (its place_calls: a SIPp UAS registered as 1002 with
-rtp_echo; a SIPp UAC as 1001 placing --calls calls, up to all at once, at
--rate calls per second, each --duration seconds long, sending G.711 A-law from
/usr/share/sip-tester/g711a.pcap, echoed back):

- baseline: no extension has `record`.
- recorded: extension 1001 has `record: true`, so every call is recorded
  (pbx/recordings/recorder.py: both relay sides tapped, one writer thread), as stereo
  WAV (`recording: {stereo: true}`, set in both runs).

Measured: CPU seconds of the server process (all its threads, the writer's
too) over the call phase (UAC start to UAC exit) plus the time after it until
every answered call's CDR row, and in the recorded run its recordings row,
is stored (finishing the files is part of recording); per call, and the ratio
recorded / baseline of CPU per call, both measured in the same run of this
script since the machine is noisy. Failed calls as bridge.py counts them.
For the recorded run: rows in the recordings table of the run's pbx.db, WAV
files under <data_dir>/recordings, their total bytes, stereo ones, how many
last within 0.5 s of --duration, and temporary .part files left. For both:
media clock health (the server logs a WARNING "media clock N ms late:
skipping M ticks" whenever it skips; counted here), and the server log's
WARNING/ERROR/CRITICAL lines.

    .venv/bin/python bench/recording.py                       # 100 calls x 16 s at 10/s
    .venv/bin/python bench/recording.py --calls 5 --duration 4

Exit status 1 when a call failed or a recording is missing (fewer rows or
WAV files than answered calls). Everything runs on 127.0.0.1, every
subprocess has a time limit, and the script ends by itself. play_pcap_audio
uses a raw socket: run as root (or give sipp CAP_NET_RAW). The server runs at
--log-level INFO by default, as in the other benchmarks.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = script_path.ROOT

from tests.support.server import PASSWORDS, Server, start_server  # noqa: E402

from bench.bridge import PCAP, RELAYED_METRIC, RTP_PORTS, System, metric_sample, place_calls  # noqa: E402
from bench.bridge import Run as CallsRun  # noqa: E402
from bench.measure import aligned, cpu_seconds, num, problems_and_error, run_bounded, sipp_ready, stop_server  # noqa: E402
from bench.summary import record  # noqa: E402

TOLERANCE = 0.5  # seconds a WAV may differ from the call's length
STORE_LIMIT = 30.0  # seconds after the call phase for every CDR and recording row to be stored
CLOCK_LATE = re.compile(r"media clock \d+ ms late: skipping (\d+) ticks")


@dataclass
class Run(CallsRun):
    """One run's calls (bridge.py's figures) and what recording left behind.

    ``cpu_seconds`` is the call phase plus ``store_cpu``, the time until the
    calls' rows were stored."""

    recorded: bool = False
    store_cpu: float = 0.0
    store_seconds: float = 0.0
    cdr_rows: int = 0
    rows: int = 0  # in the recordings table
    files: int = 0  # *.wav under data_dir/recordings
    total_bytes: int = 0
    stereo: int = 0
    on_time: int = 0  # WAVs within TOLERANCE of the call's length
    worst: float | None = None  # the largest |WAV length - duration|, seconds
    partial: int = 0  # .part files left
    clock_skips: int = 0  # times the media clock skipped
    skipped_ticks: int = 0
    log_problems: dict[str, int] = field(default_factory=dict)
    problem_lines: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Answered calls without a row or without a file."""
        return max(0, self.successful - min(self.rows, self.files)) if self.recorded else 0

    def summary(self, index: int) -> str:
        text = (
            f"run {index} {self.system}: {self.calls} calls x {self.duration:g} s at {self.rate:g}/s: "
            f"{self.failed} failed, CPU {self.cpu_seconds:.2f} s (call phase {self.cpu_seconds - self.store_cpu:.2f} s "
            f"over {self.wall_seconds:.1f} s + {self.store_cpu:.2f} s over {self.store_seconds:.1f} s until "
            f"{self.cdr_rows} CDRs{' and the recordings' if self.recorded else ''} were stored), "
            f"{num(self.cpu_per_call)} s/call, RTP relayed {num(self.relayed, '.0f')}"
        )
        if self.recorded:
            text += (
                f"; recordings: {self.rows} rows, {self.files} WAVs ({self.stereo} stereo), "
                f"{self.total_bytes / 1e6:.1f} MB, {self.on_time} within {TOLERANCE:g} s of {self.duration:g} s "
                f"(worst off by {num(self.worst, '.3f')} s), {self.partial} .part left"
            )
        text += f"; media clock skipped {self.skipped_ticks} ticks in {self.clock_skips} jumps"
        return text + problems_and_error(self.log_problems, self.error)


def count_rows(db: Path, table: str) -> int:
    """Rows of ``table`` in the server's database (0 while it cannot be read)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute(f"select count(*) from {table}").fetchone()[0])  # noqa: S608 (our table names)
    except sqlite3.Error:
        return 0


async def wait_stored(db: Path, run: Run) -> None:
    """Return once every answered call has its CDR row (and its recording row
    in the recorded run), or after STORE_LIMIT seconds."""
    deadline = time.monotonic() + STORE_LIMIT
    while time.monotonic() < deadline:
        if count_rows(db, "cdr") >= run.successful and (not run.recorded or count_rows(db, "recordings") >= run.successful):
            return
        await asyncio.sleep(0.2)


def inspect_recordings(run: Run, data_dir: Path) -> None:
    """Fill in the recorded run's rows, files, bytes and lengths."""
    db = data_dir / "pbx.db"
    run.cdr_rows = count_rows(db, "cdr")
    run.rows = count_rows(db, "recordings")
    folder = data_dir / "recordings"
    if not folder.is_dir():
        return
    run.partial = sum(1 for _ in folder.rglob("*.part"))
    offsets = []
    for path in sorted(folder.rglob("*.wav")):
        run.files += 1
        run.total_bytes += path.stat().st_size
        try:
            with wave.open(str(path), "rb") as wav:
                seconds = wav.getnframes() / wav.getframerate()
                run.stereo += wav.getnchannels() == 2
        except (wave.Error, EOFError) as exc:
            print(f"{path}: not a readable WAV: {exc}", file=sys.stderr)
            continue
        offsets.append(abs(seconds - run.duration))
    run.on_time = sum(1 for off in offsets if off <= TOLERANCE)
    run.worst = max(offsets, default=None)


def read_log(run: Run, server: Server) -> None:
    """Media clock skips and the first few WARNING/ERROR lines from the server's log."""
    for line in server.log:
        found = CLOCK_LATE.search(line)
        if found:
            run.clock_skips += 1
            run.skipped_ticks += int(found[1])
        if any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL")) and len(run.problem_lines) < 5:
            run.problem_lines.append(line)


async def pbx_run(run: Run, work: Path, log_level: str) -> None:
    """The calls through `pbx serve`, recorded or not; fill in ``run``."""
    # 1001 places every call of the run at once and 1002 takes them all: lift their max_calls (default 4).
    extensions = {ext: {"name": f"User {ext}", "password": PASSWORDS[ext], "record": run.recorded, "max_calls": 1000} for ext in ("1001", "1002")}
    server = await start_server(
        work / "pbx",
        log_level=log_level,
        rtp={"ip": "127.0.0.1", "ports": RTP_PORTS},
        sip={"auth_algorithms": ["MD5", "SHA-256"]},  # SIPp 3.6 answers only the first challenge, and only MD5
        extensions=extensions,
        recording={"stereo": True},
    )
    pid = server.proc.pid
    readings: list[float] = []  # place_calls reads the CPU at the start and the end of the call phase

    def cpu() -> float:
        readings.append(cpu_seconds(pid))
        return readings[-1]

    try:
        system = System(server.sip, cpu_seconds=cpu, relayed=lambda: metric_sample(server, RELAYED_METRIC))
        await place_calls(system, run, work)
        if len(readings) == 2:
            t0 = time.monotonic()
            await wait_stored(server.folder / "pbx.db", run)
            run.store_cpu = cpu_seconds(pid) - readings[-1]
            run.store_seconds = time.monotonic() - t0
            run.cpu_seconds += run.store_cpu
    finally:
        await stop_server(server, work, run.log_problems)
        read_log(run, server)
    inspect_recordings(run, server.folder)
    if run.missing:
        run.error = (run.error + "; " if run.error else "") + f"{run.missing} recordings missing"


def table(base: Run, rec: Run) -> str:
    head = [
        "run", "calls", "failed", "CPU s", "CPU s/call", "ratio", "rec rows", "WAVs", "MB",
        f"WAV +-{TOLERANCE:g} s", "clock skipped ticks", "log WARNING/ERROR",
    ]  # fmt: skip
    ratio = rec.cpu_per_call / base.cpu_per_call if rec.cpu_per_call is not None and base.cpu_per_call else None
    rows = [head]
    for run in (base, rec):
        rows.append(
            [
                run.system,
                str(run.calls),
                str(run.failed),
                f"{run.cpu_seconds:.2f}",
                num(run.cpu_per_call),
                num(ratio, ".2f") if run is rec else "1.00",
                str(run.rows) if run.recorded else "-",
                str(run.files) if run.recorded else "-",
                f"{run.total_bytes / 1e6:.1f}" if run.recorded else "-",
                str(run.on_time) if run.recorded else "-",
                str(run.skipped_ticks),
                "/".join(str(run.log_problems.get(lv, 0)) for lv in ("WARNING", "ERROR")),
            ]
        )
    return aligned(rows)


async def main(args: argparse.Namespace) -> int:
    if not sipp_ready(PCAP):
        return 2
    runs = []
    for index, recorded in enumerate((False, True), 1):
        run = Run("recorded" if recorded else "baseline", args.calls, args.duration, args.rate, recorded=recorded)
        limit = args.calls / args.rate + args.duration + 120 + STORE_LIMIT
        await run_bounded(
            index, run, lambda r, w: pbx_run(r, w, args.log_level), limit=limit, keep=args.keep, prefix=f"pbx-bench-recording-{run.system}-"
        )
        for line in run.problem_lines:
            print(f"  server log: {line}", flush=True)
        runs.append(run)
    base, rec = runs
    print()
    print(table(base, rec))
    print(
        f"\n{args.calls} calls x {args.duration:g} s at {args.rate:g}/s, 1001 -> 1002 (echo), G.711 A-law both ways. "
        "CPU: the server process over the call phase and until the rows were stored; ratio: CPU per call "
        "recorded / baseline (same script run). recorded: 1001 has record: true, stereo WAV; WAV +-: files within "
        f"{TOLERANCE:g} s of the call's {args.duration:g} s. clock skipped ticks: from the server's "
        "'media clock ... late' warnings."
    )
    ratio = rec.cpu_per_call / base.cpu_per_call if rec.cpu_per_call is not None and base.cpu_per_call else None
    record("recording", f"CPU s/call recorded vs unrecorded, {args.calls} calls", rec.cpu_per_call, base.cpu_per_call, ratio, "-", None)
    ok = all(r.failed == 0 and not r.error for r in runs) and rec.missing == 0
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per run, all up at once (default 100)")
    parser.add_argument("--duration", type=float, default=16, help="seconds each call lasts once answered (default 16)")
    parser.add_argument("--rate", type=float, default=10, help="new calls per second (default 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs, database, WAVs) even when it passed")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.duration <= 0 or args.rate <= 0:
        parser.error("--calls, --duration and --rate must be positive")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
