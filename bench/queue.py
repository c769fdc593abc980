"""Benchmark: callers waiting in a queue with music on hold and announcements (issue 4).

Two runs of `pbx serve`, each on a temporary folder, with the same callers:

- queue: --callers callers (default 200) dial 7000, routed `queue:bench`,
  at --rate new calls per second (default 50: all 200 within 4 s, while 20
  agents talking 3 s take about 6 a second), so that they pile up in line;
  --agents agents (default 20) take one call at a time each. Each waiting caller
  hears the `default` music-on-hold class from config/sounds and, every 20 s,
  its position and expected wait; callbacks are off.
- no-wait: the same callers, and as many agents as callers, so that each is
  answered at once. The same calls through the same code (answered by the
  queue, one announcement begun, bridged to an agent for the same talk time),
  only without the wait.

Callers (bench/scenarios/queue_caller.xml) call from 127.0.0.2, the address of
a trunk, so without authentication; they send G.711 A-law from SIPp's
g711a.pcap the whole call, as a phone does (--no-audio: nothing), and stay on
the line until the PBX hangs up. The agents are extensions 2001, 2002, ...
registered (bench/scenarios/queue_register.xml, digest auth) at the address of
one SIPp UAS (queue_agent.xml) that answers every call with -rtp_echo, talks
--talk seconds (default 3) and hangs up itself; the PBX then hangs up the
caller. The queue: strategy longest-idle, ring_timeout 15, wrapup 0,
max_wait 900, recording off. Before measuring, one warm-up caller waits alone
until its announcement plays (the music and the prompts are then loaded), and
is answered once the agents have registered.

Measured over the call phase (caller SIPp start to its exit): CPU seconds of
the server process minus its idle rate (measured for --idle seconds before)
times the phase's length; failed calls (the callers' SIPp FailedCall counter
and calls never finished; the agent UAS's FailedCall); and, from the
`queue_log` table, callers who entered, were answered, their waits (answer
data.wait) and the most waiting at once. From these:

- CPU per waiting caller-minute: (CPU of the queue run - CPU of the no-wait
  run) / the minutes callers waited in the queue run: what waiting itself
  costs (music, announcements, keeping the caller's leg), with call set-up,
  talk and tear-down taken out by the no-wait run. Also per caller.
- ratio: CPU of the queue run / CPU of the no-wait run, the same calls
  with and without the wait.
- arrival order: the order of the `answer` rows' call ids against the
  order of the `enter` rows', and the same for each call's first `offer`
  row; enter order is also held against the order SIPp dialed in (the call
  number in SIPp's Call-IDs). The queue promises offers in arrival order;
  answers follow it unless two agents' 200 OKs to offers made in the same
  instant overtake each other, which the table shows apart.

    .venv/bin/python bench/queue.py                       # --callers 200 --agents 20
    .venv/bin/python bench/queue.py --callers 20 --agents 4 --talk 2

Exit status 1 when a call failed, a caller was not answered or an offer or
answer broke arrival order. Everything runs on loopback (127.0.0.1 and
127.0.0.2), every subprocess has a time limit and is ended at the end of its
run, and the script ends by itself. Needs sipp (Debian sip-tester);
play_pcap_audio needs root or CAP_NET_RAW (or --no-audio). The server runs at
--log-level INFO, like the other benchmarks.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = script_path.ROOT

from tests.support.server import Server, free_port, start_server  # noqa: E402
from tests.support.sipp import SippResult, run_sipp, start_sipp  # noqa: E402

from bench.measure import aligned, cpu_seconds, num, problems_and_error, run_bounded, show_failure, sipp_ready, stop_server  # noqa: E402
from bench.summary import record  # noqa: E402

SCENARIOS = ROOT / "bench" / "scenarios"
CALLER = SCENARIOS / "queue_caller.xml"
AGENT = SCENARIOS / "queue_agent.xml"
REGISTER = SCENARIOS / "queue_register.xml"
SOUNDS = ROOT / "config" / "sounds"
PCAP = Path("/usr/share/sip-tester/g711a.pcap")
CALLER_IP = "127.0.0.2"  # SIPp's address for the callers: a trunk's
QUEUE_NUMBER = "7000"
QUEUE = "bench"
FIRST_AGENT = 2001  # agents are extensions 2001, 2002, ...
ANNOUNCE_EVERY = 20  # seconds
# RTP ports of the PBX: below Linux's ephemeral range (32768-60999), where
# SIPp's media ports are; 4 per call (caller and agent side, RTP and RTCP).
RTP_PORTS = (20000, 31998)
# REGISTERs per second. The warm-up caller is offered to the first agent as
# soon as it registers, before the UAS is up; the PBX's INVITE retransmissions
# reach the UAS once all agents are registered, so that should be quick.
REGISTER_RATE = 200
HANDLING_SLACK = 0.5  # seconds an agent's call takes beyond the talk: set-up, the next offer
WARM_UP_LIMIT = 30.0  # seconds for the warm-up call to be announced, and as long again to be answered
WARM_UP_LISTEN = 2.0  # seconds the warm-up caller listens to its announcement before agents come
ANNOUNCED = re.compile(rf"call \S+: queue {QUEUE} announces position \d+")


@dataclass
class Order:
    """How one sequence of call ids compares with the order callers entered."""

    compared: int = 0
    out_of_place: int = 0  # positions where the sequence names another call than enter order does
    max_shift: int = 0  # the farthest a call moved from its place in enter order

    @property
    def kept(self) -> bool:
        return self.out_of_place == 0

    def verdict(self) -> str:
        if not self.compared:
            return "n/a"
        return "yes" if self.kept else f"no ({self.out_of_place} out of place, up to {self.max_shift})"


def compare_order(sequence: list[str], reference: list[str]) -> Order:
    """``sequence`` against ``reference`` restricted to the calls ``sequence`` holds."""
    wanted = set(sequence)
    expected = [c for c in reference if c in wanted]
    place = {c: i for i, c in enumerate(expected)}
    shifts = [abs(i - place[c]) for i, c in enumerate(sequence) if c in place]
    return Order(
        compared=len(sequence),
        out_of_place=sum(1 for a, b in zip(sequence, expected, strict=False) if a != b) + abs(len(sequence) - len(expected)),
        max_shift=max(shifts, default=0),
    )


@dataclass
class QueueLog:
    """What the `queue_log` rows of the call phase say."""

    entered: list[str] = field(default_factory=list)  # call ids in enter order
    offered: list[str] = field(default_factory=list)  # call ids in the order of their first offer
    answered: list[str] = field(default_factory=list)  # call ids in answer order
    waits: list[float] = field(default_factory=list)  # seconds, of the answered
    offers: int = 0  # offer rows (more than one per caller when an agent did not answer)
    ring_no_answer: int = 0
    abandoned: int = 0
    timeouts: int = 0
    completed: int = 0
    peak_waiting: int = 0  # callers in line at once, from enter and leave rows

    @property
    def wait_seconds(self) -> float:
        return sum(self.waits)


def read_queue_log(db: Path, since: str) -> QueueLog:
    """The rows of queue ``QUEUE`` written at ``since`` (ISO time) or later, in id order."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "select call_id, event, data from queue_log where queue = ? and time >= ? order by id", (QUEUE, since)
        ).fetchall()
    log = QueueLog()
    first_offer: set[str] = set()
    waiting = 0
    for call_id, event, data in rows:
        if event == "enter":
            log.entered.append(call_id)
            waiting += 1
            log.peak_waiting = max(log.peak_waiting, waiting)
        elif event == "offer":
            log.offers += 1
            if call_id not in first_offer:
                first_offer.add(call_id)
                log.offered.append(call_id)
        elif event == "answer":
            log.answered.append(call_id)
            log.waits.append(float(json.loads(data or "{}").get("wait", 0.0)))
            waiting -= 1
        elif event == "ring-no-answer":
            log.ring_no_answer += 1
        elif event in ("abandon", "timeout"):
            log.abandoned += event == "abandon"
            log.timeouts += event == "timeout"
            waiting -= 1
        elif event == "complete":
            log.completed += 1
    return log


def sipp_call_number(call_id: str) -> int | None:
    """SIPp's call number from its default Call-ID, "NUMBER-PID@IP"."""
    found = re.match(r"(\d+)-\d+@", call_id)
    return int(found[1]) if found else None


@dataclass
class Run:
    system: str  # "queue" or "no-wait"
    calls: int  # callers placed
    agents: int
    talk: float
    rate: float
    successful: int = 0
    failed: int = 0  # callers
    agent_failed: int = 0
    cpu_seconds: float = 0.0  # over the call phase
    idle_cpu: float = 0.0  # idle rate x the phase's length
    wall_seconds: float = 0.0
    log: QueueLog = field(default_factory=QueueLog)
    announcements: int = 0  # position announcements the server logged in the call phase
    log_problems: dict[str, int] = field(default_factory=dict)  # server log lines by level (WARNING, ERROR)
    error: str = ""

    @property
    def net_cpu(self) -> float:
        return self.cpu_seconds - self.idle_cpu

    @property
    def answer_order(self) -> Order:
        return compare_order(self.log.answered, self.log.entered)

    @property
    def offer_order(self) -> Order:
        return compare_order(self.log.offered, self.log.entered)

    @property
    def dial_order(self) -> Order:
        """Enter order against the order SIPp dialed in."""
        numbered = [(sipp_call_number(c), c) for c in self.log.entered]
        dialed = [c for n, c in sorted((n, c) for n, c in numbered if n is not None)]
        return compare_order(self.log.entered, dialed) if len(dialed) == len(numbered) else Order()

    @property
    def unanswered(self) -> int:
        return self.calls - len(self.log.answered)

    def summary(self, index: int) -> str:
        waits = self.log.waits
        text = (
            f"run {index} {self.system}: {self.calls} callers at {self.rate:g}/s, {self.agents} agents talking "
            f"{self.talk:g} s: {self.failed} callers failed, {self.agent_failed} agent calls failed; queue_log: "
            f"{len(self.log.entered)} entered, {len(self.log.answered)} answered, {self.log.offers} offers, "
            f"{self.log.ring_no_answer} not answered, {self.log.abandoned} abandoned, {self.log.timeouts} timed out, "
            f"{self.log.completed} completed, up to {self.log.peak_waiting} waiting, wait mean "
            f"{num(sum(waits) / len(waits) if waits else None, '.1f')} max {num(max(waits, default=None), '.1f')} s, "
            f"{self.announcements} position announcements; CPU {self.cpu_seconds:.2f} s - idle {self.idle_cpu:.2f} s "
            f"over a {self.wall_seconds:.1f} s call phase; arrival order: answers {self.answer_order.verdict()}, "
            f"offers {self.offer_order.verdict()}, enters as dialed {self.dial_order.verdict()}"
        )
        return text + problems_and_error(self.log_problems, self.error)


def agent_numbers(count: int) -> list[str]:
    return [str(FIRST_AGENT + i) for i in range(count)]


def agent_password(extension: str) -> str:
    return f"bench-agent-{extension}"


def phase_estimate(callers: int, agents: int, talk: float, rate: float) -> float:
    """Seconds the callers should take: arriving, then served agents at a time."""
    return callers / rate + math.ceil(callers / agents) * (talk + HANDLING_SLACK)


async def register_agents(server: Server, work: Path, agents: list[str], port: int) -> None:
    """REGISTER every agent with digest auth from ``port``, where the agent UAS
    will listen, and make sure the server holds all their contacts."""
    inf = work / "agents.csv"
    # SIPp expands no keyword inside [authentication ...], but does expand
    # one an injected field holds: so the third field is the whole keyword.
    lines = (f"{a};{agent_password(a)};[authentication username={a} password={agent_password(a)}]\n" for a in agents)
    inf.write_text("SEQUENTIAL\n" + "".join(lines))
    before = await server.metric("pbx_registrations")
    result = await run_sipp(
        REGISTER,
        server.sip,
        local_port=port,
        calls=len(agents),
        extra=["-inf", str(inf), "-r", str(REGISTER_RATE), "-l", str(len(agents))],
        timeout=len(agents) / REGISTER_RATE + 20,
        log_dir=work / "register",
    )
    if not result.ok or result.successful_calls != len(agents):
        show_failure("REGISTER of the agents", result)
        raise RuntimeError(f"{result.successful_calls} of {len(agents)} agents registered")
    held = await server.metric("pbx_registrations") - before
    if held < len(agents):
        raise RuntimeError(f"SIPp registered {len(agents)} agents but the server holds {held:g} new contacts")


async def place_calls(run: Run, server: Server, work: Path, audio: bool, timeout: float) -> SippResult:
    return await run_sipp(
        CALLER,
        server.sip,
        local_ip=CALLER_IP,
        service=QUEUE_NUMBER,
        calls=run.calls,
        extra=["-set", "audio", "1" if audio else "0", "-l", str(run.calls), "-r", str(run.rate)],
        timeout=timeout,
        trace_messages=False,
        log_dir=work / "callers",
    )


async def measure_idle(pid: int, seconds: float) -> float:
    """CPU seconds per second of process ``pid`` while nothing happens."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


def now_iso() -> str:
    """Now, written as the server writes queue_log times."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


async def pbx_run(run: Run, work: Path, args: argparse.Namespace) -> None:
    """Register the agents, warm up, then the measured callers; fill in ``run``."""
    agents = agent_numbers(run.agents)
    server = await start_server(
        work / "pbx",
        log_level=args.log_level,
        sip={"auth_algorithms": ["MD5", "SHA-256"]},  # SIPp 3.6 answers only the first challenge, and only MD5
        rtp={"ip": "127.0.0.1", "ports": list(RTP_PORTS)},
        sounds={"dir": str(SOUNDS)},
        extensions={a: {"name": f"Agent {a}", "password": agent_password(a)} for a in agents},
        trunks={"callers": {"host": f"{CALLER_IP}:5060", "inbound_from": [f"{CALLER_IP}/32"]}},
        inbound={QUEUE_NUMBER: f"queue:{QUEUE}"},
        queues={
            QUEUE: {
                "strategy": "longest-idle",
                "agents": agents,
                "ring_timeout": 15,
                "wrapup": 0,
                "max_wait": 900,
                "moh": "default",
                "announce": {"position": True, "wait_time": True, "every": ANNOUNCE_EVERY},
                "record": False,
                "callback": {"enabled": False},
            }
        },
    )
    warm = uas = None
    try:
        # The warm-up caller waits alone until its announcement has begun, so
        # that the music and the prompts are loaded; then the agents come and
        # one of them takes it.
        warm = await start_sipp(
            CALLER,
            server.sip,
            local_ip=CALLER_IP,
            service=QUEUE_NUMBER,
            calls=1,
            timeout=2 * WARM_UP_LIMIT + run.talk,
            extra=["-set", "audio", "0"],
            log_dir=work / "warm-up",
            ready_timeout=0,
        )
        await server.wait_log(ANNOUNCED.pattern, timeout=WARM_UP_LIMIT)
        await asyncio.sleep(WARM_UP_LISTEN)
        uas_port = free_port()
        await register_agents(server, work, agents, uas_port)
        uas = await start_sipp(
            AGENT,
            local_port=uas_port,
            extra=["-rtp_echo", "-set", "talk", str(round(run.talk * 1000)), "-aa"],  # -aa: answer the server's qualify OPTIONS
            trace_messages=False,
            log_dir=work / "agents",
        )
        warmed = await warm.wait(2 * WARM_UP_LIMIT + run.talk + 5)
        if not warmed.ok:
            show_failure("warm-up call", warmed)
            raise RuntimeError("the warm-up call through the queue failed")
        idle_rate = await measure_idle(server.proc.pid, args.idle)
        since, log_from = now_iso(), len(server.log)
        limit = 2 * phase_estimate(run.calls, run.agents, run.talk, run.rate) + 60
        cpu_before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        callers = await place_calls(run, server, work, args.audio, limit)
        cpu_after, t1 = cpu_seconds(server.proc.pid), time.monotonic()
        run.cpu_seconds, run.wall_seconds = cpu_after - cpu_before, t1 - t0
        run.idle_cpu = idle_rate * run.wall_seconds
        run.successful = callers.successful_calls or 0
        run.failed = max(run.calls - run.successful, callers.failed_calls or 0)
        if not callers.ok or run.failed:
            run.error = f"callers' SIPp exit code {callers.returncode}"
            show_failure(f"{run.system}: callers ({CALLER.name})", callers)
        run.announcements = sum(1 for line in server.log[log_from:] if ANNOUNCED.search(line))
    finally:
        if warm is not None and warm.proc.returncode is None:
            await warm.stop(grace=0, keep_logs=True)
        if uas is not None:
            agent_result = await uas.stop(grace=run.talk + 2, keep_logs=True)
            run.agent_failed = agent_result.failed_calls or 0
            if run.agent_failed:
                run.error = (run.error + "; " if run.error else "") + f"agent UAS saw {run.agent_failed} failed calls"
                show_failure(f"{run.system}: agents ({AGENT.name})", agent_result)
        await stop_server(server, work, run.log_problems)
    run.log = read_queue_log(server.folder / "pbx.db", since)
    problems = []
    if run.unanswered:
        problems.append(f"{run.unanswered} callers not answered")
    if not run.offer_order.kept or not run.answer_order.kept:
        problems.append("arrival order broken")
    if problems:
        run.error = "; ".join([run.error, *problems] if run.error else problems)


# --- report -------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    head = [
        "run", "callers", "agents", "failed callers", "failed agents", "answered", "peak waiting", "mean wait s",
        "max wait s", "waiting caller-min", "CPU s", "answers in order", "offers in order",
    ]  # fmt: skip
    rows = [head]
    for run in runs:
        waits = run.log.waits
        rows.append(
            [
                run.system,
                str(run.calls),
                str(run.agents),
                str(run.failed),
                str(run.agent_failed),
                str(len(run.log.answered)),
                str(run.log.peak_waiting),
                num(sum(waits) / len(waits) if waits else None, ".1f"),
                num(max(waits, default=None), ".1f"),
                f"{run.log.wait_seconds / 60:.1f}",
                f"{run.net_cpu:.2f}",
                run.answer_order.verdict(),
                run.offer_order.verdict(),
            ]
        )
    return aligned(rows)


def waiting_cost(queue: Run, base: Run) -> str:
    """The figures for waiting itself: the queue run less the no-wait run."""
    extra = queue.net_cpu - base.net_cpu
    minutes = (queue.log.wait_seconds - base.log.wait_seconds) / 60
    ratio = queue.net_cpu / base.net_cpu if base.net_cpu > 0 else None
    rows = [
        ["CPU s per waiting caller-minute", "CPU s per caller", "% of a core per waiting caller", "ratio queue/no-wait"],
        [
            num(extra / minutes if minutes > 0 else None),
            num(extra / queue.calls),
            num(100 * extra / (minutes * 60) if minutes > 0 else None, ".3f"),
            num(ratio, ".2f"),
        ],
    ]
    return aligned(rows)


def record_summary(queue: Run, base: Run) -> None:
    """The headline figures for `make bench`'s summary table: what a waiting
    caller-minute costs, queue against no-wait CPU (neither has a target) and
    answers in arrival order (target: all)."""
    extra = queue.net_cpu - base.net_cpu
    minutes = (queue.log.wait_seconds - base.log.wait_seconds) / 60
    load = f"{queue.calls} callers/{queue.agents} agents"
    record("queue", f"CPU s/waiting caller-minute, {load}", extra / minutes if minutes > 0 else None, None, None, "-", None)
    ratio = queue.net_cpu / base.net_cpu if base.net_cpu > 0 else None
    record("queue", f"CPU s queue vs no-wait, {load}", queue.net_cpu, base.net_cpu, ratio, "-", None)
    order = queue.answer_order
    kept = order.kept and queue.offer_order.kept and order.compared == queue.calls
    record("queue", f"answers out of arrival order, {load}", order.out_of_place, None, None, "0", kept if order.compared else None)


async def main(args: argparse.Namespace) -> int:
    if not sipp_ready(PCAP if args.audio else None, hint="; --no-audio sends none"):
        return 2
    runs = []
    for index, (system, agents) in enumerate((("queue", args.agents), ("no-wait", args.callers)), 1):
        run = Run(system, args.callers, agents, args.talk, args.rate)
        limit = 2 * phase_estimate(args.callers, agents, args.talk, args.rate) + args.idle + 3 * args.talk + 240
        await run_bounded(index, run, lambda r, w: pbx_run(r, w, args), limit=limit, keep=args.keep, prefix=f"pbx-bench-queue-{system}-")
        runs.append(run)
    queue, base = runs
    print()
    print(table(runs))
    print()
    print(waiting_cost(queue, base))
    order = queue.answer_order
    print(
        f"\narrival order kept: {'yes' if order.kept and queue.offer_order.kept and order.compared == queue.calls else 'no'} "
        f"({order.compared} answers of {queue.calls} callers compared with the order of the enter rows in queue_log; "
        f"first offers: {queue.offer_order.verdict()}; enter rows against SIPp's dialing order: {queue.dial_order.verdict()})"
    )
    print(
        f"\nqueue: {args.callers} callers at up to {args.rate:g} new calls/s, {args.agents} agents (longest-idle, "
        f"wrapup 0) each talking {args.talk:g} s then hanging up; music on hold `default`, position and wait "
        f"announced every {ANNOUNCE_EVERY} s ({queue.announcements} announcements); callers "
        f"{'send G.711 A-law the whole call' if args.audio else 'send no audio'}, agents echo it. no-wait: the same "
        f"callers with {args.callers} agents, so nobody waits. CPU s: the server process over the call phase minus "
        "its idle rate over as long. CPU per waiting caller-minute: (queue - no-wait) / the caller-minutes spent "
        "waiting in the queue run, i.e. what waiting itself costs; ratio: queue / no-wait CPU, the same calls "
        "with and without the wait."
    )
    record_summary(queue, base)
    ok = all(r.failed == 0 and r.agent_failed == 0 and not r.error for r in runs)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=200, help="callers per run (default 200)")
    parser.add_argument("--agents", type=int, default=20, help="agents in the queue run (default 20)")
    parser.add_argument("--talk", type=float, default=3, help="seconds an agent talks before hanging up (default 3)")
    parser.add_argument("--rate", type=float, default=50, help="new calls per second (default 50)")
    parser.add_argument("--idle", type=float, default=10, help="seconds the idle server is measured before the calls (default 10)")
    parser.add_argument("--no-audio", dest="audio", action="store_false", help="callers send no RTP (no root needed)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO"], help="the server's log level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs, database) even when it passed")
    args = parser.parse_args(argv)
    if args.callers < 1 or args.agents < 1 or args.talk <= 0 or args.rate <= 0 or args.idle <= 0:
        parser.error("--callers, --agents, --talk, --rate and --idle must be positive")
    if FIRST_AGENT + args.callers > 9999:
        parser.error(f"at most {9999 - FIRST_AGENT} callers (agents are 4-digit extensions from {FIRST_AGENT})")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
