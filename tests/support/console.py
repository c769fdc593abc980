"""The machinery shared by the drivers of interop clients that run as a
subprocess (baresip, linphonec): their console read line by line, waits on
what it or another stream they read brings, and stopping them.

Every stream a driver reads appends under one :class:`asyncio.Condition`,
so a wait wakes up on any news and also sees the process exit instead of
running into its timeout; its failure message shows the console's end.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self

from tests.support.server import stop_process


class ConsoleProcess:
    """A running client whose console (stdout with stderr) is in
    :attr:`output`, one line (without its line end) an item."""

    name: ClassVar[str] = "process"  # for failure messages

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._read(self._read_output())

    async def wait_output(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first console line from index ``start`` on matching the regex ``pattern``."""
        regex = re.compile(pattern)
        return await self._wait_for(
            lambda: next((line for line in self.output[start:] if regex.search(line)), None), repr(pattern), timeout
        )

    async def close(self) -> None:
        """Stop the process, killing it when it does not go, and its readers."""
        await stop_process(self.proc, (signal.SIGTERM, 3))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _read(self, reader: Coroutine[Any, Any, None]) -> None:
        """Run ``reader`` until :meth:`close`: a subclass reading another
        stream appends what it gets under ``_changed`` and notifies it."""
        self._tasks.append(asyncio.create_task(reader))

    def _explain(self) -> str:
        """What a failed wait shows: the console's last lines."""
        return "\n".join(self.output[-30:])

    async def _wait_for[T](self, find: Callable[[], T | None], what: str, timeout: float) -> T:
        """What ``find`` returns once it is not None; ``find`` is called
        under ``_changed``, at first and after each change."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while (found := find()) is None:
                    if self.proc.returncode is not None:
                        raise AssertionError(f"{self.name} exited before {what}:\n" + self._explain())
                    await self._changed.wait()
                return found
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} in {timeout}s:\n" + self._explain()) from None

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            async with self._changed:
                self.output.append(line.decode(errors="replace").rstrip())
                self._changed.notify_all()
        await self.proc.wait()
        async with self._changed:
            self._changed.notify_all()
