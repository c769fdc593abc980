"""bench/ivr.py's anchor: bench/pjsua_baseline.py (pjsua2's C engine playing
the IVR prompt) run as a subprocess and driven over its stdin/stdout.

It runs in processes of its own so that the benchmark never imports pjsua2,
whose 4 calls a process (:data:`BASELINE_CALLS`) also decide how many
processes an anchor of a useful size takes (:data:`BASELINE_PROCESSES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

from bench.capture import START_LIMIT
from tests.support.server import free_port

BASELINE_PROGRAM = Path(__file__).resolve().parent / "pjsua_baseline.py"
BASELINE_CALLS = 4  # per process: pjsua2's PJSUA_MAX_CALLS in the only builds there are
# Processes of the baseline: with one, its 4 calls' CPU was lost in the noise
# of its idle rate (0.017 to 0.034 s a call from one run to the next).
BASELINE_PROCESSES = 10
BASELINE_RTP_SPAN = 40  # RTP ports of each baseline process
BASELINE_RTP = (40000, 40000 + BASELINE_RTP_SPAN * BASELINE_PROCESSES - 1)


class Baseline:
    """bench/pjsua_baseline.py in a subprocess, driven over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, sip_port: int) -> None:
        self.proc = proc
        self.sip_port = sip_port
        self.stats: dict[str, int] = {}

    @classmethod
    async def start(cls, wav: Path, log: Path, max_seconds: float, rtp_port: int) -> Baseline:
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(BASELINE_PROGRAM),
                "--wav", str(wav), "--sip-port", str(free_port()),
                "--rtp-port", str(rtp_port), "--rtp-range", str(BASELINE_RTP_SPAN),
                "--max-seconds", str(math.ceil(max_seconds)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )  # fmt: skip
        try:
            async with asyncio.timeout(START_LIMIT):
                ready = await cls._event(proc)
        except (TimeoutError, ValueError) as exc:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"pjsua_baseline.py did not start ({exc!r}); see {log}") from None
        return cls(proc, int(ready["sip_port"]))

    @staticmethod
    async def _event(proc: asyncio.subprocess.Process) -> dict[str, int]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise ValueError("it exited")
        event: dict[str, int] = json.loads(line)
        return event

    async def stop(self) -> None:
        """``quit``, 15 s to hang up and report; then SIGKILL."""
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            try:
                async with asyncio.timeout(15):
                    self.stats = await self._event(self.proc)
                    await self.proc.wait()
            except (TimeoutError, ValueError):
                self.proc.kill()
                await self.proc.wait()


def pjsua_version() -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import pjsua2; print(pjsua2.__version__)"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"
