"""Drives Debian's linphonec 5.1 (liblinphone, belle-sip), an independent
SIP stack for the end-to-end tests, through its console on stdin/stdout.

Each :class:`Linphonec` gets a folder that is its ``HOME`` and holds its
config (``-c``): the account (registered at start, the server as outbound
proxy, so ``sip:N@pbx.local`` goes through it), PCMU and PCMA only, a free
SIP port, RTP ports below the test servers' ranges. linphonec needs
``~/.local/share/linphone`` to exist: without its database the core never
starts its SIP transports. ``soundcard use files`` replaces the (absent)
sound card by files: ``play`` sets the WAV it sends as microphone and
``record`` the WAV each call's received audio is written to.
Its console reports calls in plain lines ("Call 1 with ... connected.").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from tests.support.audio import write_tone
from tests.support.console import ConsoleProcess
from tests.support.server import PASSWORDS, Server, free_port

LINPHONEC = shutil.which("linphonec")

CONFIG = """[sip]
sip_port={sip_port}
sip_tcp_port=0
sip_tls_port=0
use_ipv6=0
use_info=0
use_rfc2833=1
[rtp]
audio_rtp_port=12000-19998
[proxy_0]
reg_proxy=<sip:{server};transport=udp>
reg_route=<sip:{server};transport=udp>
reg_identity=<sip:{extension}@pbx.local>
reg_expires=60
reg_sendregister=1
publish=0
[auth_info_0]
username={extension}
passwd={password}
realm=pbx.local
domain=pbx.local
[audio_codec_0]
mime=PCMU
rate=8000
channels=1
enabled=1
[audio_codec_1]
mime=PCMA
rate=8000
channels=1
enabled=1
"""


class Linphonec(ConsoleProcess):
    """A running linphonec for one extension; create it with :meth:`start`."""

    name = "linphonec"

    def __init__(self, proc: asyncio.subprocess.Process, folder: Path) -> None:
        super().__init__(proc)
        self.folder = folder
        self.recording = folder / "heard.wav"

    @classmethod
    async def start(cls, folder: Path, server: Server, extension: str, *, tone_hz: int) -> Linphonec:
        """linphonec registering as ``extension``, sending a ``tone_hz`` tone
        as its microphone and recording what it hears to :attr:`recording`."""
        assert LINPHONEC is not None, "linphonec is not installed (make test-deps)"
        (folder / ".local" / "share" / "linphone").mkdir(parents=True)
        (folder / "linphonerc").write_text(
            CONFIG.format(sip_port=free_port(), server=server.sip, extension=extension, password=PASSWORDS[extension])
        )
        write_tone(folder / "tone.wav", tone_hz, 30.0)
        proc = await asyncio.create_subprocess_exec(
            LINPHONEC, "-c", str(folder / "linphonerc"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "HOME": str(folder)}, cwd=folder,
        )  # fmt: skip
        phone = cls(proc, folder)
        try:
            await phone.send("soundcard use files")
            await phone.wait_output(r"Using wav files instead of soundcard")
            await phone.send(f"play {folder / 'tone.wav'}")
            await phone.send(f"record {phone.recording}")
        except BaseException:
            await phone.close()
            raise
        return phone

    async def send(self, line: str) -> None:
        """Type one console line: a command, or keys to send as DTMF."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        """Quit linphonec (it unregisters), killing it when it does not go."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await self.proc.wait()
        await super().close()
