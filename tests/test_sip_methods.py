"""Never accept what is not done: a request the server does not handle where it
arrives gets 405 Method Not Allowed (a SIP method it knows) or 501 Not
Implemented (one it does not), with an ``Allow`` header that lists exactly what
it handles there (RFC 3261 §8.2.1), and the call it arrived in goes on.

"Exactly" is checked both ways: every method the dialog's Allow lists is sent
and must not be refused, and the methods it leaves out must be.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from aiosipua import SipResponse

from tests.support.bare_phone import NUMBER, BareCall, answered_call, ivr_server
from tests.support.raw_sip import Dialog, RawCaller

# What every call dialog handles, at least; helpers add methods (REFER) to the server's list.
CORE = {"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "INFO", "UPDATE"}
# Sent bare to a method the Allow lists, these get no answer or end the call: tried elsewhere.
NOT_PROBED = {"INVITE", "ACK", "CANCEL", "BYE"}


async def ask(caller: RawCaller, method: str, dialog: Dialog, *, timeout: float = 5.0) -> SipResponse:
    """Send a bodiless ``method`` in ``dialog`` (out of any dialog when its To
    has no tag) and return its final response."""
    dialog.cseq += 1
    host, port = caller.address
    caller.send(
        f"{method} sip:{NUMBER}@{caller.server[0]}:{caller.server[1]} SIP/2.0\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\n"
        f"From: {dialog.from_header}\nTo: {dialog.to_header}\nCall-ID: {dialog.call_id}\n"
        f"CSeq: {dialog.cseq} {method}\nContact: <sip:caller@{host}:{port}>\nMax-Forwards: 70\nContent-Length: 0\n\n",
        caller.server,
    )
    async with asyncio.timeout(timeout):
        while True:
            message, _ = await caller.inbox.get()
            if not isinstance(message, SipResponse) or message.status_code < 200 or message.call_id != dialog.call_id:
                continue
            cseq = message.cseq
            if cseq is not None and (cseq.seq, cseq.method) == (dialog.cseq, method):
                return message


def allowed(response: SipResponse) -> list[str]:
    return [method.strip() for value in response.headers.get("allow") for method in value.split(",") if method.strip()]


async def next_rtp(call: BareCall) -> bytes:
    call.rtp.setblocking(False)
    async with asyncio.timeout(2):
        return await asyncio.get_running_loop().sock_recv(call.rtp, 2048)


async def test_a_call_refuses_what_it_does_not_handle_with_the_exact_allow_and_goes_on(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)
    try:
        async with answered_call(server) as call:
            options = await ask(call.caller, "OPTIONS", call.dialog)
            assert options.status_code == 200
            allow = allowed(options)
            assert len(allow) == len(set(allow)) and CORE <= set(allow), allow

            for method in ("MESSAGE", "PUBLISH", "PRACK"):
                refused = await ask(call.caller, method, call.dialog)
                assert (refused.status_code, refused.reason_phrase) == (405, "Method Not Allowed"), method
                assert allowed(refused) == allow
            unknown = await ask(call.caller, "FOO", call.dialog)
            assert (unknown.status_code, unknown.reason_phrase) == (501, "Not Implemented")
            assert allowed(unknown) == allow

            # Each method listed is handled: none of them is refused as not done.
            for method in sorted(set(allow) - NOT_PROBED):
                answered = await ask(call.caller, method, call.dialog)
                assert answered.status_code not in (405, 501), (method, answered.status_code)

            # The call is as it was: the IVR still streams, a re-INVITE is
            # answered (listing the same methods), BYE ends it.
            await next_rtp(call)
            status, body = await server.http("/api/calls")
            assert status == 200 and len(json.loads(body)["items"]) == 1
            port = call.rtp.getsockname()[1]
            ok = await call.caller.reinvite(call.dialog, NUMBER, from_tag=call.tag, media_port=port, direction="sendrecv")
            assert ok.status_code == 200 and allowed(ok) == allow
            bye = await ask(call.caller, "BYE", call.dialog)
            assert bye.status_code == 200
    finally:
        await server.stop()


async def test_outside_a_dialog_an_unknown_method_is_501_and_a_known_one_not_done_405(tmp_path: Path) -> None:
    server = await ivr_server(tmp_path)
    try:
        async with answered_call(server) as call:
            options = await ask(call.caller, "OPTIONS", call.dialog)
            in_dialog = allowed(options)
            tagless = call.dialog.to_header.split(";tag=")[0]
            outside = Dialog(f"{uuid.uuid4().hex}@methods", f"<sip:probe@127.0.0.6>;tag={uuid.uuid4().hex[:8]}", tagless)
            server_options = await ask(call.caller, "OPTIONS", outside)
            assert server_options.status_code == 200
            everywhere = allowed(server_options)
            assert set(everywhere) == set(in_dialog) | {"REGISTER", "SUBSCRIBE"}
            for method, status in (("MESSAGE", 405), ("PUBLISH", 405), ("FOO", 501)):
                refused = await ask(call.caller, method, outside)
                assert refused.status_code == status, method
                assert allowed(refused) == everywhere
            # In a dialog the server does not have, the method is judged first: 501, not 481.
            gone = Dialog(outside.call_id, outside.from_header, f"{tagless};tag=nosuchdialog")
            assert (await ask(call.caller, "FOO", gone)).status_code == 501
            assert (await ask(call.caller, "MESSAGE", gone)).status_code == 405
            assert (await ask(call.caller, "INFO", gone)).status_code == 481
    finally:
        await server.stop()
