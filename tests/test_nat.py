"""Behind NAT: `sip.external_ip` is the address the server writes in Via, Contact and SDP."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aiosipua import SipDigestAuth, SipMessage, SipRequest, build_credentials, parse_auth, stringify_auth

from pbx.sip.messages import make_response
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, start_server
from tests.test_hostile_input import raw_udp, register

EXTERNAL = "192.0.2.10"


async def test_external_ip_is_advertised_to_the_callee(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx", sip={"external_ip": EXTERNAL, "auth_algorithms": ["MD5"]})
    transport, callee = await raw_udp("127.0.0.1", server)
    ip, port = transport.get_extra_info("sockname")
    try:
        call_id = uuid.uuid4().hex
        transport.sendto(register(ip, port, "1002", call_id, 1))
        challenge = parse_auth((await callee.reply()).headers.get_first("www-authenticate") or "")
        creds = build_credentials(SipDigestAuth("1002", PASSWORDS["1002"]), challenge, "REGISTER", "sip:pbx.local")
        assert creds is not None
        transport.sendto(register(ip, port, "1002", call_id, 2, stringify_auth(creds)))
        assert (await callee.reply()).status_code == 200

        async with await Phone.start(name="alice") as alice:
            await alice.register(server.sip, "1001", PASSWORDS["1001"])
            call = await alice.call("sip:1002@pbx.local")
            invite = SipMessage.parse(await asyncio.wait_for(callee.received.get(), 5))
            assert isinstance(invite, SipRequest) and invite.method == "INVITE"
            assert invite.via[0].host == EXTERNAL
            assert invite.contact[0].uri.host == EXTERNAL
            assert f"c=IN IP4 {EXTERNAL}" in invite.text
            transport.sendto(bytes(make_response(invite, 486)))
            event = await alice.wait_event("call_state", call=call, state="disconnected")
            assert event["code"] == 486
    finally:
        transport.close()
        assert await server.stop() == 0
