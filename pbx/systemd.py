"""Telling systemd how the server is doing (sd_notify(3)): ready, alive, stopping.

With ``Type=notify`` systemd counts the server as started only once it says
READY=1, so units ordered after it start against a server that answers. With
``WatchdogSec=`` it restarts the server when WATCHDOG=1 stops arriving: the
pings come from a task on the event loop, so a loop that is stuck (a blocking
call, an endless callback) stops them, and a stuck loop carries no calls.

The protocol is one datagram of ``KEY=VALUE`` lines to the Unix socket named
by ``$NOTIFY_SOCKET``; a few lines here spare a dependency on libsystemd.
Outside systemd (no ``$NOTIFY_SOCKET``) every function here does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(*fields: str) -> None:
    """Send ``fields`` (``READY=1``, ``STATUS=...``) to systemd, if it listens.

    A failed send is logged, never raised: the server works without systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket: its name starts with a NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1: half of ``$WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises; None when systemd watches no one, or
    watches another process (``$WATCHDOG_PID``, e.g. a wrapper that started us)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def start_watchdog() -> asyncio.Task[None] | None:
    """The task that pings the watchdog (cancel it on exit), or None when
    systemd watches no one."""
    interval = watchdog_interval()
    if interval is None:
        return None
    logger.info("systemd watchdog: a ping every %.1f s", interval)
    return asyncio.create_task(_keep_alive(interval), name="systemd watchdog")


async def _keep_alive(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
