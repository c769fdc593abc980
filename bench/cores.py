"""Benchmark: bridged calls on one core and on two (issue 16, points 4 and 5).

The calls of bench/bridge.py (a SIPp caller as 1001 sending G.711 A-law
from /usr/share/sip-tester/g711a.pcap through `pbx serve` to a SIPp callee
registered as 1002 that echoes it), with --rate and --duration chosen so
that all --calls calls of a run are up at once. For each N in --calls, two
runs of `pbx serve`:

- one core: the server, its threads and its media relay processes pinned
  to CPU 0 (sched_setaffinity). SIPp and dumpcap stay free, so they mostly have
  the other core to themselves: the one-core figure gets the best of it.
- two cores: nothing pinned; SIPp and dumpcap share both cores with the server.

Counted as bench/bridge.py does: failed calls, CPU seconds per call (server
and relay process, over the call phase), and RTP on the wire: "lost" is
what the SIPps sent to the relay less what the relay delivered to them.
A run holds its N when no call failed and no packet was lost (the capture
itself losing none). The capacity of a setting is the largest N it holds;
the figure is two-core capacity / one-core capacity (target: at least 1.7,
at about the same CPU per call).

The calls ramp up at 20 a second by default: at 50 a second SIPp's UAS,
sharing the two cores, answered late enough for the server to retransmit
INVITEs, and aborted those calls. How fast calls can be set up is
bench/setup.py's question; this one asks how many can be up at once.

    .venv/bin/python bench/cores.py --calls 200 400 600 800
"""

from __future__ import annotations

import script_path  # noqa: F401, I001  (first: the import path for everything below)

import argparse
import asyncio
import functools
import sys

from bench.bridge import MIN_DELIVERED, Run, pbx_run, ready  # noqa: E402
from bench.measure import aligned, num, run_bounded  # noqa: E402
from bench.summary import record  # noqa: E402

SETTINGS = {"one core": {0}, "two cores": None}


def lost(run: Run) -> int | None:
    return run.wire.sent - run.wire.delivered if run.wire is not None else None


def holds(run: Run) -> bool:
    """No failed call, no packet lost, a complete capture."""
    return not run.failed and not run.error and lost(run) == 0 and run.wire is not None and not run.wire.lost


def table(runs: dict[str, list[Run]]) -> str:
    rows = [["setting", "calls", "failed", "sent", "delivered", "lost", "CPU s/call", "relay processes", "holds"]]
    for setting, setting_runs in runs.items():
        for run in setting_runs:
            share = run.relay_process_cpu / run.cpu_seconds if run.relay_process_cpu is not None and run.cpu_seconds else None
            rows.append(
                [
                    setting, str(run.calls), str(run.failed), num(run.wire.sent if run.wire else None, "d"),
                    num(run.delivered, "d"), num(lost(run), "d"), num(run.cpu_per_call),
                    f"{share:.0%}" if share is not None else "n/a", "yes" if holds(run) else "no",
                ]
            )  # fmt: skip
    return aligned(rows)


def capacity(runs: list[Run]) -> int:
    """The largest N held, 0 when none."""
    return max((run.calls for run in runs if holds(run)), default=0)


async def main(args: argparse.Namespace) -> int:
    if not ready():
        return 2
    runs: dict[str, list[Run]] = {setting: [] for setting in SETTINGS}
    index = 0
    for calls in args.calls:
        for setting, cpus in SETTINGS.items():
            index += 1
            run = Run(setting, calls, args.duration, args.rate)
            runner = functools.partial(pbx_run, log_level="INFO", cpus=cpus)
            await run_bounded(index, run, runner, limit=calls / args.rate + args.duration + 120, keep=args.keep, prefix="pbx-bench-cores-")
            runs[setting].append(run)
    print()
    print(table(runs))
    one, two = capacity(runs["one core"]), capacity(runs["two cores"])
    ratio = two / one if one else None
    print(
        f"\ncapacity (largest N held: no failed call, no packet lost): one core {one}, two cores {two}, "
        f"ratio {num(ratio, '.2f')} (target >= 1.7). Calls up at once: all N ({args.rate:g}/s for {args.duration:g} s). "
        f"Runs under {MIN_DELIVERED:.0%} delivered are also flagged by bridge.py's check."
    )
    record("cores", "bridged calls held, two cores / one core", two, one, ratio, ">= 1.7", ratio is not None and ratio >= 1.7)
    most = max(args.calls)
    at_most = [run for run in runs["two cores"] if run.calls == most]
    if at_most:
        run = at_most[0]
        record("cores", f"{most} bridged calls at once, packets lost", lost(run) or 0, None, None, "0", holds(run))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[200, 300, 400, 500], help="calls per run (default 200 300 400 500)")
    parser.add_argument("--duration", type=float, default=30, help="seconds each call lasts once answered (default 30)")
    parser.add_argument("--rate", type=float, default=20, help="new calls per second (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs) even when it passed")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.calls) or args.duration <= 0 or args.rate <= 0:
        parser.error("--calls, --duration and --rate must be positive")
    if args.duration < max(args.calls) / args.rate:
        parser.error("--duration must be at least the largest --calls / --rate, so that all calls are up at once")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
