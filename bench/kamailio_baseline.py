"""The Kamailio + rtpengine baseline of the benchmarks: starting, probing, measuring and stopping them.

bench/bridge.py runs its calls through Kamailio (registrar and record-routing
proxy) with rtpengine relaying the media; bench/setup.py registers its users
with Kamailio alone. Both run them as a ``Daemon``: in the foreground, in a
session of its own, so that the CPU of every process it forks can be summed
and none is left behind. Ready means answering a probe (a SIP OPTIONS for
Kamailio, an NG "ping" for rtpengine); rtpengine's CLI tells the packets it
relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.measure import proc_stat, process_cpu_seconds

KAMAILIO_WORKERS = 2  # UDP receiver processes (-n): a small number, for 2 cores
DAEMON_START_LIMIT = 10.0  # seconds for Kamailio or rtpengine to answer a probe


def kamailio_command(program: str, cfg: Path, sip_port: int, rundir: Path, defines: list[str]) -> list[str]:
    """Kamailio's command line: ``cfg`` in the foreground with KAMAILIO_WORKERS
    UDP workers on 127.0.0.1:``sip_port``, its files in ``rundir``, and each
    of ``defines`` (NAME="value") set with -A for the config to read."""
    return [
        program,
        "-f", str(cfg),
        "-DD", "-E",  # foreground (children forked as usual), log to stderr
        "-T", "-S",  # no TCP, no SCTP
        "-n", str(KAMAILIO_WORKERS),
        "-l", f"udp:127.0.0.1:{sip_port}",
        "-Y", str(rundir), "-w", str(rundir), "-P", str(rundir / "kamailio.pid"),
        *(arg for define in defines for arg in ("-A", define)),
    ]  # fmt: skip


def rtpengine_command(program: str, ng_port: int, cli_port: int, rtp_ports: list[int], pidfile: Path) -> list[str]:
    """rtpengine's command line: in the foreground, relaying in userspace
    (no kernel module) with one poller thread, on 127.0.0.1 with RTP ports
    ``rtp_ports`` (lowest, highest), its NG control and CLI on the given ports."""
    return [
        program,
        "--config-file=none",  # not /etc/rtpengine/rtpengine.conf
        "--foreground", "--log-stderr", "--log-level=4",
        "--table=-1",  # userspace: no kernel forwarding
        "--num-threads=1",
        "--delete-delay=0",
        "--interface=127.0.0.1",
        f"--listen-ng=127.0.0.1:{ng_port}",
        f"--listen-cli=127.0.0.1:{cli_port}",
        f"--port-min={rtp_ports[0]}", f"--port-max={rtp_ports[1]}",
        f"--pidfile={pidfile}",
    ]  # fmt: skip


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid``: a program started in a session of its
    own and every process it forked."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
            if int(proc_stat(int(entry.name))[3]) == sid:
                pids.append(int(entry.name))
    return pids


class Daemon:
    """A program run in the foreground in a session of its own (output to a
    log file), so that its processes can be found by session id: for their
    CPU, and to leave none behind."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, name: str, cmd: list[str], log: Path) -> Daemon:
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(name, proc, log)

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def cpu_seconds(self) -> float:
        """CPU seconds of all its processes so far (one that exits takes its
        share along; Kamailio's children live as long as it does)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += process_cpu_seconds(pid)
        return total

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]]) -> None:
        """Return once ``probe`` succeeds; raise if the program exits first
        or does not answer within DAEMON_START_LIMIT seconds."""
        deadline = time.monotonic() + DAEMON_START_LIMIT
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            if await probe():
                return
            await asyncio.sleep(0.1)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        state = f"exited with {self.proc.returncode}" if self.proc.returncode is not None else "did not answer"
        raise RuntimeError(f"{self.name} {state}; its last lines:\n{tail}")

    async def stop(self) -> None:
        """SIGTERM, up to 10 s to exit; then SIGKILL to whatever is left of
        its session, one process id at a time."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.proc.wait()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.proc.wait()


async def udp_exchange(port: int, payload: bytes, timeout: float = 0.5) -> bytes | None:
    """Send ``payload`` to 127.0.0.1:``port`` and return the first datagram
    that comes back within ``timeout`` seconds (None: nothing came)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        try:
            await loop.sock_sendto(sock, payload, ("127.0.0.1", port))
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(sock, 65535)
        except (OSError, TimeoutError):
            return None


async def sip_answers(port: int) -> bool:
    """Whether a SIP server answers an OPTIONS on 127.0.0.1:``port`` (with
    rport, so the answer comes back to the probe's socket)."""
    request = (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-probe{time.monotonic_ns()};rport\r\n"
        "From: <sip:probe@127.0.0.1>;tag=probe\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: probe-{time.monotonic_ns()}@127.0.0.1\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    reply = await udp_exchange(port, request.encode())
    return reply is not None and reply.startswith(b"SIP/2.0 ")


async def rtpengine_answers(ng_port: int) -> bool:
    """Whether rtpengine answers a "ping" on its NG control port."""
    reply = await udp_exchange(ng_port, b"probe d7:command4:pinge")
    return reply is not None and b"pong" in reply


async def rtpengine_relayed(cli_port: int) -> float | None:
    """rtpengine's "Total relayed packets" (userspace and kernel) from its
    CLI; None when it cannot be read."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli_port)
            writer.write(b"list totals\n")
            text = (await reader.read()).decode(errors="replace")  # it closes after answering
            writer.close()
    except (OSError, TimeoutError):
        return None
    found = re.search(r"^\s*Total relayed packets\s*:\s*(\d+)\s*$", text, re.MULTILINE)
    return float(found[1]) if found else None


def program_version(cmd: list[str]) -> str:
    """The version number a program prints when asked ("?" if none)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    found = re.search(r"\d+\.\d+[\w.+~-]*", out.stdout + out.stderr)
    return found[0] if found else "?"


def find_programs() -> dict[str, str] | None:
    """Paths of kamailio and rtpengine (Kamailio lives in /usr/sbin, which a
    non-root PATH may lack); None, after saying so, when one is missing."""
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in ("kamailio", "rtpengine")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        print(f"{' and '.join(missing)} not installed (Debian: apt-get install kamailio rtpengine-daemon; make bench does)", file=sys.stderr)
        return None
    return {name: path for name, path in found.items() if path is not None}
