"""`pbx serve` under systemd's Type=notify: READY once it answers, WATCHDOG
pings from its event loop, STOPPING on the way out; and the shipped unit
asks for all of it."""

from __future__ import annotations

import asyncio
import configparser
import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbx import systemd
from tests.support.raw_sip import options_probe
from tests.support.server import start_server

UNIT = Path(__file__).resolve().parent.parent / "config" / "pbx.service"


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, under an abstract name
    (as systemd's own is); the servers a test starts inherit $NOTIFY_SOCKET."""
    name = f"pbx-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


async def next_message(sock: socket.socket, timeout: float = 5.0) -> tuple[float, dict[str, str]]:
    """When the next datagram arrived (time.monotonic()), and its KEY=VALUE lines."""
    async with asyncio.timeout(timeout):
        data = await asyncio.get_running_loop().sock_recv(sock, 4096)
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    return time.monotonic(), fields


async def sip_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setblocking(False)
        probe.sendto(options_probe(port), ("127.0.0.1", port))
        try:
            async with asyncio.timeout(1):
                reply = await asyncio.get_running_loop().sock_recv(probe, 65535)
        except TimeoutError:
            return False
    return reply.startswith(b"SIP/2.0 ")


async def test_ready_comes_once_sip_answers_then_the_watchdog_is_pinged_until_stopping(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
    server = await start_server(tmp_path / "pbx")
    try:
        _, first = await next_message(notify_socket)
        assert first["READY"] == "1" and first["STATUS"].startswith("up: ")
        assert await sip_answers(server.sip_port)
        pings: list[float] = []
        while len(pings) < 4:
            at, fields = await next_message(notify_socket, timeout=2)
            assert fields == {"WATCHDOG": "1"}
            pings.append(at)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < gap < 0.8 for gap in gaps), gaps
    finally:
        assert await server.stop() == 0
    messages = []
    with pytest.raises(TimeoutError):
        while True:
            messages.append((await next_message(notify_socket, timeout=0.5))[1])
    assert any(m.get("STOPPING") == "1" for m in messages), messages


async def test_without_a_watchdog_only_ready_and_stopping_are_sent(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    server = await start_server(tmp_path / "pbx")
    try:
        _, first = await next_message(notify_socket)
        assert first["READY"] == "1"
        with pytest.raises(TimeoutError):
            await next_message(notify_socket, timeout=1.5)
    finally:
        assert await server.stop() == 0
    _, last = await next_message(notify_socket)
    assert last["STOPPING"] == "1"


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # systemd watches a parent that started us
    assert systemd.watchdog_interval() is None


def test_notify_without_systemd_or_with_its_socket_gone_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", f"@pbx-test-nobody-{uuid.uuid4().hex}")
    systemd.notify("READY=1")


def test_the_unit_waits_for_ready_restarts_a_stuck_or_failed_server() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert 10 <= int(service["WatchdogSec"]) <= 60
    assert service["Restart"] == "on-failure"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_nothing_wrong_in_the_unit_but_the_paths_of_an_install() -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], check=False, capture_output=True, text=True, timeout=60)
    # Here the unit is not installed: its programs and its EnvironmentFile are not there.
    install_paths = ("/opt/pbx/", "/etc/pbx/", "/var/lib/pbx")
    complaints = [line for line in result.stderr.splitlines() if line.strip() and not any(p in line for p in install_paths)]
    assert not complaints, result.stderr
