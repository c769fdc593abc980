"""Benchmark: what the PBX spends relaying bridged calls (ENGINE.md, "Targets").

For each run: start `pbx serve` on a temporary folder; register a SIPp UAS as
extension 1002 (bench/scenarios/register.xml, on the port the UAS then listens
on); start that UAS (uas_echo.xml) with -rtp_echo; then a SIPp UAC as extension
1001 (uac_pcap.xml) places N calls to 1002 through the PBX, at --rate calls per
second with up to N at once, each --duration seconds long, sending G.711 A-law
from /usr/share/sip-tester/g711a.pcap, which the UAS echoes back. So every
packet crosses the PBX twice: caller -> callee and back.

Measured, over the call phase only (UAC start to UAC exit): the server
process's CPU seconds (utime + stime from /proc/PID/stat), failed calls (SIPp's
exit code and the "FailedCall" counter of its -trace_stat file), and RTP
packets relayed (the server's pbx_rtp_packets_relayed_total, "n/a" when
/metrics has no such sample).

    .venv/bin/python bench/bridge.py --calls 200
    .venv/bin/python bench/bridge.py --calls 50 100 200 --duration 16 --rate 10

Everything runs on 127.0.0.1, every subprocess has a time limit, and the script
ends by itself. play_pcap_audio uses a raw socket: run as root (or give sipp
CAP_NET_RAW). The server runs at --log-level INFO by default, unlike the test
helper's DEBUG, so that logging does not weigh on the CPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.server import PASSWORDS, free_port, start_server  # noqa: E402
from tests.support.sipp import SIPP, SippResult, run_sipp, start_sipp  # noqa: E402

SCENARIOS = ROOT / "bench" / "scenarios"
PCAP = Path("/usr/share/sip-tester/g711a.pcap")
RELAYED_METRIC = "pbx_rtp_packets_relayed_total"
# Server RTP ports: below Linux's ephemeral range (32768-60999), where the
# SIPp sockets get theirs; 4 per call (two legs, RTP and RTCP) and to spare.
RTP_PORTS = [20000, 31998]

@dataclass
class Run:
    calls: int
    duration: float
    rate: float
    successful: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    relayed: float | None = None
    error: str = ""

    @property
    def cpu_per_call(self) -> float | None:
        return self.cpu_seconds / self.successful if self.successful else None

    @property
    def cpu_per_call_minute(self) -> float | None:
        minutes = self.successful * self.duration / 60
        return self.cpu_seconds / minutes if minutes else None

    def summary(self, index: int) -> str:
        per_call = f"{self.cpu_per_call:.4f}" if self.cpu_per_call is not None else "n/a"
        per_min = f"{self.cpu_per_call_minute:.4f}" if self.cpu_per_call_minute is not None else "n/a"
        relayed = f"{self.relayed:.0f}" if self.relayed is not None else "n/a"
        text = (
            f"run {index}: {self.calls} calls x {self.duration:g} s at {self.rate:g}/s: "
            f"{self.failed} failed, server CPU {self.cpu_seconds:.2f} s "
            f"({per_call} s/call, {per_min} s per call-minute), "
            f"RTP relayed {relayed}, call phase {self.wall_seconds:.1f} s"
        )
        return text + (f" [{self.error}]" if self.error else "")

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")

async def metric_sample(server: Server, name: str) -> float | None:
    """The value of an unlabelled sample on /metrics; None when absent."""
    try:
        async with asyncio.timeout(5):
            status, text = await server.http("/metrics")
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    if status != 200:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == name or sample.startswith(name + "{"):
            total = (total or 0.0) + float(value)
    return total

def show_failure(what: str, result: SippResult) -> None:
    print(f"--- {what} failed ---", file=sys.stderr)
    print(result.report(lines=30), file=sys.stderr)

async def one_run(calls: int, duration: float, rate: float, log_level: str, work: Path) -> Run:
    run = Run(calls, duration, rate)
    server = await start_server(
        work / "pbx",
        log_level=log_level,
        rtp={"ip": "127.0.0.1", "ports": RTP_PORTS},
        sip={"auth_algorithms": ["MD5", "SHA-256"]},  # SIPp 3.6 answers only the first challenge, and only MD5
    )
    echo = None
    try:
        # 1002 is a SIPp UAS: register it from the port it will answer on.
        uas_port = free_port()
        reg = await run_sipp(
            SCENARIOS / "register.xml",
            server.sip,
            local_port=uas_port,
            service="1002",
            extra=["-au", "1002", "-ap", PASSWORDS["1002"]],
            timeout=10,
            log_dir=work / "register",
        )
        if not reg.ok:
            show_failure("REGISTER of 1002", reg)
            run.error, run.failed = "registration failed", calls
            return run
        echo = await start_sipp(
            SCENARIOS / "uas_echo.xml",
            local_port=uas_port,
            extra=["-rtp_echo", "-l", str(calls * 2 + 10)],
            trace_messages=False,
            log_dir=work / "uas",
        )

        relayed_before = await metric_sample(server, RELAYED_METRIC)
        phase_limit = calls / rate + duration + 60
        cpu_before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        uac = await run_sipp(
            SCENARIOS / "uac_pcap.xml",
            server.sip,
            service="1002",
            calls=calls,
            extra=[
                "-au", "1001", "-ap", PASSWORDS["1001"],
                "-set", "duration", str(int(duration * 1000)),
                "-l", str(calls), "-r", str(rate),
            ],  # fmt: skip
            timeout=phase_limit,
            trace_messages=False,
            log_dir=work / "uac",
        )
        cpu_after, t1 = cpu_seconds(server.proc.pid), time.monotonic()
        relayed_after = await metric_sample(server, RELAYED_METRIC)

        run.cpu_seconds, run.wall_seconds = cpu_after - cpu_before, t1 - t0
        if relayed_before is not None and relayed_after is not None:
            run.relayed = relayed_after - relayed_before
        run.successful = uac.successful_calls or 0
        run.failed = calls - run.successful  # failed ones, and any never finished
        if uac.failed_calls and uac.failed_calls > run.failed:
            run.failed = uac.failed_calls
        if not uac.ok or run.failed:
            run.error = f"UAC exit code {uac.returncode}"
            show_failure("UAC (uac_pcap.xml)", uac)
        uas = await echo.stop(grace=3)
        echo = None
        if uas.failed_calls:
            run.error = (run.error + "; " if run.error else "") + f"UAS saw {uas.failed_calls} failed calls"
            show_failure("UAS (uas_echo.xml)", uas)
        return run
    finally:
        if echo is not None:
            await echo.stop(grace=0)
        code = await server.stop()
        if code:
            print(f"pbx serve exited with {code}; its last lines:", file=sys.stderr)
            print("\n".join(server.log[-20:]), file=sys.stderr)

def table(runs: list[Run]) -> str:
    head = ["calls", "failed", "server CPU s", "CPU s/call", "CPU s/call-min", "RTP relayed", "call phase s"]
    rows = [head]
    for r in runs:
        rows.append(
            [
                str(r.calls),
                str(r.failed),
                f"{r.cpu_seconds:.2f}",
                f"{r.cpu_per_call:.4f}" if r.cpu_per_call is not None else "n/a",
                f"{r.cpu_per_call_minute:.4f}" if r.cpu_per_call_minute is not None else "n/a",
                f"{r.relayed:.0f}" if r.relayed is not None else "n/a",
                f"{r.wall_seconds:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

async def main(args: argparse.Namespace) -> int:
    if shutil.which(SIPP) is None:
        print("sipp is not installed (Debian: apt-get install sip-tester)", file=sys.stderr)
        return 2
    if not PCAP.exists():
        print(f"{PCAP} is missing (it comes with sip-tester)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("warning: not root; SIPp's play_pcap_audio needs CAP_NET_RAW to send RTP", file=sys.stderr)
    runs: list[Run] = []
    for index, calls in enumerate(args.calls, 1):
        work = Path(tempfile.mkdtemp(prefix="pbx-bench-"))
        limit = calls / args.rate + args.duration + 120
        try:
            async with asyncio.timeout(limit):
                run = await one_run(calls, args.duration, args.rate, args.log_level, work)
        except TimeoutError:
            run = Run(calls, args.duration, args.rate, failed=calls, error=f"run exceeded {limit:.0f} s")
        except Exception as exc:  # the server did not start, a port was taken, ...
            print(f"run {index} broke off: {type(exc).__name__}: {exc}", file=sys.stderr)
            run = Run(calls, args.duration, args.rate, failed=calls, error=type(exc).__name__)
        runs.append(run)
        print(run.summary(index), flush=True)
        if run.error or args.keep:
            print(f"  logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(runs))
    return 0 if all(r.failed == 0 and not r.error for r in runs) else 1

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[50], help="calls per run; several values make several runs (default 50)")
    parser.add_argument("--duration", type=float, default=16, help="seconds each call lasts once answered (default 16)")
    parser.add_argument("--rate", type=float, default=10, help="new calls per second (default 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, SIPp logs) even when it passed")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.calls) or args.duration <= 0 or args.rate <= 0:
        parser.error("--calls, --duration and --rate must be positive")
    return args

if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
