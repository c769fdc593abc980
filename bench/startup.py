"""Benchmark: how long `pbx serve` takes to start on a data folder of a busy site.

Builds a data folder with --cdr CDR rows, --recordings recordings rows and
their files (one small file each under recordings/YYYY/MM/DD/, since start-up
walks that tree for unfinished files), queue_log rows (--queue-log, agent
logins and pauses among them), --voicemail messages, --callbacks callbacks
(a tenth pending) and --registrations live registrations, all spread over the
last 60 days (inside the 90 days of recording retention, so start-up deletes
nothing and only reads). The database is created by the server's own Store
first, so it has the schema and indexes a running server leaves.

Then starts `pbx serve` on it --runs times and measures, from the spawn of the
process: READY=1 on $NOTIFY_SOCKET (a datagram socket of this script, as
systemd's with Type=notify), and the first answer of the SIP port to an
OPTIONS sent every 10 ms. Prints each run and the median; the same on an empty
folder for comparison. The page cache is warm (the files were just written):
a cold disk adds its reads on top.

    .venv/bin/python bench/startup.py                 # 100,000 CDR rows, 10,000 recordings
    .venv/bin/python bench/startup.py --cdr 1000 --recordings 100 --runs 1

Exit status 1 when a start took longer than --limit seconds (default 5).
Everything runs on 127.0.0.1; each server is stopped with SIGTERM.
"""

from __future__ import annotations

import script_path  # noqa: I001  (first: the import path for everything below)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from pbx.store.db import Store, iso_time  # noqa: E402
from tests.support.raw_sip import options_probe  # noqa: E402
from tests.support.server import base_config, free_port, queue_settings, stop_process  # noqa: E402

from bench.summary import record  # noqa: E402

DAY = 86400.0
QUEUES = {"support": ["1001", "1002"], "sales": ["1002", "1001"]}


def build_data(folder: Path, args: argparse.Namespace) -> None:
    """The data folder of a site that has been busy for 60 days."""
    db = folder / "pbx.db"

    async def create_schema() -> None:
        store = Store(db)
        await store.open()
        await store.close()

    asyncio.run(create_schema())
    rng = random.Random(14)
    now = time.time()

    def when() -> float:
        return now - rng.uniform(60, 60 * DAY)

    conn = sqlite3.connect(db)
    queues, agents = list(QUEUES), ["1001", "1002"]
    cdr: list[tuple[Any, ...]] = []
    for _ in range(args.cdr):
        started = when()
        queue = rng.choice(queues + [None, None])
        cdr.append(
            (uuid.uuid4().hex, rng.choice(["inbound", "outbound", "internal"]), "1001", "+15551234567",
             iso_time(started), iso_time(started + 5), iso_time(started + 65), "answered", 65.0, 60.0,
             queue, rng.choice(agents) if queue else None, 5.0 if queue else None, uuid.uuid4().hex, "caller", None)
        )
    columns = "call_id, direction, from_number, to_number, started, answered, ended, disposition, duration, billsec, queue, agent, wait, sip_call_id, hangup, reason"
    conn.executemany(f"insert into cdr ({columns}) values ({', '.join('?' * 16)})", cdr)
    recordings = []
    for row in rng.sample(cdr, min(args.recordings, len(cdr))):
        call_id, started = row[0], row[4]
        path = f"recordings/{started[:4]}/{started[5:7]}/{started[8:10]}/{call_id}.wav"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(b"RIFF")
        recordings.append((call_id, call_id, row[10], row[11], row[2], row[3], started, 60.0, 960044, 2, path))
    columns = "id, call_id, queue, agent, caller, callee, started, seconds, bytes, channels, path"
    conn.executemany(f"insert into recordings ({columns}) values ({', '.join('?' * 11)})", recordings)
    log = []
    for _ in range(args.queue_log):
        event = rng.choices(["enter", "offer", "answer", "abandon", "login", "pause", "unpause", "logout"], [30, 30, 25, 5, 3, 3, 3, 1])[0]
        log.append((iso_time(when()), rng.choice(queues), uuid.uuid4().hex, rng.choice(agents), event, None))
    log.sort()
    conn.executemany("insert into queue_log (time, queue, call_id, agent, event, data) values (?, ?, ?, ?, ?, ?)", log)
    conn.executemany(
        "insert into voicemail (id, mailbox, caller, received, seconds, heard, path, email) values (?, ?, ?, ?, ?, ?, ?, ?)",
        [(uuid.uuid4().hex, rng.choice(agents), "+15557654321", iso_time(when()), 20.0, rng.randint(0, 1), "voicemail/x.wav", "sent")
         for _ in range(args.voicemail)],
    )
    conn.executemany(
        "insert into callbacks (id, queue, number, entered, requested, status, attempts, next_attempt, call_id, ended)"
        " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(uuid.uuid4().hex, rng.choice(queues), "+15557654321", (t := when()), iso_time(t),
          "pending" if i % 10 == 0 else "completed", 1, t, None, None) for i in range(args.callbacks)],
    )
    conn.executemany(
        "insert into registrations (extension, contact, source, transport, expires_at, user_agent, call_id) values (?, ?, ?, ?, ?, ?, ?)",
        # 1003 is no agent: the pending callbacks wait instead of ringing these contacts.
        [("1003", f"sip:{i}@192.0.2.{i % 250}:5060", f"192.0.2.{i % 250}:5060", "udp", now + 3600, "bench", uuid.uuid4().hex)
         for i in range(args.registrations)],
    )
    conn.commit()
    conn.close()


async def start_once(folder: Path, notify: socket.socket, notify_name: str) -> tuple[float, float]:
    """Seconds from spawn to READY=1 and to the SIP port's first answer."""
    sip_port, http_port = free_port(), free_port(socket.SOCK_STREAM)
    config = base_config(sip_port, http_port, folder)
    config["queues"] = {name: queue_settings(agents) for name, agents in QUEUES.items()}
    (folder / "pbx.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    loop = asyncio.get_running_loop()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.setblocking(False)
    probe.bind(("127.0.0.1", 0))
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pbx.cli", "serve", "--config", str(folder / "pbx.yaml"), "--log-level", "WARNING",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        # This checkout's pbx, whatever the virtualenv has installed.
        env={**os.environ, "NOTIFY_SOCKET": notify_name, "PYTHONPATH": str(script_path.ROOT)}, cwd=folder,
    )
    try:

        async def ready() -> float:
            while b"READY=1" not in (await loop.sock_recv(notify, 4096)).split(b"\n"):
                pass
            return time.monotonic() - start

        async def answered() -> float:
            while True:
                probe.sendto(options_probe(sip_port), ("127.0.0.1", sip_port))
                try:
                    async with asyncio.timeout(0.01):
                        await loop.sock_recv(probe, 65535)
                    return time.monotonic() - start
                except TimeoutError:
                    continue

        started: asyncio.Future[Any] = asyncio.gather(ready(), answered())
        exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
        await asyncio.wait([started, exited], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not started.done():
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
            raise SystemExit(f"pbx serve did not start within 60 s (exit status {proc.returncode})")
        to_ready, to_answer = started.result()
    finally:
        probe.close()
        await stop_process(proc, (signal.SIGTERM, 20))
    return to_ready, to_answer


async def measure(folder: Path, runs: int) -> list[tuple[float, float]]:
    name = f"@pbx-bench-startup-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name[1:])
        notify.setblocking(False)
        return [await start_once(folder, notify, name) for _ in range(runs)]


def report(label: str, times: list[tuple[float, float]]) -> float:
    for i, (ready, answer) in enumerate(times, 1):
        print(f"{label} run {i}: READY=1 after {ready:.3f} s, SIP answered after {answer:.3f} s")
    worst = max(max(pair) for pair in times)
    ready_med = statistics.median(r for r, _ in times)
    answer_med = statistics.median(a for _, a in times)
    print(f"{label} median: READY=1 {ready_med:.3f} s, SIP answered {answer_med:.3f} s (worst {worst:.3f} s)")
    return worst


def record_summary(busy: list[tuple[float, float]], empty: list[tuple[float, float]], args: argparse.Namespace) -> None:
    """The medians on the busy folder beside the empty folder's, for `make
    bench`'s summary table; the target is every busy start within --limit."""
    load = f"{args.cdr} CDRs"
    for column, what in enumerate(("spawn to READY=1", "spawn to SIP answer")):
        busy_median = statistics.median(t[column] for t in busy)
        empty_median = statistics.median(t[column] for t in empty)
        ratio = busy_median / empty_median if empty_median else None
        met = max(t[column] for t in busy) <= args.limit
        record("startup", f"{what} s, median, {load} vs empty", busy_median, empty_median, ratio, f"all <= {args.limit:g} s", met)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cdr", type=int, default=100_000)
    parser.add_argument("--recordings", type=int, default=10_000)
    parser.add_argument("--queue-log", type=int, default=200_000)
    parser.add_argument("--voicemail", type=int, default=2_000)
    parser.add_argument("--callbacks", type=int, default=5_000)
    parser.add_argument("--registrations", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=float, default=5.0, help="seconds a start may take")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pbx-bench-startup-") as tmp:
        empty, busy = Path(tmp) / "empty", Path(tmp) / "busy"
        empty.mkdir()
        busy.mkdir()
        began = time.monotonic()
        build_data(busy, args)
        size = (busy / "pbx.db").stat().st_size
        print(
            f"data: {args.cdr} cdr, {args.recordings} recordings (+ files), {args.queue_log} queue_log, "
            f"{args.voicemail} voicemail, {args.callbacks} callbacks, {args.registrations} registrations; "
            f"pbx.db {size / 1e6:.1f} MB, built in {time.monotonic() - began:.1f} s"
        )
        empty_times = asyncio.run(measure(empty, args.runs))
        report("empty", empty_times)
        busy_times = asyncio.run(measure(busy, args.runs))
        worst = report("busy", busy_times)
    record_summary(busy_times, empty_times, args)
    if worst > args.limit:
        print(f"FAIL: a start took {worst:.3f} s, more than {args.limit} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
