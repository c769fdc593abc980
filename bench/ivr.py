"""Benchmark: IVR playback with DTMF, against pjsua2's C engine (ENGINE.md, "Targets").

For each N in --calls, two runs with the same SIPp caller
(bench/scenarios/ivr_dtmf.xml: PCMU with telephone-event 101; it presses a
key every --interval seconds, 1, 2, 3, ... from SIPp's RFC 4733 pcaps, and
hangs up --duration seconds after the answer):

- pbx: `pbx serve` on a temporary folder answers N calls to 8000, routed
  `ivr:bench`, a looping menu written by this script: the prompt
  [welcome, menu] and every key back into the menu, so each key cuts the
  prompt short and starts it again. SIPp calls from 127.0.0.2, the address of
  a trunk in the config, so no authentication. N calls at up to --rate new
  calls per second, up to N at once.
- baseline: bench/pjsua_baseline.py, pjsua2's C engine (at most 4 calls a
  process, null sound device), in 10 processes answering 4 such calls each
  (one SIPp per process) and playing the same
  prompt (welcome + menu from config/sounds, as one 8 kHz 16-bit mono WAV) in a
  loop to each through its own AudioMediaPlayer, decoding the same keys.

Measured, over the call phase (SIPp start to SIPp exit):
- CPU seconds (utime + stime, read in nanoseconds from the process's CPU
  clock) of the server's process and its children, or of the pjsua2 processes, minus their idle CPU: each is first measured idle for
  as long as its call phase should last (after, for the PBX, one short call
  that loads the prompt), and that idle rate times the phase's length is
  subtracted. The per-call figures are these net seconds / calls that
  succeeded; "ratio" is pbx / baseline per call, "ratio/pkt" per RTP packet
  sent (the median stream's packets; target <= 1.0, issue 16).
- failed calls: the calls SIPp did not complete (its FailedCall counter, and
  any never finished), and the peak of calls at once (SIPp's CurrentCall,
  sampled every second).
- keys: pressed by SIPp (per call: ceil(duration / interval) - 1), and heard:
  for the PBX the menu's visits (pbx_ivr_node_visits_total) beyond one per
  call, for pjsua2 its onDtmfDigit count.
- RTP send intervals: dumpcap captures (bench/capture.py), on `lo`, the UDP
  packets the system under test sends from its RTP ports to SIPp (headers
  only, to a file in the run's temporary folder, bounded in time, packets and
  size); per stream
  (source port and SSRC) the time between consecutive RTP packets, and the
  p50/p99/max over all streams' intervals. Intervals longer than 1 s are
  pauses in which nothing plays (a prompt over and no key yet), counted apart;
  the server sends silence between prompts, so there should be none.
- RTP packets per call: the packets of each stream of that capture over the
  call's --duration, as packets per second (a caller of a continuous stream
  gets 50); the median over the streams and the fewest.

    .venv/bin/python bench/ivr.py                       # --calls 100 200 400 --duration 20
    .venv/bin/python bench/ivr.py --calls 250 --duration 30 --interval 4 --rate 50

Everything runs on loopback (127.0.0.1 and 127.0.0.2), every subprocess has a
time limit and is ended at the end of its run, and the script ends by itself.
Needs sipp (Debian sip-tester) and dumpcap (Debian tshark, which `make bench`
installs); play_pcap_audio and dumpcap need root (or CAP_NET_RAW). The server
runs at --log-level INFO, like bench/bridge.py.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse
import asyncio
import contextlib
import csv
import os
import shutil
import sys
import tempfile
import time
import wave
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: audioop leaves the stdlib in 3.13
    import audioop

ROOT = script_path.ROOT

from tests.support.server import Server, start_server  # noqa: E402
from tests.support.sipp import SIPP, run_sipp  # noqa: E402

from bench.capture import Capture, Intervals  # noqa: E402
from bench.measure import aligned, cpu_seconds, num, problems_and_error, run_bounded, show_failure, stop_server  # noqa: E402
from bench.pjsua_driver import (  # noqa: E402
    BASELINE_CALLS,
    BASELINE_PROCESSES,
    BASELINE_RTP,
    BASELINE_RTP_SPAN,
    Baseline,
    pjsua_version,
)
from bench.summary import record  # noqa: E402

SCENARIO = ROOT / "bench" / "scenarios" / "ivr_dtmf.xml"
SOUNDS = ROOT / "config" / "sounds"
PROMPT = ("welcome", "menu")
PCAP_DIR = Path("/usr/share/sip-tester")
CALLER_IP = "127.0.0.2"  # SIPp's address: a trunk's, for the PBX
SERVICE = "8000"
FLOW_NAME = "bench"
KEYS = "123456789*#"  # what the scenario presses, in this order
FLOW = f"""\
# bench/ivr.py's looping menu: every key the caller presses plays the menu again.
start: menu
nodes:
  menu:
    type: menu
    prompt: [{", ".join(PROMPT)}]
    options: {{{", ".join(f'"{k}": menu' for k in KEYS)}}}
    timeout: 10
    retries: 20
    on_fail: menu
"""
# RTP ports of the PBX: below Linux's ephemeral range (32768-60999), where
# SIPp's media port is; pjsua2's come from BASELINE_RTP.
RTP_PORTS = (20000, 31998)


# --- measurements -------------------------------------------------------------


def capture_filter(ports: tuple[int, int]) -> str:
    """What the system under test sends from its RTP (and RTCP) ports to SIPp."""
    return f"udp and src host 127.0.0.1 and dst host {CALLER_IP} and src portrange {ports[0]}-{ports[1] + 1}"


# --- runs ---------------------------------------------------------------------


@dataclass
class Run:
    system: str  # "pbx" or "baseline"
    calls: int
    duration: float
    interval: float
    rate: float
    successful: int = 0
    failed: int = 0
    peak: int | None = None  # most calls at once, as SIPp counted them
    cpu_seconds: float = 0.0  # over the call phase
    idle_cpu: float = 0.0  # idle rate x the phase's length
    wall_seconds: float = 0.0
    keys_heard: int | None = None
    log_problems: dict[str, int] = field(default_factory=dict)  # server log lines by level (WARNING, ERROR)
    rtp: Intervals = field(default_factory=Intervals)
    error: str = ""

    @property
    def keys_pressed(self) -> int:
        return self.successful * keys_per_call(self.duration, self.interval)

    @property
    def net_cpu(self) -> float:
        return self.cpu_seconds - self.idle_cpu

    @property
    def cpu_per_call(self) -> float | None:
        return self.net_cpu / self.successful if self.successful else None

    def summary(self, index: int) -> str:
        text = (
            f"run {index} {self.system}: {self.calls} calls x {self.duration:g} s at {self.rate:g}/s, a key every "
            f"{self.interval:g} s: {self.failed} failed, peak {num(self.peak, 'd')} at once, keys heard "
            f"{num(self.keys_heard, 'd')}/{self.keys_pressed}; CPU {self.cpu_seconds:.2f} s - idle {self.idle_cpu:.2f} s "
            f"= {num(self.cpu_per_call)} s/call over a {self.wall_seconds:.1f} s call phase; {self.rtp.summary(self.duration)}"
        )
        return text + problems_and_error(self.log_problems, self.error)


def keys_per_call(duration: float, interval: float) -> int:
    """How many keys ivr_dtmf.xml presses in a call: one after every interval
    while more than an interval is left."""
    d, i = round(duration * 1000), round(interval * 1000)
    return max(0, -(-d // i) - 1)


def peak_calls(stat_csv: Path) -> int | None:
    """The largest CurrentCall of a SIPp -trace_stat file."""
    try:
        rows = list(csv.DictReader(stat_csv.read_text(errors="replace").splitlines(), delimiter=";"))
    except OSError:
        return None
    values = [int(r["CurrentCall"]) for r in rows if (r.get("CurrentCall") or "").strip().isdigit()]
    return max(values) if values else None


async def measure_idle(pid: int, seconds: float) -> float:
    """CPU seconds per second of process ``pid`` while nothing happens."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


async def place_calls(
    run: Run,
    work: Path,
    targets: list[tuple[str, int]],
    rtp_ports: tuple[int, int],
    keys_heard: Callable[[], Awaitable[int | None]],
) -> None:
    """Measure each target's process idle, then place the run's calls to the
    targets ((SIP address, pid) each: as many calls to each, one SIPp each)
    while capturing their RTP, and fill in ``run``."""
    phase = run.calls / run.rate + run.duration
    pids = [pid for _, pid in targets]
    idle_rate = sum(await asyncio.gather(*(measure_idle(pid, phase) for pid in pids)))
    limit = phase + 60
    capture = await Capture.start(
        work / "rtp.pcap",
        capture_filter(rtp_ports),
        seconds=limit + 10,
        max_packets=int(run.calls * 50 * (phase + 10) * 1.5) + 1000,
    )
    try:
        heard_before = await keys_heard()
        calls, rate = run.calls // len(targets), run.rate / len(targets)
        cpu_before, t0 = sum(map(cpu_seconds, pids)), time.monotonic()
        uacs = await asyncio.gather(
            *(
                run_sipp(
                    SCENARIO,
                    target,
                    local_ip=CALLER_IP,
                    service=SERVICE,
                    calls=calls,
                    extra=[
                        "-set", "duration", str(round(run.duration * 1000)),
                        "-set", "interval", str(round(run.interval * 1000)),
                        "-l", str(calls), "-r", f"{rate:g}", "-fd", "1",
                        "-aa",  # the server qualifies its trunk (this caller) with OPTIONS
                    ],  # fmt: skip
                    timeout=limit,
                    trace_messages=False,
                    log_dir=work / f"uac{index}",
                )
                for index, (target, _) in enumerate(targets)
            )
        )
        cpu_after, t1 = sum(map(cpu_seconds, pids)), time.monotonic()
        heard_after = await keys_heard()
    finally:
        run.rtp = await capture.intervals()
    with contextlib.suppress(OSError):
        (work / "rtp.pcap").unlink()  # it can be large; the intervals are what counts
    run.cpu_seconds, run.wall_seconds = cpu_after - cpu_before, t1 - t0
    run.idle_cpu = idle_rate * run.wall_seconds
    run.successful = sum(uac.successful_calls or 0 for uac in uacs)
    run.failed = max(run.calls - run.successful, sum(uac.failed_calls or 0 for uac in uacs))
    peaks = [peak_calls(work / f"uac{index}" / f"{SCENARIO.stem}_stat.csv") for index in range(len(targets))]
    run.peak = sum(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None
    if heard_before is not None and heard_after is not None:
        run.keys_heard = heard_after - heard_before
    for uac in uacs:
        if not uac.ok or run.failed:
            run.error = f"SIPp exit code {uac.returncode}"
            show_failure(f"{run.system}: UAC ({SCENARIO.name})", uac)


async def pbx_run(run: Run, work: Path, log_level: str) -> None:
    """The calls to `pbx serve`'s IVR; its one process's CPU."""
    flows = work / "pbx" / "ivr_flows"
    flows.mkdir(parents=True)
    (flows / f"{FLOW_NAME}.yaml").write_text(FLOW)
    server = await start_server(
        work / "pbx",
        log_level=log_level,
        rtp={"ip": "127.0.0.1", "ports": list(RTP_PORTS)},
        ivr={"dir": str(flows)},
        sounds={"dir": str(SOUNDS)},
        inbound={SERVICE: f"ivr:{FLOW_NAME}"},
        trunks={"sipp": {"host": f"{CALLER_IP}:5060", "inbound_from": [f"{CALLER_IP}/32"]}},
    )
    try:

        async def menu_visits() -> int | None:
            try:
                async with asyncio.timeout(5):
                    return round(await server.metric("pbx_ivr_node_visits_total", flow=FLOW_NAME, node="menu"))
            except (OSError, TimeoutError, ValueError, IndexError):
                return None

        await warm_up(server, work)
        await place_calls(run, work, [(server.sip, server.proc.pid)], RTP_PORTS, menu_visits)
        # Every call enters the menu once on answering, and once more for each key.
        if run.keys_heard is not None:
            run.keys_heard -= run.successful
    finally:
        await stop_server(server, work, run.log_problems)


async def warm_up(server: Server, work: Path) -> None:
    """One short call, so that the prompt is decoded and cached before anything is measured."""
    result = await run_sipp(
        SCENARIO,
        server.sip,
        local_ip=CALLER_IP,
        service=SERVICE,
        extra=["-set", "duration", "1500", "-set", "interval", "1000"],
        timeout=20,
        trace_messages=True,
        log_dir=work / "warm-up",
    )
    if not result.ok:
        show_failure("pbx: warm-up call", result)
        raise RuntimeError("the warm-up call to the IVR failed")


async def baseline_run(run: Run, work: Path, wav: Path) -> None:
    """The calls to the pjsua2 processes playing the prompt; their CPU."""
    phase = run.calls / run.rate + run.duration
    baselines: list[Baseline] = []
    try:
        for index in range(BASELINE_PROCESSES):
            rtp_port = BASELINE_RTP[0] + index * BASELINE_RTP_SPAN
            baselines.append(await Baseline.start(wav, work / f"pjsua{index}.log", max_seconds=2 * phase + 120, rtp_port=rtp_port))

        async def no_count() -> int | None:
            return 0

        targets = [(f"127.0.0.1:{b.sip_port}", b.proc.pid) for b in baselines]
        await place_calls(run, work, targets, BASELINE_RTP, no_count)
    finally:
        await asyncio.gather(*(b.stop() for b in baselines))
    run.keys_heard = sum(b.stats.get("digits", 0) for b in baselines)
    players = sum(b.stats.get("players", 0) for b in baselines)
    if players < run.successful:
        run.error = (run.error + "; " if run.error else "") + f"only {players} players started"


def make_prompt_wav(path: Path) -> Path:
    """welcome + menu from config/sounds as one 8 kHz 16-bit mono WAV, which pjmedia reads."""
    pcm = b""
    for name in PROMPT:
        with wave.open(str(SOUNDS / f"{name}.wav"), "rb") as w:
            frames = w.readframes(w.getnframes())
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        if width != 2:
            frames, width = audioop.lin2lin(frames, width, 2), 2
        if channels == 2:
            frames = audioop.tomono(frames, 2, 0.5, 0.5)
        elif channels != 1:
            raise ValueError(f"{name}.wav has {channels} channels")
        if rate != 8000:
            frames, _ = audioop.ratecv(frames, 2, 1, rate, 8000, None)
        pcm += frames
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(pcm)
    return path


# --- report -------------------------------------------------------------------


def per_packet(run: Run) -> float | None:
    """CPU seconds per RTP packet sent: per call, over the median stream's packets."""
    rate = run.rtp.per_second(run.duration)
    if run.cpu_per_call is None or not rate or not rate[0]:
        return None
    return run.cpu_per_call / (rate[0] * run.duration)


def packet_ratio(pbx: Run, base: Run) -> float | None:
    """pbx / pjsua2 of CPU per RTP packet sent."""
    ours, theirs = per_packet(pbx), per_packet(base)
    return ours / theirs if ours is not None and theirs else None


def table(pairs: list[tuple[Run, Run]]) -> str:
    head = [
        "calls", "peak", "failed", "keys heard/sent", "CPU s/call pbx", "RTP pkt/s/call", "RTP p50 ms", "RTP p99 ms",
        "RTP max ms", "CPU s/call base", "base pkt/s/call", "base failed", "ratio", "ratio/pkt",
    ]  # fmt: skip
    rows = [head]
    for pbx, base in pairs:
        ratio = None
        if pbx.cpu_per_call is not None and base.cpu_per_call:
            ratio = pbx.cpu_per_call / base.cpu_per_call
        pbx_rate, base_rate = pbx.rtp.per_second(pbx.duration), base.rtp.per_second(base.duration)
        rows.append(
            [
                str(pbx.calls),
                num(pbx.peak, "d"),
                str(pbx.failed),
                f"{num(pbx.keys_heard, 'd')}/{pbx.keys_pressed}",
                num(pbx.cpu_per_call),
                num(pbx_rate[0] if pbx_rate else None, ".1f"),
                num(pbx.rtp.percentile(50), ".2f"),
                num(pbx.rtp.percentile(99), ".2f"),
                num(pbx.rtp.max, ".1f"),
                num(base.cpu_per_call),
                num(base_rate[0] if base_rate else None, ".1f"),
                str(base.failed),
                num(ratio, ".2f"),
                num(packet_ratio(pbx, base), ".2f"),
            ]
        )
    return aligned(rows)


def record_summary(pairs: list[tuple[Run, Run]]) -> None:
    """The headline figures of each N for `make bench`'s summary table: CPU
    per RTP packet sent against pjsua2's (issue 16: target ratio <= 1.0) and
    the p99 RTP send interval (target 20 +- 5 ms)."""
    for pbx, base in pairs:
        ratio = packet_ratio(pbx, base)
        met = ratio <= 1.0 and not pbx.failed if ratio is not None else None
        record("ivr", f"CPU s/RTP packet sent vs pjsua2, {pbx.calls} calls", per_packet(pbx), per_packet(base), ratio, "<= 1.0", met)
        p99 = pbx.rtp.percentile(99)
        record(
            "ivr", f"RTP send p99 ms, {pbx.calls} calls", p99, base.rtp.percentile(99), None, "20 +- 5 ms",
            abs(p99 - 20) <= 5 if p99 is not None else None,
        )  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    missing = [p for p in ("sipp", "dumpcap") if shutil.which(SIPP if p == "sipp" else p) is None]
    if missing:
        print(f"{' and '.join(missing)} not installed (Debian: sip-tester, tshark; make bench installs them)", file=sys.stderr)
        return 2
    pcaps = [PCAP_DIR / f"dtmf_2833_{k}.pcap" for k in ("1", "9", "star", "pound")]
    if not all(p.exists() for p in pcaps):
        print(f"SIPp's DTMF pcaps are missing from {PCAP_DIR} (they come with sip-tester)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("warning: not root; SIPp's play_pcap_audio and dumpcap need CAP_NET_RAW", file=sys.stderr)
    shared = Path(tempfile.mkdtemp(prefix="pbx-bench-ivr-"))
    try:
        wav = make_prompt_wav(shared / "prompt.wav")
        pairs: list[tuple[Run, Run]] = []
        for index, calls in enumerate(args.calls, 1):
            runs = []
            runners: dict[str, tuple[int, Callable[[Run, Path], Awaitable[None]]]] = {
                "pbx": (calls, lambda run, work: pbx_run(run, work, args.log_level)),
                "baseline": (BASELINE_CALLS * BASELINE_PROCESSES, lambda run, work: baseline_run(run, work, wav)),
            }
            for system, (n, runner) in runners.items():
                run = Run(system, n, args.duration, args.interval, args.rate)
                limit = 2 * (n / args.rate + args.duration) + 180
                await run_bounded(index, run, runner, limit=limit, keep=args.keep, prefix=f"pbx-bench-ivr-{system}-")
                runs.append(run)
            pairs.append((runs[0], runs[1]))
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    print()
    print(table(pairs))
    base = [b.cpu_per_call for _, b in pairs if b.cpu_per_call]
    pbx = [p.cpu_per_call for p, _ in pairs if p.cpu_per_call is not None]
    if len(base) > 1 and pbx:
        mean = sum(base) / len(base)
        print(
            f"\nbaseline over its {len(base)} runs: {mean:.4f} s/call (from {min(base):.4f} to {max(base):.4f}); "
            "pbx against that mean: " + ", ".join(f"{p.calls} calls {p.cpu_per_call / mean:.2f}" for p, _ in pairs if p.cpu_per_call is not None)
        )
    print(
        f"\nEach call {args.duration:g} s, a key every {args.interval:g} s, up to {args.rate:g} new calls/s. CPU s/call: "
        "CPU of the process over the call phase minus its idle rate over as long, per completed call. "
        f"base: pjsua2 {pjsua_version()} (C engine, one AudioMediaPlayer per call, null sound device) answering "
        f"{BASELINE_CALLS * BASELINE_PROCESSES} calls ({BASELINE_CALLS} in each of {BASELINE_PROCESSES} processes) in the same run. ratio: pbx / base per call; ratio/pkt: per RTP packet sent, target <= 1.0. RTP: intervals "
        "between the packets of each stream the PBX sent, captured on lo; target p99 within 20 +- 5 ms. pkt/s/call: "
        "the packets of the median stream over the call's length; a continuous stream is 50."
    )
    record_summary(pairs)
    return 0 if all(r.failed == 0 and not r.error for pair in pairs for r in pair) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[100, 200, 400], help="calls per run; several values make several runs (default 100 200 400)")
    parser.add_argument("--duration", type=float, default=20, help="seconds each call lasts once answered (default 20)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between the keys a caller presses (default 5)")
    parser.add_argument("--rate", type=float, default=50, help="new calls per second (default 50)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs) even when it passed")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.calls) or args.duration <= 0 or args.rate <= 0 or args.interval <= 0:
        parser.error("--calls, --duration, --interval and --rate must be positive")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
