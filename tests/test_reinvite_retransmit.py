"""Over UDP a 200 OK to a re-INVITE is repeated until its ACK (RFC 3261
§13.3.1.4): a lost 200 must not leave a phone's hold or resume unanswered."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiosipua import SipResponse

from tests.support.bare_phone import NUMBER, BareCall, answered_call, ivr_server


async def copies_of_ok(call: BareCall, cseq: int, within: float) -> int:
    """How many 200 OKs to the INVITE with ``cseq`` reach the phone within ``within`` seconds."""
    copies = 0
    try:
        async with asyncio.timeout(within):
            while True:
                message, _ = await call.caller.inbox.get()
                if isinstance(message, SipResponse) and message.status_code == 200 and message.cseq is not None:
                    copies += message.cseq.seq == cseq and message.cseq.method.upper() == "INVITE"
    except TimeoutError:
        return copies


async def test_the_200_to_a_reinvite_is_repeated_until_the_ack_and_not_after(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)
    try:
        async with answered_call(server) as call:
            port = call.rtp.getsockname()[1]
            ok = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=port, direction="sendonly", ack=False)
            assert ok.status_code == 200
            # Repeated after T1 (0.5 s), then 1 s later: two copies within 1.8 s.
            assert await copies_of_ok(call, call.dialog.cseq, within=1.8) >= 2
            call.caller.ack_reinvite(call.dialog, NUMBER)
            # The next copy would have come 2 s after the last one.
            assert await copies_of_ok(call, call.dialog.cseq, within=2.5) == 0
    finally:
        await server.stop()
