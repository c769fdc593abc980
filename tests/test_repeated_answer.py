"""A callee's 200 OK repeated to the server's INVITE, because the server's
ACK was lost (RFC 3261 §13.3.1.4): ACKed again while the call is up, and
met with nothing once the call has ended (not a second BYE). And the INVITE's
client transaction, which lingers 64*T1 to see such repeats, lets go of the
leg with its first final answer: an ended call is freed at its end, not
32 s later (at 10 bridged calls a second, as many ended calls as live ones
were kept, doubling what each full garbage collection walks)."""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

import pytest
from aiosipua import SipMessage, SipRequest, SipResponse, generate_tag

from pbx.sip.messages import make_response
from pbx.sip.transactions import ClientTransaction
from pbx.sip.transport import Flow
from tests.support.phone import Phone
from tests.support.raw_phone import RawPhone
from tests.support.server import PASSWORDS, start_server
from tests.test_answer_then_bye import SDP

QUIET = 1.5  # seconds in which a message the server would send has come


async def nothing_in(queue: asyncio.Queue[SipRequest], within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            await queue.get()
    except TimeoutError:
        return True
    return False


async def next_of(queue: asyncio.Queue[SipRequest]) -> SipRequest:
    async with asyncio.timeout(5):
        return await queue.get()


async def test_a_repeated_200_is_acked_while_the_call_is_up_and_not_answered_after_it(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "pbx")
    callee = await RawPhone.open(("127.0.0.1", server.sip_port), "1002")
    try:
        assert (await callee.register(PASSWORDS["1002"])).status_code == 200
        async with await Phone.start(name="p1001") as caller:
            await caller.register(server.sip, "1001", PASSWORDS["1001"])
            call = await caller.call("sip:1002@pbx.local")
            invite = await next_of(callee.invites)
            ok = make_response(invite, 200, to_tag=generate_tag(), headers={"Contact": f"<{callee.contact}>", "Content-Type": "application/sdp"})
            ok.body = SDP.encode()
            ok.headers.set_single("Content-Length", str(len(ok.body)))
            callee.send_now(ok)
            first = await next_of(callee.acks)
            await caller.wait_event("call_state", call=call, state="confirmed")

            callee.send_now(ok)  # as if that ACK was lost
            again = await next_of(callee.acks)
            assert again.cseq and first.cseq and invite.cseq
            assert again.cseq.seq == first.cseq.seq == invite.cseq.seq and again.call_id == invite.call_id

            await caller.hangup(call)
            bye = await next_of(callee.byes)
            assert bye.call_id == invite.call_id
            await server.wait_log(r"event=ended .*disposition=answered")

            callee.send_now(ok)  # the repeat that crossed the BYE
            assert await nothing_in(callee.byes, QUIET)
            assert callee.acks.empty()
    finally:
        callee.close()
        await server.stop()


class Owner:
    """The stack a transaction sends through, here sending nowhere."""

    def __init__(self) -> None:
        self.ended = False

    def send_request(self, request: SipRequest, flow: Flow) -> None:
        pass

    def client_started(self, txn: ClientTransaction) -> None:
        pass

    def client_ended(self, key: tuple[str, str]) -> None:
        self.ended = True


class Udp:
    reliable = False


class Leg:
    """Who waits for the answer, say a leg: its call hangs off it."""

    def __init__(self) -> None:
        self.answers: list[int] = []

    def on_response(self, response: SipResponse) -> None:
        self.answers.append(response.status_code)


def request(method: str) -> SipRequest:
    lines = [
        f"{method} sip:1002@127.0.0.1:5070 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-lingering",
        "From: <sip:1001@pbx.local>;tag=1",
        "To: <sip:1002@pbx.local>",
        "Call-ID: lingering@pbx",
        f"CSeq: 1 {method}",
        "Content-Length: 0",
    ]
    message = SipMessage.parse("\r\n".join(lines) + "\r\n\r\n")
    assert isinstance(message, SipRequest)
    return message


@pytest.mark.parametrize(("method", "status"), [("INVITE", 200), ("INVITE", 486), ("BYE", 200)])
async def test_a_client_transaction_lets_go_of_its_leg_with_the_final_answer(no_collector: None, method: str, status: int) -> None:
    leg = Leg()
    sent = request(method)
    owner = Owner()
    txn = ClientTransaction(owner, sent, Flow(Udp(), ("127.0.0.1", 5070)), leg.on_response)
    txn.start()
    answer = make_response(sent, status, to_tag="2")
    assert txn.received(answer)
    assert leg.answers == [status]
    gone = weakref.ref(leg)
    del leg

    accepted = method == "INVITE" and status == 200
    # Over at once after a 2xx to an INVITE (its repeats are the dialog's to
    # ACK: False); else lingering to absorb repeats, without the leg.
    assert owner.ended is accepted
    assert gone() is None
    assert txn.received(answer) is not accepted
