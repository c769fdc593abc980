"""An agent's phone that hangs up the moment it answers a queue call: its
BYE can reach the server before the queue has joined it to the caller
(pbx.calls.unclaimed). It must end the call like any later hang-up, not draw
a 481 that leaves the caller connected to nobody until the server stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiosipua import SipMessage, SipRequest, generate_branch, generate_tag

from pbx.sip.messages import make_response
from tests.support.phone import Phone
from tests.support.raw_phone import RawPhone
from tests.support.server import PASSWORDS, queue_settings, start_server

QUEUE_NUMBER = "7000"
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


def bye_after(invite: SipRequest, to_tag: str, port: int) -> SipRequest:
    """The callee's BYE in the dialog its 200 to ``invite`` (with ``to_tag``) opens."""
    contact = (invite.headers.get_first("Contact") or "").strip("<>").split(">")[0]
    lines = [
        f"BYE {contact} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={generate_branch()};rport",
        "Max-Forwards: 70",
        f"From: {invite.headers.get_first('To')};tag={to_tag}",
        f"To: {invite.headers.get_first('From')}",
        f"Call-ID: {invite.call_id}",
        "CSeq: 1 BYE",
        "Content-Length: 0",
    ]
    request = SipMessage.parse("\r\n".join(lines) + "\r\n\r\n")
    assert isinstance(request, SipRequest)
    return request


@pytest.mark.parametrize("overtakes", [False, True], ids=["bye-behind-200", "bye-overtakes-200"])
async def test_a_bye_right_behind_the_agents_200_ends_the_queue_call(tmp_path: Path, overtakes: bool) -> None:
    """The BYE right behind the 200 (the race uvloop shows at once), or
    ahead of it as UDP may deliver them (the race on any event loop)."""
    server = await start_server(
        tmp_path / "pbx", inbound={QUEUE_NUMBER: "queue:support"}, queues={"support": queue_settings(["1002"], ring_timeout=5)}
    )
    agent = await RawPhone.open(("127.0.0.1", server.sip_port), "1002")
    try:
        assert (await agent.register(PASSWORDS["1002"])).status_code == 200
        async with await Phone.start(name="p1001") as caller:
            await caller.register(server.sip, "1001", PASSWORDS["1001"])
            call = await caller.call(f"sip:{QUEUE_NUMBER}@pbx.local")
            await caller.wait_event("call_state", call=call, state="confirmed")
            invite = await agent.invites.get()
            tag = generate_tag()
            ok = make_response(invite, 200, to_tag=tag, headers={"Contact": f"<{agent.contact}>", "Content-Type": "application/sdp"})
            ok.body = SDP.encode()
            ok.headers.set_single("Content-Length", str(len(ok.body)))
            bye = bye_after(invite, tag, agent.port)
            answer = agent.answer_to(bye)
            agent.send_now(*((bye, ok) if overtakes else (ok, bye)))  # before the server's ACK
            async with asyncio.timeout(5):
                assert (await answer).status_code == 200
            await caller.wait_event("call_state", call=call, state="disconnected")
            await server.wait_log(r"event=ended disposition=answered .*agent=1002 .*hangup=callee")
    finally:
        agent.close()
        await server.stop()
