"""Runs a real `pbx serve` process for end-to-end tests.

Each server gets its own folder, free SIP and HTTP ports on loopback, and a
config written from a dict; tests wait on its log lines rather than sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PASSWORDS = {"1001": "secret-1001", "1002": "secret-1002", "1003": "secret-1003"}


def worker_index() -> int:
    """This pytest-xdist worker's number (0 without xdist): what tests running
    side by side in other workers tell their addresses and ranges apart by."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def _rtp_bases() -> itertools.cycle[int]:
    """The RTP ranges this process gives its servers, 100 pairs each: each
    xdist worker takes every n-th range, so that servers of tests running side
    by side never share one; after 195 servers in all, the first range is free again."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return itertools.cycle(range(21000 + 200 * worker_index(), 60000, 200 * workers))


_next_rtp_base = _rtp_bases()


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port


async def stop_process(proc: asyncio.subprocess.Process, *steps: tuple[int, float]) -> None:
    """Send each step's signal and wait up to its seconds, until the process
    has exited; SIGKILL whatever is still running after the last step."""
    for sig, seconds in steps:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def free_udp_block(count: int, host: str = "127.0.0.1") -> int:
    """An even UDP port that is free on ``host`` together with the ``count - 1`` above it."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1]) & ~1
        if base + count - 1 > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no {count} free UDP ports in a row on {host}")


def base_config(sip_port: int, http_port: int, data_dir: Path) -> dict[str, Any]:
    rtp = next(_next_rtp_base)
    return {
        "sip": {
            "listen": [f"udp:127.0.0.1:{sip_port}", f"tcp:127.0.0.1:{sip_port}"],
            "domain": "pbx.local",
            "ring_timeout": 20,
            "drain_timeout": 0,  # Server.stop() hangs up calls at once; tests of the drain set their own
        },
        "rtp": {"ip": "127.0.0.1", "ports": [rtp, rtp + 198]},
        "http": {"listen": f"127.0.0.1:{http_port}", "token": "test-token"},
        "storage": {"data_dir": str(data_dir), "db": str(data_dir / "pbx.db")},
        "extensions": {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()},
        "trunks": {},
        "outbound": [],
        "inbound": {},
        "queues": {},
    }


@dataclass
class Server:
    """A running `pbx serve` and what a test needs to talk to it."""

    proc: asyncio.subprocess.Process
    folder: Path
    sip_port: int
    http_port: int
    log: list[str] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    @property
    def sip(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if "PYTEST_CURRENT_TEST" in os.environ:  # captured: pytest shows it when the test fails
                print(f"[pbx] {text}", file=sys.stderr)
            async with self._changed:
                self.log.append(text)
                self._changed.notify_all()
        # The end of the log can come before the process's exit is known
        # (returncode): wait_log looks at both, so it is woken once both are.
        await self.proc.wait()
        async with self._changed:
            self._changed.notify_all()

    async def wait_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.log[start:] if regex.search(line)), None)

        async with asyncio.timeout(timeout), self._changed:
            while (line := found()) is None:
                if self.proc.returncode is not None and self._reader is not None and self._reader.done():
                    raise AssertionError(f"server exited ({self.proc.returncode}) before logging {pattern!r}:\n" + "\n".join(self.log[-30:]))
                await self._changed.wait()
            return line

    async def http(self, path: str, token: str | None = "test-token") -> tuple[int, str]:
        """GET a path from the server's HTTP port."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        _, text = await self.http("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, rest = sample.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    async def cdr_row(self) -> dict[str, Any]:
        """The one CDR row of a server that took one call, waiting for it: it is stored right after the call ends."""
        for _ in range(50):
            status, body = await self.http("/api/cdr")
            assert status == 200
            rows = json.loads(body)["items"]
            if rows:
                (row,) = rows
                return dict(row)
            await asyncio.sleep(0.1)
        raise AssertionError("no CDR row")

    async def stop(self) -> int:
        await stop_process(self.proc, (signal.SIGTERM, 10))
        if self._reader is not None:
            await self._reader
        return self.proc.returncode or 0


def queue_settings(agents: list[str], **settings: Any) -> dict[str, Any]:
    """A queue's settings as the end-to-end tests start from them: agents
    rung in order for 10 s, no wrap-up, no callback offer; ``settings`` on top."""
    return {"agents": agents, "strategy": "linear", "ring_timeout": 10, "wrapup": 0, "callback": {"enabled": False}, **settings}


async def start_server(
    folder: Path, config: dict[str, Any] | None = None, *, log_level: str = "DEBUG", **overrides: Any
) -> Server:
    """Write a config into ``folder`` (the base config updated with ``overrides``
    section by section) and start `pbx serve` on it. Benchmarks pass a quieter
    ``log_level``: DEBUG logging would be part of the CPU they measure.

    A free port can be taken by another process (a test running beside this
    one, say) before the server binds it: the server then refuses to start,
    and is started again on other ports, twice at most."""
    folder.mkdir(parents=True, exist_ok=True)
    tries = 3
    while True:
        sip_port, http_port = free_port(), free_port(socket.SOCK_STREAM)
        cfg = config or base_config(sip_port, http_port, folder)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        (folder / "pbx.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            return await _serve(folder, sip_port, http_port, log_level)
        except PortTaken:
            tries -= 1
            if config is not None or tries == 0:  # the ports are the caller's, or it is not a race
                raise


class PortTaken(AssertionError):
    """`pbx serve` exited at start because an address it listens on was in use."""


async def restart_server(server: Server, *, log_level: str = "DEBUG") -> Server:
    """`pbx serve` again on the folder, config and ports ``server`` had (it
    must have exited): the same data and RTP range, as after a crash or a reboot."""
    return await _serve(server.folder, server.sip_port, server.http_port, log_level)


async def _serve(folder: Path, sip_port: int, http_port: int, log_level: str) -> Server:
    """Start `pbx serve` on ``folder``'s pbx.yaml and wait until its admin HTTP listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pbx.cli", "serve", "--config", str(folder / "pbx.yaml"), "--log-level", log_level,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=folder,
    )
    server = Server(proc, folder, sip_port, http_port)
    server._reader = asyncio.get_running_loop().create_task(server._read_log())
    try:
        await server.wait_log(r"admin HTTP on", timeout=15)
    except AssertionError as exc:  # it exited: its whole log has been read
        if any("cannot start: [Errno 98]" in line for line in server.log):  # EADDRINUSE, however the binding call words it
            raise PortTaken(str(exc)) from exc
        raise
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return server
