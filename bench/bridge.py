"""Benchmark: what the PBX spends relaying bridged calls, against Kamailio + rtpengine (ENGINE.md, "Targets").

For each N in --calls, three runs with the same SIPp caller and callee:

- pbx: `pbx serve` on a temporary folder, bridging the calls (B2BUA) and
  relaying their RTP.
- pbx recording: the same, with every call recorded (1001 has `record:
  true`; stereo WAV), its files written during the call phase.
- baseline: Kamailio (bench/baseline/kamailio.cfg) as registrar and
  record-routing proxy, with rtpengine relaying the media in userspace
  (--table=-1, no kernel module; --num-threads=1, one poller thread besides
  its timer threads). Kamailio challenges REGISTER and INVITE with MD5 digest
  auth, as the PBX does, so both see the same SIP exchanges.

A run: register a SIPp UAS as extension 1002 (bench/scenarios/register.xml, on
the port the UAS then listens on); start that UAS (uas_echo.xml) with
-rtp_echo; then a SIPp UAC as extension 1001 (uac_pcap.xml) places N calls to
1002, at --rate calls per second with up to N at once, each --duration seconds
long, sending G.711 A-law from /usr/share/sip-tester/g711a.pcap, which the UAS
echoes back. So every packet crosses the relay twice: caller -> callee and back.
The caller offers PCMA only and the callee answers with the first codec
offered to it, so the same codec is on both sides of the relay.

Measured, over the call phase only (UAC start to UAC exit):
- CPU seconds (utime + stime from /proc/PID/stat) of the server process and
  its media relay process (the summary line gives the relay process's share), or
  of every Kamailio process (its main process and the children it forks)
  plus rtpengine's;
- failed calls (SIPp's exit code and the "FailedCall" counter of its
  -trace_stat file);
- RTP packets on the wire, so that a relay that drops packets cannot look
  cheap: dumpcap captures on `lo` (headers only, to the run's temporary
  folder) the UDP between the relay's RTP ports and the media ports (-mp) of
  the two SIPps, both ways. "delivered" counts the RTP packets (not RTCP) the
  relay sent to SIPp's UAS and UAC, "sent" those the SIPps sent to the relay;
  "deliv %" is delivered / sent, and a run under MIN_DELIVERED (99%) is
  flagged as failed, as is one whose capture lost packets. g711a.pcap holds
  236 packets of 30 ms over 7.05 s, played from the answer and again every
  7.08 s while more than that is left, cut short by the hang-up: a 16 s call
  carries about 534 packets each way, so about 1068 delivered per call (the
  summary line states the figure for --duration);
- for reference in the summary line, the relays' own counts (the PBX's
  pbx_rtp_packets_relayed_total, rtpengine's "Total relayed packets"; "n/a"
  when absent).

The table at the end sets them side by side per N, with the ratio pbx /
baseline of CPU per call (the target is at most 1.0). dumpcap runs during the
call phase of both systems alike; its own CPU is not counted in either.

    .venv/bin/python bench/bridge.py --calls 200
    .venv/bin/python bench/bridge.py --calls 50 100 200 --duration 16 --rate 10

Everything runs on 127.0.0.1, every subprocess has a time limit and is ended
at the end of its run, and the script ends by itself. play_pcap_audio uses a
raw socket and dumpcap a packet socket: run as root (or give both
CAP_NET_RAW). The server runs at --log-level INFO by default, unlike the test helper's DEBUG, so that logging
does not weigh on the CPU figure; Kamailio logs notices and up, rtpengine
warnings and up. Needs `kamailio`, `rtpengine-daemon` and dumpcap (Debian
tshark), which `make bench` installs.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = script_path.ROOT

from tests.support.server import PASSWORDS, Server, free_port, start_server  # noqa: E402
from tests.support.sipp import free_media_port, run_sipp, start_sipp  # noqa: E402

from bench.capture import Capture, Delivery, pcap_packets, relay_filter  # noqa: E402
from bench.kamailio_baseline import (  # noqa: E402
    KAMAILIO_WORKERS,
    Daemon,
    find_programs,
    kamailio_command,
    program_version,
    rtpengine_answers,
    rtpengine_command,
    rtpengine_relayed,
    sip_answers,
)
from bench.measure import aligned, children_cpu_seconds, cpu_seconds, num, pin, run_bounded, show_failure, sipp_ready  # noqa: E402
from bench.summary import record  # noqa: E402

SCENARIOS = ROOT / "bench" / "scenarios"
KAMAILIO_CFG = ROOT / "bench" / "baseline" / "kamailio.cfg"
PCAP = Path("/usr/share/sip-tester/g711a.pcap")
RELAYED_METRIC = "pbx_rtp_packets_relayed_total"
# RTP ports of the PBX and of rtpengine (never both at once): below Linux's
# ephemeral range (32768-60999), where the SIPp sockets get theirs; 4 per
# call (two legs, RTP and RTCP) and to spare.
RTP_PORTS = [20000, 31998]
PCAP_REPLAY = 7.080  # seconds between the starts of g711a.pcap in uac_pcap.xml
MIN_DELIVERED = 0.99  # of the RTP packets SIPp sent to the relay, the share it must deliver


@functools.cache
def packets_per_call(duration: float) -> int:
    """RTP packets uac_pcap.xml sends in a call of ``duration`` seconds:
    g711a.pcap from the answer, again every PCAP_REPLAY seconds while more
    than that is left, each play cut short by the hang-up. The UAS echoes
    them, so a relay delivers twice as many per call."""
    stamps = [stamp for stamp, _ in pcap_packets(PCAP)]
    offsets = [stamp - stamps[0] for stamp in stamps]
    total, start = 0, 0.0
    while True:
        total += sum(1 for offset in offsets if start + offset < duration)
        if duration - start <= PCAP_REPLAY:
            return total
        start += PCAP_REPLAY


@dataclass
class Run:
    system: str  # "pbx" or "baseline"
    calls: int
    duration: float
    rate: float
    successful: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    relayed: float | None = None  # as the relay counts them
    wire: Delivery | None = None  # as captured between the relay and the two SIPps (None: no capture)
    detail: str = ""  # what was measured, when it is more than one process
    relay_process_cpu: float | None = None  # pbx: of cpu_seconds, the relay process's
    error: str = ""

    @property
    def cpu_per_call(self) -> float | None:
        return self.cpu_seconds / self.successful if self.successful else None

    @property
    def cpu_per_call_minute(self) -> float | None:
        minutes = self.successful * self.duration / 60
        return self.cpu_seconds / minutes if minutes else None

    @property
    def delivered(self) -> int | None:
        return self.wire.delivered if self.wire else None

    @property
    def delivered_per_call(self) -> float | None:
        return self.wire.delivered / self.successful if self.wire and self.successful else None

    @property
    def delivered_ratio(self) -> float | None:
        return self.wire.ratio if self.wire else None

    def wire_summary(self) -> str:
        if self.wire is None:
            return "RTP on the wire n/a"
        w = self.wire
        return (
            f"RTP on the wire: SIPp sent {w.sent} (caller {w.from_caller}, callee {w.from_callee}), relay delivered "
            f"{w.delivered} (to callee {w.to_callee}, to caller {w.to_caller}) = {percent(w.ratio)}%, "
            f"{num(self.delivered_per_call, '.1f')}/call (expected {2 * packets_per_call(self.duration)}), "
            f"capture lost {num(w.lost, 'd')}"
        )

    def summary(self, index: int) -> str:
        text = (
            f"run {index} {self.system}: {self.calls} calls x {self.duration:g} s at {self.rate:g}/s: "
            f"{self.failed} failed, CPU {self.cpu_seconds:.2f} s "
            f"({num(self.cpu_per_call)} s/call, {num(self.cpu_per_call_minute)} s per call-minute), "
            f"RTP relayed by its count {num(self.relayed, '.0f')}, call phase {self.wall_seconds:.1f} s; "
            + self.wire_summary()
        )
        if self.relay_process_cpu is not None and self.cpu_seconds:
            text += f" (relay process {self.relay_process_cpu / self.cpu_seconds:.0%} of the CPU)"
        text += f" ({self.detail})" if self.detail else ""
        return text + (f" [{self.error}]" if self.error else "")


@dataclass
class System:
    """What the calls go through: its SIP address, the CPU seconds it has used
    so far, and the RTP packets it has relayed so far (None: unknown)."""

    sip: str
    cpu_seconds: Callable[[], float]
    relayed: Callable[[], Awaitable[float | None]]
    relay_process_cpu_seconds: Callable[[], float] | None = None  # the pbx's share of cpu_seconds in its relay process


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


async def place_calls(system: System, run: Run, work: Path) -> None:
    """Register the echoing UAS as 1002 with ``system``, place the run's
    calls from 1001 through it while capturing their RTP, and fill in ``run``."""
    # 1002 is a SIPp UAS: register it from the port it will answer on.
    uas_port = free_port()
    reg = await run_sipp(
        SCENARIOS / "register.xml",
        system.sip,
        local_port=uas_port,
        service="1002",
        extra=["-au", "1002", "-ap", PASSWORDS["1002"]],
        timeout=10,
        log_dir=work / "register",
    )
    if not reg.ok:
        show_failure(f"{run.system}: REGISTER of 1002", reg)
        run.error, run.failed = "registration failed", run.calls
        return
    echo = await start_sipp(
        SCENARIOS / "uas_echo.xml",
        local_port=uas_port,
        extra=["-rtp_echo", "-l", str(run.calls * 2 + 10), "-aa"],  # -aa: answer the server's qualify OPTIONS
        trace_messages=False,
        log_dir=work / "uas",
    )
    caller_media = free_media_port()
    capture: Capture | None = None
    try:
        relayed_before = await system.relayed()
        phase_limit = run.calls / run.rate + run.duration + 60
        capture = await Capture.start(
            work / "rtp.pcap",
            relay_filter(RTP_PORTS, [caller_media, echo.media_port]),
            seconds=phase_limit + 10,
            max_packets=int(run.calls * 4 * packets_per_call(run.duration) * 1.5) + 1000,  # 2 directions x 2 ends
        )
        cpu_before, t0 = system.cpu_seconds(), time.monotonic()
        relay_before = system.relay_process_cpu_seconds() if system.relay_process_cpu_seconds else 0.0
        uac = await run_sipp(
            SCENARIOS / "uac_pcap.xml",
            system.sip,
            service="1002",
            calls=run.calls,
            media_port=caller_media,
            extra=[
                "-au", "1001", "-ap", PASSWORDS["1001"], "-auth_uri", f"1002@{system.sip}",  # digest uri = Request-URI
                "-set", "duration", str(int(run.duration * 1000)),
                "-l", str(run.calls), "-r", str(run.rate),
            ],  # fmt: skip
            timeout=phase_limit,
            trace_messages=False,
            log_dir=work / "uac",
        )
        cpu_after, t1 = system.cpu_seconds(), time.monotonic()
        if system.relay_process_cpu_seconds:
            run.relay_process_cpu = system.relay_process_cpu_seconds() - relay_before
        relayed_after = await system.relayed()
    finally:
        uas = await echo.stop(grace=3)
        if capture is not None:
            run.wire = await capture.delivery(caller_media, echo.media_port)

    run.cpu_seconds, run.wall_seconds = cpu_after - cpu_before, t1 - t0
    if relayed_before is not None and relayed_after is not None:
        run.relayed = relayed_after - relayed_before
    run.successful = uac.successful_calls or 0
    run.failed = run.calls - run.successful  # failed ones, and any never finished
    if uac.failed_calls and uac.failed_calls > run.failed:
        run.failed = uac.failed_calls
    if not uac.ok or run.failed:
        run.error = f"UAC exit code {uac.returncode}"
        show_failure(f"{run.system}: UAC (uac_pcap.xml)", uac)
    if uas.failed_calls:
        run.error = (run.error + "; " if run.error else "") + f"UAS saw {uas.failed_calls} failed calls"
        show_failure(f"{run.system}: UAS (uas_echo.xml)", uas)
    problem = run.wire.problem(MIN_DELIVERED) if run.wire else "RTP capture unreadable"
    if problem:
        run.error = (run.error + "; " if run.error else "") + problem
    elif run.wire is not None and run.wire.delivered >= run.wire.sent:
        with contextlib.suppress(OSError):
            (work / "rtp.pcap").unlink()  # it can be large; kept only to look into a shortfall or (with --keep) a packet lost


async def pbx_run(run: Run, work: Path, log_level: str, cpus: set[int] | None = None, record: bool = False) -> None:
    """The calls through `pbx serve`; the CPU of its process and of its media
    relay process. ``cpus``: the cores both may run on (default: all).
    ``record``: every call recorded (1001 has `record: true`, stereo WAV)."""
    server = await start_server(
        work / "pbx",
        log_level=log_level,
        rtp={"ip": "127.0.0.1", "ports": RTP_PORTS},
        sip={"auth_algorithms": ["MD5", "SHA-256"]},  # SIPp 3.6 answers only the first challenge, and only MD5
        # 1001 places every call of the run at once and 1002 takes them all: lift their max_calls (default 4).
        extensions={
            ext: {"name": f"User {ext}", "password": PASSWORDS[ext], "max_calls": 1000, "record": record and ext == "1001"}
            for ext in ("1001", "1002")
        },
        recording={"stereo": True},
    )
    try:
        if cpus is not None:
            pin(server.proc.pid, cpus)
        system = System(
            server.sip,
            cpu_seconds=lambda: cpu_seconds(server.proc.pid),
            relayed=lambda: metric_sample(server, RELAYED_METRIC),
            relay_process_cpu_seconds=lambda: children_cpu_seconds(server.proc.pid),
        )
        await place_calls(system, run, work)
    finally:
        code = await server.stop()
        (work / "pbx" / "server.log").write_text("\n".join(server.log) + "\n")  # for a kept run (--keep)
        if code:
            print(f"pbx serve exited with {code}; its last lines:", file=sys.stderr)
            print("\n".join(server.log[-20:]), file=sys.stderr)


async def baseline_run(run: Run, work: Path, programs: dict[str, str]) -> None:
    """The calls through Kamailio with rtpengine; CPU of all their processes."""
    sip_port, ng_port, cli_port = free_port(), free_port(), free_port(socket.SOCK_STREAM)
    rundir = work / "kamailio"
    rundir.mkdir(parents=True)
    async with contextlib.AsyncExitStack() as stack:
        rtpengine = await Daemon.start(
            "rtpengine",
            rtpengine_command(programs["rtpengine"], ng_port, cli_port, RTP_PORTS, work / "rtpengine.pid"),
            work / "rtpengine.log",
        )
        stack.push_async_callback(rtpengine.stop)
        await rtpengine.wait_ready(lambda: rtpengine_answers(ng_port))
        kamailio = await Daemon.start(
            "kamailio",
            kamailio_command(
                programs["kamailio"],
                KAMAILIO_CFG,
                sip_port,
                rundir,
                [
                    f'RTPENGINE_SOCK="udp:127.0.0.1:{ng_port}"',
                    f'PASSWORD_1001="{PASSWORDS["1001"]}"',
                    f'PASSWORD_1002="{PASSWORDS["1002"]}"',
                ],
            ),
            work / "kamailio.log",
        )
        stack.push_async_callback(kamailio.stop)
        await kamailio.wait_ready(lambda: sip_answers(sip_port))
        daemons = (kamailio, rtpengine)
        system = System(
            f"127.0.0.1:{sip_port}",
            cpu_seconds=lambda: sum(d.cpu_seconds() for d in daemons),
            relayed=lambda: rtpengine_relayed(cli_port),
        )
        await place_calls(system, run, work)
        threads = len(os.listdir(f"/proc/{rtpengine.proc.pid}/task"))
        run.detail = f"{len(kamailio.pids())} Kamailio processes + rtpengine with {threads} threads"


def ratio(pbx: Run, base: Run) -> float | None:
    """pbx / baseline of CPU per call."""
    if pbx.cpu_per_call is None or not base.cpu_per_call:
        return None
    return pbx.cpu_per_call / base.cpu_per_call


def table(runs: list[tuple[Run, Run, Run]]) -> str:
    """One row per N: the PBX's figures, recording and not, the baseline's,
    and pbx / baseline of CPU per call."""
    head = [
        "calls", "failed pbx", "failed rec", "failed base", "CPU s/call pbx", "CPU s/call rec", "CPU s/call base",
        "pbx/base", "rec/base", "delivered pbx", "delivered rec", "delivered base", "deliv/call pbx", "deliv/call base",
        "deliv % pbx", "deliv % rec", "deliv % base",
    ]  # fmt: skip
    rows = [head]
    for pbx, rec, base in runs:
        rows.append(
            [
                str(pbx.calls), str(pbx.failed), str(rec.failed), str(base.failed),
                num(pbx.cpu_per_call), num(rec.cpu_per_call), num(base.cpu_per_call),
                num(ratio(pbx, base), ".2f"), num(ratio(rec, base), ".2f"),
                num(pbx.delivered, "d"), num(rec.delivered, "d"), num(base.delivered, "d"),
                num(pbx.delivered_per_call, ".1f"), num(base.delivered_per_call, ".1f"),
                percent(pbx.delivered_ratio), percent(rec.delivered_ratio), percent(base.delivered_ratio),
            ]
        )  # fmt: skip
    return aligned(rows)


def record_summary(runs: list[tuple[Run, Run, Run]]) -> None:
    """The headline figures of each N for `make bench`'s summary table."""
    for pbx, rec, base in runs:
        for run, target in ((pbx, 1.0), (rec, 1.3)):
            figure = f"CPU s/call vs Kamailio+rtpengine, {run.calls} calls{', recorded' if run is rec else ''}"
            r = ratio(run, base)
            met = r is not None and r <= target and not run.failed and not run.error
            record("bridge", figure, run.cpu_per_call, base.cpu_per_call, r, f"<= {target:g}", met)


def percent(ratio: float | None) -> str:
    return num(ratio * 100 if ratio is not None else None, ".2f")


def ready() -> bool:
    """Whether SIPp can play the calls' audio and dumpcap capture it; says why not."""
    if not sipp_ready(PCAP):
        return False
    if shutil.which("dumpcap") is None:
        print("dumpcap is not installed (Debian: apt-get install tshark; make bench does)", file=sys.stderr)
        return False
    return True


async def main(args: argparse.Namespace) -> int:
    if not ready():
        return 2
    programs = find_programs()
    if programs is None:
        return 2
    runners: dict[str, Callable[[Run, Path], Awaitable[None]]] = {
        "pbx": functools.partial(pbx_run, log_level=args.log_level),
        "pbx recording": functools.partial(pbx_run, log_level=args.log_level, record=True),
        "baseline": functools.partial(baseline_run, programs=programs),
    }
    pairs: list[tuple[Run, Run, Run]] = []
    for index, calls in enumerate(args.calls, 1):
        runs = []
        for system, runner in runners.items():
            run = Run(system, calls, args.duration, args.rate)
            limit = calls / args.rate + args.duration + 120
            await run_bounded(index, run, runner, limit=limit, keep=args.keep, prefix=f"pbx-bench-{system.replace(' ', '-')}-")
            runs.append(run)
        pairs.append((runs[0], runs[1], runs[2]))
    print()
    print(table(pairs))
    kamailio = program_version([programs["kamailio"], "-v"])
    rtpengine = program_version([programs["rtpengine"], "--version"])
    print(
        f"\nbaseline: Kamailio {kamailio} ({KAMAILIO_WORKERS} UDP workers; registrar and record-routing proxy, "
        f"MD5 digest auth on REGISTER and INVITE) + rtpengine {rtpengine} (userspace: --table=-1, "
        "--num-threads=1); its CPU is that of all their processes together. pbx/base: CPU per call, target <= 1.0; "
        "rec/base: the same with every call recorded by pbx (stereo WAV), target <= 1.3."
        f"\ndelivered: RTP packets captured on lo from the relay to the two SIPps' media ports; per call "
        f"{2 * packets_per_call(args.duration)} expected for {args.duration:g} s calls (g711a.pcap, 30 ms packets, "
        f"caller -> callee and the echo back). deliv %: delivered / RTP the SIPps sent to the relay, "
        f"flagged under {MIN_DELIVERED:.0%}."
    )
    record_summary(pairs)
    return 0 if all(r.failed == 0 and not r.error for pair in pairs for r in pair) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[200], help="calls per run; several values make several runs (default 200)")
    parser.add_argument("--duration", type=float, default=16, help="seconds each call lasts once answered (default 16)")
    parser.add_argument("--rate", type=float, default=10, help="new calls per second (default 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs) even when it passed")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.calls) or args.duration <= 0 or args.rate <= 0:
        parser.error("--calls, --duration and --rate must be positive")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
