"""Benchmark: call set-up and registration rates, registration against Kamailio (issue 16, point 3).

Three runs, one after the other:

- calls: `pbx serve` answers --call-rate new calls a second for --duration
  seconds (SIPp, bench/scenarios/uac_setup.xml) to 8000, routed `ivr:setup`,
  a menu that plays a prompt and waits for a key; SIPp calls from
  127.0.0.2, a trunk's address (no authentication), stays --hold seconds in
  the call without sending media and hangs up. Target: 0 failed, p99
  INVITE->200 under 200 ms.
- registrations, pbx: the same server (--users extensions 2000, 2001, ...
  in its config) answers --register-rate registrations a second for
  --duration seconds (bench/scenarios/register_users.xml): each a REGISTER,
  its 401 challenge, the REGISTER with MD5 digest credentials and its 200;
  --clients SIPp processes share the rate, each registering one user over
  and over (SIPp 3.6.1 cannot take digest users from an injection file), so
  all but the first registration of each refresh a binding. Target: 0
  failed, p99 under 100 ms (of the authenticated REGISTER -> 200; the
  challenge's is shown too).
- registrations, baseline: Kamailio (bench/baseline/registrar.cfg, auth_db on
  a db_text table with the same users and passwords, bindings in memory)
  answers the same load.

Measured over each SIPp run (start to exit): exchanges SIPp completed and
failed (its SuccessfulCall/FailedCall counters; calls never finished count as
failed), response times from SIPp's -trace_rtt file (p50 and p99; whole
milliseconds, so a figure under 1 ms shows as 0 and no ratio), and the
CPU seconds (utime + stime) of the server's process, or of all of Kamailio's
processes, per 1000 exchanges completed. The table sets pbx and Kamailio side
by side with the ratios pbx / Kamailio of CPU per 1000 registrations and p99.
The PBX offers only MD5 here, as Kamailio does: SIPp answers only MD5, and
two challenges a 401 would weigh on the PBX's figure alone. Unlike
Kamailio's in-memory usrloc, the PBX writes every binding to its SQLite store
(so a restart keeps it): that is in its figure.

    .venv/bin/python bench/setup.py                    # 100 calls/s, 500 registrations/s, 60 s each
    .venv/bin/python bench/setup.py --quick            # 10 s each, a smoke run
    .venv/bin/python bench/setup.py --call-rate 50 --register-rate 200 --duration 30

Everything runs on loopback, every subprocess has a time limit and is ended
at the end of its run, and the script ends by itself. Exit status 0 only when
every target is met. Needs sipp (Debian sip-tester) and kamailio (which
`make bench` installs); the server runs at --log-level INFO, like the other
benchmarks.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse
import asyncio
import csv
import functools
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = script_path.ROOT

from tests.support.server import Server, free_port, start_server  # noqa: E402
from tests.support.sipp import run_sipp  # noqa: E402

from bench.kamailio_baseline import KAMAILIO_WORKERS, Daemon, find_programs, kamailio_command, program_version, sip_answers  # noqa: E402
from bench.measure import aligned, cpu_seconds, num, problems_and_error, run_bounded, show_failure, sipp_ready, stop_server  # noqa: E402
from bench.summary import record  # noqa: E402

SCENARIOS = ROOT / "bench" / "scenarios"
CALL_SCENARIO = SCENARIOS / "uac_setup.xml"
REGISTER_SCENARIO = SCENARIOS / "register_users.xml"
REGISTRAR_CFG = ROOT / "bench" / "baseline" / "registrar.cfg"
SOUNDS = ROOT / "config" / "sounds"
CALLER_IP = "127.0.0.2"  # SIPp's address for calls: a trunk's, so no authentication
SERVICE = "8000"
FLOW_NAME = "setup"
FLOW = """\
# bench/setup.py's flow: answer, play a prompt, wait for a key the caller never presses.
start: menu
nodes:
  menu:
    type: menu
    prompt: welcome
    options: {"1": hangup}
    timeout: 30
    retries: 1
    on_fail: hangup
"""
FIRST_USER = 2000
REALM = "pbx.local"
RTP_PORTS = [20000, 31998]  # below Linux's ephemeral range, where SIPp's ports are
CALL_P99_MS = 200.0
REGISTER_P99_MS = 100.0


def password(user: int) -> str:
    return f"bench-pw-{user}"


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def response_times(log_dir: Path) -> dict[str, list[float]]:
    """Milliseconds per response-time name, from SIPp's -trace_rtt files in
    ``log_dir`` (columns Date_ms;response_time_ms;rtd_no)."""
    times: dict[str, list[float]] = {}
    for path in sorted(log_dir.glob("*_rtt.csv")):
        with open(path, newline="") as f:
            for row in csv.reader(f, delimiter=";"):
                if len(row) < 3 or not row[1].strip().replace(".", "", 1).isdigit():
                    continue  # the heading, or a torn last line
                times.setdefault(row[2].strip(), []).append(float(row[1]))
    return times


@dataclass
class Run:
    what: str  # "calls" or "registrations"
    system: str  # "pbx" or "kamailio"
    rate: float
    seconds: float
    target_ms: float
    calls: int = 0  # exchanges SIPp is to make
    successful: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    times: dict[str, list[float]] = field(default_factory=dict)
    timed: str = ""  # the response time the target is about
    error: str = ""

    def p(self, q: float, name: str | None = None) -> float | None:
        return percentile(self.times.get(name or self.timed, []), q)

    @property
    def cpu_per_1000(self) -> float | None:
        return self.cpu_seconds / self.successful * 1000 if self.successful else None

    @property
    def met(self) -> bool:
        p99 = self.p(99)
        return not self.error and self.failed == 0 and p99 is not None and p99 < self.target_ms

    def summary(self, index: int) -> str:
        text = (
            f"run {index} {self.system} {self.what}: {self.calls} at {self.rate:g}/s: {self.successful} completed, "
            f"{self.failed} failed, {self.timed} p50 {num(self.p(50), '.1f')} ms p99 {num(self.p(99), '.1f')} ms, "
            f"CPU {self.cpu_seconds:.2f} s ({num(self.cpu_per_1000, '.3f')} s per 1000) in {self.wall_seconds:.1f} s"
        )
        return text + (f" [{self.error}]" if self.error else "")


async def drive(
    run: Run, scenario: Path, target: str, work: Path, cpu: Callable[[], float], clients: list[list[str]], local_ip: str
) -> None:
    """Run SIPp's ``scenario`` against ``target``, one SIPp per entry of
    ``clients`` (its own options), together at the run's rate for its
    seconds; fill in ``run`` with what they completed and what ``cpu`` rose by."""
    run.calls = round(run.rate * run.seconds)
    share = [run.calls // len(clients) + (i < run.calls % len(clients)) for i in range(len(clients))]
    folders = [work / f"{run.what}-{i}" for i in range(len(clients))]
    cpu_before, t0 = cpu(), time.monotonic()
    results = await asyncio.gather(
        *(
            run_sipp(
                scenario,
                target,
                local_ip=local_ip,
                calls=calls,
                extra=["-r", f"{run.rate * calls / run.calls:g}", "-trace_rtt", "-rtt_freq", "1", *extra],
                timeout=run.seconds + 60,
                trace_messages=False,
                log_dir=folder,
            )
            for calls, extra, folder in zip(share, clients, folders, strict=True)
        )
    )
    run.cpu_seconds, run.wall_seconds = cpu() - cpu_before, time.monotonic() - t0
    for folder in folders:
        for name, times in response_times(folder).items():
            run.times.setdefault(name, []).extend(times)
    run.successful = sum(r.successful_calls or 0 for r in results)
    run.failed = max(run.calls - run.successful, sum(r.failed_calls or 0 for r in results))
    for index, result in enumerate(results):
        if not result.ok:
            run.error = f"SIPp exit code {result.returncode}"
            show_failure(f"{run.system} {run.what}: SIPp {index}", result)


def register_clients(count: int) -> list[list[str]]:
    """SIPp's options for ``count`` clients, each registering a user of its
    own. One SIPp per user: SIPp 3.6.1 garbles [authentication] with
    injected fields in it (SIPp issue 640), so users cannot come from -inf."""
    return [["-s", str(u), "-au", str(u), "-ap", password(u)] for u in range(FIRST_USER, FIRST_USER + count)]


class PbxSetup:
    """One `pbx serve` for the calls and then the registrations: the flow,
    the trunk SIPp calls from, and the users it registers."""

    def __init__(self, folder: Path, users: int, clients: int, log_level: str) -> None:
        self.folder = folder
        self.users = users
        self.clients = clients
        self.log_level = log_level
        self.server: Server | None = None

    async def start(self) -> Server:
        flows = self.folder / "ivr_flows"
        flows.mkdir(parents=True)
        (flows / f"{FLOW_NAME}.yaml").write_text(FLOW)
        extensions = {str(u): {"name": f"User {u}", "password": password(u)} for u in range(FIRST_USER, FIRST_USER + self.users)}
        self.server = await start_server(
            self.folder,
            log_level=self.log_level,
            sip={"auth_algorithms": ["MD5"]},  # what SIPp answers, and all Kamailio offers
            rtp={"ip": "127.0.0.1", "ports": RTP_PORTS},
            ivr={"dir": str(flows)},
            sounds={"dir": str(SOUNDS)},
            inbound={SERVICE: f"ivr:{FLOW_NAME}"},
            trunks={"sipp": {"host": f"{CALLER_IP}:5060", "inbound_from": [f"{CALLER_IP}/32"]}},
            extensions=extensions,
        )
        return self.server

    async def calls(self, run: Run, work: Path, hold: float) -> None:
        server = await self.start()
        run.timed = "setup"
        # One call first, so that the prompt is decoded and cached before anything is measured.
        warm = Run("warm-up", "pbx", 1, 1, CALL_P99_MS)
        await drive(warm, CALL_SCENARIO, server.sip, work, lambda: 0.0, [["-s", SERVICE, "-d", "200"]], CALLER_IP)
        if warm.failed:
            raise RuntimeError("the warm-up call to the IVR failed")
        pid = server.proc.pid
        await drive(run, CALL_SCENARIO, server.sip, work, lambda: cpu_seconds(pid), [["-s", SERVICE, "-d", str(round(hold * 1000))]], CALLER_IP)

    async def registrations(self, run: Run, work: Path) -> None:
        server = self.server
        if server is None:
            raise RuntimeError("no server: the calls run did not start one")
        run.timed = "register"
        pid = server.proc.pid
        await drive(run, REGISTER_SCENARIO, server.sip, work, lambda: cpu_seconds(pid), register_clients(self.clients), "127.0.0.1")

    async def stop(self, problems: dict[str, int]) -> None:
        if self.server is not None:
            await stop_server(self.server, self.folder, problems)
            self.server = None


async def kamailio_registrations(run: Run, work: Path, kamailio_path: str, users: int, clients: int) -> None:
    """The registrations against Kamailio; CPU of all its processes."""
    run.timed = "register"
    db = work / "db"
    db.mkdir()
    (db / "version").write_text("table_name(str) table_version(int)\nsubscriber:7\n")
    rows = [f"{i}:{u}:{REALM}:{password(u)}" for i, u in enumerate(range(FIRST_USER, FIRST_USER + users), 1)]
    (db / "subscriber").write_text("id(int,auto) username(str) domain(str) password(str)\n" + "\n".join(rows) + "\n")
    rundir = work / "run"
    rundir.mkdir()
    port = free_port()
    kamailio = await Daemon.start(
        "kamailio",
        kamailio_command(kamailio_path, REGISTRAR_CFG, port, rundir, [f'DB_URL="text://{db}"']),
        work / "kamailio.log",
    )
    try:
        await kamailio.wait_ready(lambda: sip_answers(port))
        await drive(run, REGISTER_SCENARIO, f"127.0.0.1:{port}", work, kamailio.cpu_seconds, register_clients(clients), "127.0.0.1")
    finally:
        await kamailio.stop()


def table(runs: list[Run]) -> str:
    head = ["run", "system", "rate/s", "done", "failed", "p50 ms", "p99 ms", "target p99", "met", "CPU s", "CPU s/1000", "done/s"]
    rows = [head]
    for r in runs:
        rows.append(
            [
                r.what,
                r.system,
                f"{r.rate:g}",
                str(r.successful),
                str(r.failed),
                num(r.p(50), ".1f"),
                num(r.p(99), ".1f"),
                f"< {r.target_ms:g} ms",
                "yes" if r.met else "NO",
                f"{r.cpu_seconds:.2f}",
                num(r.cpu_per_1000, ".3f"),
                num(r.successful / r.wall_seconds if r.wall_seconds else None, ".0f"),
            ]
        )
    return aligned(rows)


async def main(args: argparse.Namespace) -> int:
    if not sipp_ready(None):
        return 2
    programs = find_programs()
    if programs is None:
        return 2
    seconds = 10.0 if args.quick else args.duration
    calls = Run("calls", "pbx", args.call_rate, seconds, CALL_P99_MS)
    pbx_reg = Run("registrations", "pbx", args.register_rate, seconds, REGISTER_P99_MS)
    base_reg = Run("registrations", "kamailio", args.register_rate, seconds, REGISTER_P99_MS)
    # The server outlives the two runs it serves: its folder is its own.
    server_dir = Path(tempfile.mkdtemp(prefix="pbx-bench-setup-server-"))
    pbx = PbxSetup(server_dir, args.users, args.clients, args.log_level)
    limit = seconds + 120
    problems: dict[str, int] = {}
    try:
        await run_bounded(1, calls, functools.partial(pbx.calls, hold=args.hold), limit=limit, keep=args.keep, prefix="pbx-bench-setup-calls-")
        await run_bounded(2, pbx_reg, pbx.registrations, limit=limit, keep=args.keep, prefix="pbx-bench-setup-reg-")
    finally:
        await pbx.stop(problems)
    if problems:
        print(f"pbx log{problems_and_error(problems, '')}; kept in {server_dir}")
    elif not args.keep:
        shutil.rmtree(server_dir, ignore_errors=True)
    await run_bounded(
        3, base_reg, lambda run, folder: kamailio_registrations(run, folder, programs["kamailio"], args.users, args.clients),
        limit=limit, keep=args.keep, prefix="pbx-bench-setup-kamailio-",
    )  # fmt: skip
    runs = [calls, pbx_reg, base_reg]
    print()
    print(table(runs))
    cpu_ratio = pbx_reg.cpu_per_1000 / base_reg.cpu_per_1000 if pbx_reg.cpu_per_1000 and base_reg.cpu_per_1000 else None
    p99_pbx, p99_base = pbx_reg.p(99), base_reg.p(99)
    p99_ratio = p99_pbx / p99_base if p99_pbx is not None and p99_base else None
    print(
        f"\nregistrations pbx/kamailio: CPU per 1000 {num(cpu_ratio, '.2f')}x, p99 {num(p99_ratio, '.2f')}x "
        f"({num(p99_pbx, '.1f')} ms vs {num(p99_base, '.1f')} ms); challenge (401) p99 pbx {num(pbx_reg.p(99, 'challenge'), '.1f')} ms, "
        f"kamailio {num(base_reg.p(99, 'challenge'), '.1f')} ms"
    )
    print(
        f"baseline: Kamailio {program_version([programs['kamailio'], '-v'])} ({KAMAILIO_WORKERS} UDP workers; auth_db on "
        f"db_text, plaintext passwords, MD5 qop=auth with nonce counts; usrloc in memory); {args.users} users, {args.clients} registering, "
        f"{seconds:g} s a run; calls held {args.hold:g} s"
    )
    record("setup", f"p99 INVITE->200 ms at {calls.rate:g} calls/s", calls.p(99), None, None, f"< {CALL_P99_MS:g} ms", calls.met)
    record(
        "setup", f"p99 REGISTER->200 ms vs Kamailio at {pbx_reg.rate:g}/s", p99_pbx, p99_base, p99_ratio,
        f"< {REGISTER_P99_MS:g} ms", pbx_reg.met,
    )  # fmt: skip
    record("setup", f"CPU s/1000 registrations vs Kamailio at {pbx_reg.rate:g}/s", pbx_reg.cpu_per_1000, base_reg.cpu_per_1000, cpu_ratio, "-", None)
    return 0 if all(r.met for r in runs) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--call-rate", type=float, default=100, help="new calls per second (default 100)")
    parser.add_argument("--register-rate", type=float, default=500, help="registrations per second (default 500)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of each load (default 60)")
    parser.add_argument("--quick", action="store_true", help="10 s of each load, a smoke run")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds each call stays up after the 200 (default 1)")
    parser.add_argument("--users", type=int, default=1000, help="extensions in the config and in Kamailio's table (default 1000)")
    parser.add_argument("--clients", type=int, default=10, help="SIPp processes sharing the registrations, one user each (default 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs) even when it passed")
    args = parser.parse_args(argv)
    if min(args.call_rate, args.register_rate, args.duration, args.users, args.clients) <= 0 or args.hold < 0:
        parser.error("rates, --duration, --users and --clients must be positive, --hold not negative")
    if args.clients > args.users:
        parser.error("--clients cannot exceed --users: each registers a user of its own")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
