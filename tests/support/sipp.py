"""Runs SIPp scenarios as subprocesses, for end-to-end tests and benchmarks.

``run_sipp`` runs a scenario to its end (a UAC placing its calls, say) and
returns what SIPp said; ``start_sipp`` starts one in the background (a UAS, a
fake provider) and hands back a :class:`SippProcess` to stop later. Every run
gets its own folder with SIPp's error log (-trace_err), message log
(-trace_msg), statistics (-trace_stat) and screen output, so a failing test
can show why. SIPp's exit code is 0 when every call succeeded.

SIPp's media port (-mp) is picked free for each run unless given: several SIPp
processes on one address would otherwise all take 6000. ``play_pcap_audio``
needs a raw socket, so scenarios that send a pcap need root or CAP_NET_RAW.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.server import free_port, free_udp_block, stop_process

SIPP = shutil.which("sipp") or "sipp"
SCENARIOS = Path(__file__).resolve().parents[1] / "sipp"
BENCH_SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"
PCAP_DIR = Path("/usr/share/sip-tester")

# Warnings SIPp writes to the error log that say nothing about the test.
_NOISE = ("verifyAuthHeader: authentication must be digest",)


@dataclass
class SippResult:
    """What one SIPp run left behind."""

    returncode: int
    stdout: str
    stderr: str
    errors_log: str
    messages_log: str = ""
    counters: dict[str, str] = field(default_factory=dict)  # last row of -trace_stat, by column
    log_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def successful_calls(self) -> int | None:
        return _int(self.counters.get("SuccessfulCall(C)"))

    @property
    def failed_calls(self) -> int | None:
        return _int(self.counters.get("FailedCall(C)"))

    @property
    def errors(self) -> list[str]:
        """The error log's events, without its header and known noise."""
        events = _split_events(self.errors_log)
        return [e for e in events if not any(n in e for n in _NOISE)]

    def report(self, lines: int = 40) -> str:
        """A readable account for assertion messages: exit code, errors, the
        end of the last statistics screen."""
        parts = [f"sipp exit code {self.returncode}"]
        if self.counters:
            parts.append(f"calls: {self.successful_calls} successful, {self.failed_calls} failed")
        if self.errors:
            parts.append("errors log:\n" + "\n".join(self.errors[-10:]))
        if "createAuthHeader: authentication must use MD5" in self.errors_log:
            parts.append(
                "hint: SIPp 3.6.1 answers only MD5 digest challenges and goes by the algorithm of the first "
                "challenge it reads: the challenger must list its MD5 challenge before SHA-256"
            )
        if self.stderr.strip() and not self.errors:  # SIPp repeats the error log there
            parts.append("stderr:\n" + _tail(self.stderr, lines))
        screen = _last_screen(self.stdout)
        if screen:
            parts.append("last screen:\n" + _tail(screen, lines))
        if self.log_dir is not None:
            parts.append(f"logs in {self.log_dir}")
        return "\n".join(parts)


def free_media_port(host: str = "127.0.0.1") -> int:
    """An even UDP port that is free on ``host`` with the three above it
    (SIPp uses -mp for audio, -mp+2 for video, and RTCP may take the odd ones)."""
    return free_udp_block(4, host)


def sipp_command(
    scenario: Path,
    target: str | None,
    *,
    local_ip: str,
    local_port: int,
    media_port: int,
    log_dir: Path,
    service: str | None = None,
    calls: int | None = None,
    timeout: float | None = None,
    trace_messages: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The SIPp command line for one run (logs go to ``log_dir``)."""
    name = Path(scenario).stem
    cmd = [
        SIPP,
        "-sf", str(scenario),
        "-i", local_ip,
        "-p", str(local_port),
        "-mp", str(media_port),
        "-nostdin",
        "-trace_err", "-error_file", str(log_dir / f"{name}_errors.log"),
        "-trace_stat", "-stf", str(log_dir / f"{name}_stat.csv"),
    ]  # fmt: skip
    if trace_messages:
        cmd += ["-trace_msg", "-message_file", str(log_dir / f"{name}_messages.log")]
    if service is not None:
        cmd += ["-s", service]
    if calls is not None:
        cmd += ["-m", str(calls)]
    if timeout is not None:
        cmd += ["-timeout", f"{math.ceil(timeout)}s", "-timeout_error"]
    cmd += list(extra)
    if target is not None:
        cmd.append(target)
    return cmd


class SippProcess:
    """A SIPp started by :func:`start_sipp`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        scenario: Path,
        log_dir: Path,
        local_ip: str,
        local_port: int,
        media_port: int,
        owns_log_dir: bool,
    ) -> None:
        self.proc = proc
        self.scenario = Path(scenario)
        self.log_dir = log_dir
        self.local_ip = local_ip
        self.local_port = local_port
        self.media_port = media_port
        self._owns_log_dir = owns_log_dir

    @property
    def address(self) -> str:
        """host:port SIPp listens on."""
        return f"{self.local_ip}:{self.local_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self, timeout: float) -> SippResult:
        """Wait for SIPp to end by itself (-m calls done, -timeout); killed
        after ``timeout`` seconds, which shows as exit code -9."""
        try:
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        except TimeoutError:
            await stop_process(self.proc, (signal.SIGINT, 3))
        return self.result()

    async def stop(self, grace: float = 2.0, *, keep_logs: bool = False) -> SippResult:
        """Ask SIPp to quit: SIGUSR1 lets calls in progress finish for
        ``grace`` seconds, then SIGINT ends it at once (still writing its
        logs and final statistics), then SIGKILL. The result holds the logs'
        text; a log folder this object made is removed unless ``keep_logs``."""
        graceful = [(signal.SIGUSR1, grace)] if grace > 0 else []
        await stop_process(self.proc, *graceful, (signal.SIGINT, 5))
        result = self.result()
        if not keep_logs and self._owns_log_dir:
            self.cleanup()
            result.log_dir = None
        return result

    def result(self) -> SippResult:
        """What SIPp has written so far (its exit code once it ended; -1 before)."""
        name = self.scenario.stem
        return SippResult(
            returncode=self.proc.returncode if self.proc.returncode is not None else -1,
            stdout=_read(self.log_dir / "stdout.txt"),
            stderr=_read(self.log_dir / "stderr.txt"),
            errors_log=_read(self.log_dir / f"{name}_errors.log"),
            messages_log=_read(self.log_dir / f"{name}_messages.log"),
            counters=_last_stat_row(self.log_dir / f"{name}_stat.csv"),
            log_dir=self.log_dir,
        )

    def cleanup(self) -> None:
        """Remove the log folder if this object made it."""
        if self._owns_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    async def __aenter__(self) -> SippProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace=0)


async def start_sipp(
    scenario: Path | str,
    target: str | None = None,
    *,
    local_ip: str = "127.0.0.1",
    local_port: int = 0,
    media_port: int = 0,
    service: str | None = None,
    calls: int | None = None,
    timeout: float | None = None,
    trace_messages: bool = True,
    log_dir: Path | None = None,
    extra: Sequence[str] = (),
    ready_timeout: float = 5.0,
) -> SippProcess:
    """Start SIPp in the background and return once it listens on its port
    (at most ``ready_timeout`` seconds; 0: at once, for a client).

    ``local_port``/``media_port`` 0 pick free ports; ``calls`` is -m;
    ``timeout`` is SIPp's own -timeout (with -timeout_error); ``extra`` holds
    further options (-rtp_echo, -set NAME VALUE, -au/-ap, -r, -l, ...).
    Without ``log_dir`` the logs go to a new temporary folder.
    """
    scenario = _resolve(scenario)
    local_port = local_port or free_port(host=local_ip)
    media_port = media_port or free_media_port(local_ip)
    owns = log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix=f"sipp-{scenario.stem}-")) if log_dir is None else Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = sipp_command(
        scenario,
        target,
        local_ip=local_ip,
        local_port=local_port,
        media_port=media_port,
        log_dir=log_dir,
        service=service,
        calls=calls,
        timeout=timeout,
        trace_messages=trace_messages,
        extra=extra,
    )
    (log_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=log_dir,
            start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not for SIPp
        )
    handle = SippProcess(proc, scenario, log_dir, local_ip, local_port, media_port, owns)
    if ready_timeout > 0:
        # A server waits for its first message: return once it listens.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ready_timeout):
                while not _port_bound(local_port) and proc.returncode is None:
                    await asyncio.sleep(0.02)
        if proc.returncode is not None:
            result = handle.result()
            raise RuntimeError(f"sipp {scenario.name} exited at start:\n{result.report()}")
    return handle


async def run_sipp(
    scenario: Path | str,
    target: str,
    *,
    local_ip: str = "127.0.0.1",
    local_port: int = 0,
    service: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 30,
    calls: int = 1,
    media_port: int = 0,
    trace_messages: bool = True,
    log_dir: Path | None = None,
) -> SippResult:
    """Run a client scenario against ``target`` ("host:port") until its
    ``calls`` calls are done, at most ``timeout`` seconds (SIPp's -timeout,
    and a kill a few seconds later as a backstop). Returns exit code, output
    and logs; ``result.ok`` means every call succeeded."""
    handle = await start_sipp(
        scenario,
        target,
        local_ip=local_ip,
        local_port=local_port,
        media_port=media_port,
        service=service,
        calls=calls,
        timeout=timeout,
        trace_messages=trace_messages,
        log_dir=log_dir,
        extra=extra,
        ready_timeout=0,
    )
    result = await handle.wait(timeout + 5)
    if result.ok and log_dir is None:
        handle.cleanup()  # the result holds the logs' text; a failure keeps them for a look
        result.log_dir = None
    return result


def _resolve(scenario: Path | str) -> Path:
    """A scenario path as given, or a bare name looked up in tests/sipp and
    bench/scenarios ("provider", "uas_echo.xml")."""
    path = Path(scenario)
    if path.exists():
        return path.resolve()
    name = path.name if path.suffix == ".xml" else f"{path.name}.xml"
    for folder in (SCENARIOS, BENCH_SCENARIOS):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no SIPp scenario {scenario}")


def _port_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``port`` or listens on TCP ``port``
    (read from /proc, so the check cannot take the port from SIPp)."""
    want = f":{port:04X}"
    for table, state in (("udp", None), ("udp6", None), ("tcp", "0A"), ("tcp6", "0A")):
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(want) and (state is None or fields[3] == state):
                    return True
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_stat_row(path: Path) -> dict[str, str]:
    """The last row of a -trace_stat CSV (';'-separated), by column name."""
    text = _read(path)
    rows = [r for r in csv.reader(text.splitlines(), delimiter=";") if r]
    if len(rows) < 2:
        return {}
    header, last = rows[0], rows[-1]
    return {name.strip(): value.strip() for name, value in zip(header, last, strict=False) if name.strip()}


def _split_events(errors_log: str) -> list[str]:
    """Events of an error log: each starts with a date stamp line."""
    text = errors_log.replace("The following events occurred:", "").strip()
    if not text:
        return []
    events: list[str] = []
    for line in text.splitlines():
        if line[:4].isdigit() and line[4:5] == "-":
            events.append(line)
        elif events:
            events[-1] += "\n" + line
        else:
            events.append(line)
    return [e.strip() for e in events if e.strip()]


def _last_screen(stdout: str) -> str:
    """The last statistics screen SIPp printed (it redraws with escape codes)."""
    text = stdout.replace("\x1b[2J", "\n").replace("\x1b[H", "")
    marker = "------------------------------ Scenario Screen"
    cut = text.rfind(marker)
    return text[cut:] if cut >= 0 else text[-4000:]


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


__all__ = [
    "BENCH_SCENARIOS",
    "PCAP_DIR",
    "SCENARIOS",
    "SippProcess",
    "SippResult",
    "free_media_port",
    "run_sipp",
    "sipp_command",
    "start_sipp",
]
