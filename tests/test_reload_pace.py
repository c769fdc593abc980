"""A reload of a large flow set leaves calls' audio on its 20 ms pace.

Reading and validating hundreds of flow files takes the better part of a
second; were it done on the event loop, the media clock would stop for that
long and every call would hear a hole. The caller here is a SIP user agent on
bare sockets; the kernel stamps each RTP packet of its IVR prompt as it
arrives, and the test looks at the gaps while `POST /api/ivr/reload` runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.audio import write_tone
from tests.support.raw_sip import open_caller
from tests.support.rtp_peer import Arrivals
from tests.support.server import Server, start_server

PROVIDER = "127.0.0.5"  # the trunk's network: its INVITEs need no password
FLOWS = 200  # besides main.yaml
NODES = 12  # per flow, half of them menus
TICK = 0.020
# Seconds between two packets: six ticks. Not one: the reload's allocations
# set off a full garbage collection, which stops every thread of the server
# for 20-50 ms, and on a busy machine the server waits for a CPU now and then.
# A reload on the loop leaves a hole as long as the whole reload.
LONGEST_GAP = 0.120
SLOWEST_RELOAD = 2 * LONGEST_GAP  # a quicker reload could hide on the loop

MAIN = """
start: menu
nodes:
  menu: {type: menu, prompt: tone, options: {"1": hangup}, timeout: 10, retries: 0, on_fail: hangup}
"""


def bulk_flow(nodes: int) -> str:
    """A chain of play and menu nodes, every one reachable, all valid."""
    lines = ["start: n0", "nodes:"]
    for n in range(nodes):
        after = f"n{n + 1}" if n + 1 < nodes else "ivr:main"
        if n % 2:
            options = f'{{"1": {after}, "2": extension:1002, "#": hangup}}'
            lines.append(f"  n{n}: {{type: menu, prompt: [tone, tone], options: {options}, retries: 2, on_fail: {after}}}")
        else:
            lines.append(f"  n{n}: {{type: play, prompt: tone, next: {after}}}")
    return "\n".join(lines) + "\n"


async def pace_server(tmp_path: Path) -> Server:
    folder = tmp_path / "pbx"
    sounds, flows = folder / "sounds", folder / "ivr_flows"
    sounds.mkdir(parents=True)
    flows.mkdir()
    write_tone(sounds / "tone.wav", 600, 10.0)
    (flows / "main.yaml").write_text(MAIN)
    bulk = bulk_flow(NODES)
    for i in range(FLOWS):
        (flows / f"bulk{i:03}.yaml").write_text(bulk)
    return await start_server(
        folder,
        ivr={"dir": str(flows)},
        sounds={"dir": str(sounds)},
        inbound={"8000": "ivr:main"},
        trunks={"carrier": {"host": "127.0.0.9:5060", "inbound_from": [f"{PROVIDER}/32"]}},
        log_level="INFO",
    )


async def reload(server: Server) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{server.http_port}/api/ivr/reload", headers={"Authorization": "Bearer test-token"}
        ) as response:
            return response.status, await response.json()


@pytest.mark.serial
async def test_a_call_keeps_its_20_ms_pace_while_a_large_flow_set_reloads(tmp_path: Path) -> None:
    server = await pace_server(tmp_path)
    audio = Arrivals(PROVIDER)
    caller = await open_caller(("127.0.0.1", server.sip_port), host=PROVIDER)
    try:
        call_id = f"{uuid.uuid4().hex}@pace"
        caller.invite("8000", call_id=call_id, caller="+15550001", from_tag="pace", media_port=audio.port)
        answer = await caller.final(call_id, "pace")
        assert answer.status_code == 200
        dialog = caller.ack(answer, "8000")
        await audio.until(lambda: len(audio.times) >= 25, timeout=5.0)  # half a second of the prompt: the stream is steady

        before = len(audio.times)
        started = time.time()  # the clock of the kernel's stamps
        status, body = await reload(server)
        took = time.time() - started
        await asyncio.sleep(0.1)
        times = audio.times[before - 1 :]  # from the last packet before the reload on
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        during = sum(started <= t <= started + took for t in times)

        assert status == 200 and len(body["flows"]) == FLOWS + 1
        assert took > SLOWEST_RELOAD, f"the reload took {took * 1000:.0f} ms: too quick to show a stalled loop"
        assert max(gaps) < LONGEST_GAP, f"a {max(gaps) * 1000:.0f} ms gap in the audio during a {took * 1000:.0f} ms reload"
        assert during >= 0.8 * took / TICK, f"{during} packets in {took * 1000:.0f} ms"
        caller.bye(dialog, "8000")
    finally:
        caller.close()
        audio.close()
        assert await server.stop() == 0
