"""Drives Debian's baresip 1.0 headless, an independent SIP stack (libre)
for the end-to-end tests.

baresip gets a config folder of its own (``-f``) and no audio device: its
microphone is a WAV file (the ``aufile`` source) or a sine (``ausine``), and
what it hears is written to a WAV file by the ``sndfile`` filter, which dumps
each call's decoded audio to ``dump-<time>-dec.wav`` in its folder. 1.0 has no
file player (``aufile`` is a source only), so ``audio_player`` names none and
the call's audio is played nowhere. :class:`Baresip` steps it through the
``ctrl_tcp`` module: JSON commands (the ``menu`` module's: ``dial``,
``hold``, ``resume``, ``transfer``, ``sndcode``, ``hangup``), framed as
netstrings, and the events baresip sends back on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.audio import write_tone
from tests.support.console import ConsoleProcess
from tests.support.server import PASSWORDS, Server, free_port

BARESIP = shutil.which("baresip")
MODULES = "/usr/lib/baresip/modules"
# Below every test server's RTP range (tests/support/server.py starts them at 21000).
RTP_PORTS = "12000-19998"


def baresip_config(
    folder: Path, server: Server, extensions: Sequence[str], *, tone: Path | None = None, control_port: int | None = None
) -> Path:
    """A baresip config folder with an account per extension (the first one
    places the calls); its microphone is ``tone`` (a 8 kHz mono WAV) or else
    a 440 Hz sine; with ``control_port``, ``ctrl_tcp`` listens there and
    each call's received audio is dumped to WAV files in the folder."""
    folder.mkdir(parents=True)
    source, device = ("aufile", str(tone)) if tone else ("ausine", "440")
    modules = ["g711", source]
    apps = ["account", "menu"]
    extra = ""
    if control_port is not None:
        modules.append("sndfile")
        apps.append("ctrl_tcp")
        extra = f"ctrl_tcp_listen 127.0.0.1:{control_port}\nsnd_path {folder}\n"
    (folder / "config").write_text(
        f"poll_method epoll\nsip_listen 127.0.0.1:0\nrtp_ports {RTP_PORTS}\nstatmode_default off\nmodule_path {MODULES}\n"
        + "".join(f"module {name}.so\n" for name in modules)
        + "".join(f"module_app {name}.so\n" for name in apps)
        + f"audio_player {source},nil\naudio_source {source},{device}\naudio_alert {source},nil\n"  # no such players: silent
        + extra
    )
    (folder / "accounts").write_text(
        "".join(f"<sip:{ext}@{server.sip}>;auth_pass={PASSWORDS[ext]};regint=60\n" for ext in extensions)
    )
    return folder


async def read_until(stream: asyncio.StreamReader, wanted: list[str], seen: list[str]) -> None:
    """Read lines into ``seen`` until each of ``wanted`` was in one."""
    while not all(any(text in line for line in seen) for text in wanted):
        line = await stream.readline()
        if not line:
            raise AssertionError("baresip ended early:\n" + "".join(seen))
        seen.append(line.decode(errors="replace"))


class Baresip(ConsoleProcess):
    """A running baresip for one extension, driven through ``ctrl_tcp``;
    create it with :meth:`start`, which waits until it takes commands.
    Its console in :attr:`output` is there to explain a failure."""

    name = "baresip"

    def __init__(self, proc: asyncio.subprocess.Process, folder: Path) -> None:
        super().__init__(proc)
        self.folder = folder
        self.events: list[dict[str, Any]] = []
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def start(cls, folder: Path, server: Server, extension: str, *, tone_hz: int) -> Baresip:
        """baresip registering as ``extension`` (its binding shows in
        /api/registrations soon after), its microphone playing ``tone_hz``."""
        assert BARESIP is not None, "baresip is not installed (make test-deps)"
        tone = folder.with_name(folder.name + "-tone.wav")
        write_tone(tone, tone_hz, 30.0)
        port = free_port(socket.SOCK_STREAM)
        config = baresip_config(folder, server, [extension], tone=tone, control_port=port)
        proc = await asyncio.create_subprocess_exec(
            BARESIP, "-f", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        phone = cls(proc, folder)
        try:
            await phone.wait_output(r"baresip is ready\.")
            reader, phone._writer = await asyncio.open_connection("127.0.0.1", port)
            phone._read(phone._read_events(reader))
        except BaseException:
            await phone.close()
            raise
        return phone

    async def command(self, name: str, params: str = "") -> None:
        """Run a menu command and wait for baresip to accept it."""
        assert self._writer is not None
        token = f"{name}-{len(self.events)}"
        body = json.dumps({"command": name, "params": params, "token": token}).encode()
        self._writer.write(str(len(body)).encode() + b":" + body + b",")
        await self._writer.drain()
        reply = await self.wait_event(response=True, token=token)
        if not reply.get("ok"):
            raise AssertionError(f"baresip refused {name} {params}: {reply}")

    async def dial(self, number: str) -> None:
        await self.command("dial", number)

    async def send_digit(self, key: str) -> None:
        """One key as RFC 4733 telephone events (baresip sends no SIP INFO)."""
        await self.command("sndcode", key)

    async def wait_event(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first event (or command response) with the fields of ``match``
        that arrived and was not taken yet; it is taken."""

        def take() -> dict[str, Any] | None:
            for index, event in enumerate(self.events):
                if all(event.get(key) == value for key, value in match.items()):
                    return self.events.pop(index)
            return None

        return await self._wait_for(take, f"event {match}", timeout)

    def discard(self) -> None:
        """Forget the events so far: the next waits see only newer ones."""
        self.events.clear()

    def heard(self) -> Path:
        """The WAV file of what the last call decoded (the ``sndfile`` dump)."""
        *_, last = sorted(self.folder.glob("dump-*-dec.wav"))
        return last

    async def close(self) -> None:
        """Stop baresip (it unregisters), killing it when it does not go."""
        if self._writer is not None:
            self._writer.close()
        await super().close()

    def _explain(self) -> str:
        return f"events not taken: {self.events}\n" + super()._explain()

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                length = await reader.readuntil(b":")
                data = await reader.readexactly(int(length[:-1]) + 1)  # the netstring and its comma
                async with self._changed:
                    self.events.append(json.loads(data[:-1]))
                    self._changed.notify_all()
