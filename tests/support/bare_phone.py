"""A phone made of bare sockets in an IVR call, for tests that decide exactly
what it sends: nothing at all, RTP now and then, a hold, a re-INVITE it
never ACKs. It calls through a trunk network, so no digest is needed."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiosipua import SipRequest

from tests.support.audio import write_tone
from tests.support.raw_sip import Dialog, RawCaller, open_caller
from tests.support.server import Server, start_server

PROVIDER = "127.0.0.6"  # the trunk's network: its INVITEs need no password
NUMBER = "8000"
MAIN = """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 30, retries: 0, on_fail: hangup}
"""


async def ivr_server(tmp_path: Path, flow: str = MAIN, prompt_seconds: float = 1.0, **overrides: Any) -> Server:
    """`pbx serve` whose NUMBER leads to ``flow`` (by default one that waits 30 s
    for a key), its prompt "tone" a 600 Hz tone, and a trunk network PROVIDER."""
    folder = tmp_path / "pbx"
    sounds, flows = folder / "sounds", folder / "ivr_flows"
    sounds.mkdir(parents=True)
    flows.mkdir()
    write_tone(sounds / "tone.wav", 600, prompt_seconds)
    (flows / "main.yaml").write_text(flow)
    return await start_server(
        folder,
        ivr={"dir": str(flows)},
        sounds={"dir": str(sounds)},
        inbound={NUMBER: "ivr:main"},
        trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{PROVIDER}/32"]}},
        **overrides,
    )


class BareCall:
    """An answered IVR call from the bare-socket caller, with its RTP socket."""

    def __init__(self, caller: RawCaller, dialog: Dialog, rtp: socket.socket, server_rtp: tuple[str, int], tag: str) -> None:
        self.caller, self.dialog, self.rtp, self.server_rtp, self.tag = caller, dialog, rtp, server_rtp, tag
        self.seq = 0

    def send_rtp(self) -> None:
        self.seq += 1
        header = struct.pack("!BBHII", 0x80, 0, self.seq, self.seq * 160, 0x1234)
        self.rtp.sendto(header + b"\xff" * 160, self.server_rtp)

    async def hung_up(self, within: float) -> bool:
        """Whether the server sends BYE within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message, _ = await self.caller.inbox.get()
                    if isinstance(message, SipRequest) and message.method == "BYE":
                        return True
        except TimeoutError:
            return False


@asynccontextmanager
async def answered_call(server: Server) -> AsyncIterator[BareCall]:
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((PROVIDER, 0))
    caller = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    try:
        call_id, tag = f"{uuid.uuid4().hex}@timeout", uuid.uuid4().hex[:8]
        caller.invite(NUMBER, call_id=call_id, caller="+15550001", from_tag=tag, media_port=rtp.getsockname()[1])
        answer = await caller.final(call_id, tag)
        assert answer.status_code == 200
        port = next(int(line.split()[1]) for line in answer.text.splitlines() if line.startswith("m=audio"))
        yield BareCall(caller, caller.ack(answer, NUMBER), rtp, ("127.0.0.1", port), tag)
    finally:
        caller.close()
        rtp.close()
