"""The server and the pjsua2 side of the interop tests, which drive the same
scenarios with baresip (tests/test_interop_baresip.py) and linphonec
(tests/test_interop_linphone.py).

Every sound is a plain tone, so that who hears what is told apart by its
frequency: the client under test sends CLIENT_HZ, the pjsua2 phones
PHONE_HZ, the music on hold is MOH_HZ and the IVR's menu prompt PROMPT_HZ.
Extension 1003 is the client under test; 1001 and 1002 are pjsua2 phones.
The flow of number 8000 is a menu whose key 1 rings 1001.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.support.audio import dominant_frequency, write_tone
from tests.support.phone import Phone, phones_for
from tests.support.server import PASSWORDS, Server, start_server

CLIENT_HZ = 440
PHONE_HZ = 1000
MOH_HZ = 700
PROMPT_HZ = 300
CLIENT = "1003"
IVR = "8000"

FLOW = """
start: menu
nodes:
  menu: {type: menu, prompt: menu, options: {"1": extension:1001}, timeout: 5, retries: 0, on_fail: hangup}
"""


async def interop_server(folder: Path, **client: Any) -> Server:
    """`pbx serve` with the tones, the flow, and ``client`` as extension 1003's extra settings."""
    sounds = folder / "sounds"
    (sounds / "moh" / "default").mkdir(parents=True)
    write_tone(sounds / "moh" / "default" / "tune.wav", MOH_HZ, 2.0)
    write_tone(sounds / "menu.wav", PROMPT_HZ, 2.0)
    (folder / "ivr_flows").mkdir()
    (folder / "ivr_flows" / "main.yaml").write_text(FLOW)
    extensions = {ext: {"name": f"User {ext}", "password": password} for ext, password in PASSWORDS.items()}
    extensions[CLIENT].update(client)
    return await start_server(
        folder, extensions=extensions, sounds={"dir": str(sounds)}, ivr={"dir": str(folder / "ivr_flows")},
        inbound={IVR: "ivr:main"},
    )  # fmt: skip


@asynccontextmanager
async def pjsua_phones(server: Server) -> AsyncIterator[dict[str, Phone]]:
    """pjsua2 phones registered as 1001 and 1002."""
    async with phones_for(["1001", "1002"]) as phones:
        await asyncio.gather(*(phone.register(server.sip, ext, PASSWORDS[ext]) for ext, phone in phones.items()))
        yield phones


async def registration(server: Server, extension: str, timeout: float = 5.0) -> dict[str, Any]:
    """``extension``'s one binding in /api/registrations, once it is there."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await server.http("/api/registrations")
            assert status == 200
            found = [item for item in json.loads(body)["items"] if item["extension"] == extension]
            if found:
                [binding] = found
                return dict(binding)
            await asyncio.sleep(0.1)


async def cdr_rows(server: Server, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The CDR rows, oldest first, once there are ``count`` (a row is stored right after its piece ends)."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await server.http("/api/cdr")
            assert status == 200
            rows = sorted(json.loads(body)["items"], key=lambda row: str(row["started"]))
            if len(rows) >= count:
                return [dict(row) for row in rows]
            await asyncio.sleep(0.1)


async def answer(phone: Phone) -> int:
    """Answer the call ringing ``phone``, sending PHONE_HZ, and wait for its audio."""
    call: int = (await phone.wait_event("incoming"))["call"]
    await phone.play_tone(call, PHONE_HZ)
    await phone.answer(call)
    await phone.wait_event("media", call=call, active=True)
    return call


async def heard(phone: Phone, call: int, path: Path) -> float:
    """The strongest frequency ``phone`` hears on ``call`` over about a second."""
    await phone.record(call, path)
    await asyncio.sleep(1.2)  # the recording's length, not synchronisation
    await phone.stop_record(call)
    return dominant_frequency(path)
