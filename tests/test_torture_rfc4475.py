"""The SIP torture test messages of RFC 4475 sent to `pbx serve` over UDP
while a bridged call is up: each gets the answer the RFC asks of a UAS (or
of this B2BUA and registrar), or is dropped where the RFC allows it, no answer
is a 500, and the call keeps its audio both ways.

The messages (tests/support/torture.py) are written from the RFC's section 3
descriptions of what each one tests, after its example text as far as we
could write it ourselves; they are not byte for byte those of the RFC's
Appendix A archive, and nothing here can check that they are. What each one
exercises is kept: CRLF line ends, short forms and folding, the raw UTF-8 and
control bytes of intmeth and unreason, the 9999 and -999 Content-Lengths, the
trailing spaces of trws. They go out unchanged; only where they go is ours:
to the test server, from 127.0.0.44, where sockets listen on the ports the
top Vias name (5060 when they name none, 5050 for quotbal; mpart01 asks for
rport), since a response follows the Via and the ``received`` address the
server stamps on it (RFC 3261 §18.2.2).

Two pairs of messages, meant to be sent one at a time, share the top Via's
branch, sent-by and method, which RFC 3261 §17.2.3 makes one transaction:
the second of each is sent with its Via host renamed (``RENAMED``), or it
would rightly get the first one's answer as a retransmission.

Where RFC 4475 says an element "should respond with 400" to a request whose
request line breaks the grammar (lwsruri, lwsstart, trws, ltgtruri, badvers),
the server drops it like any unparsable datagram, as Kamailio does: a line
that is not ``METHOD SP URI SP SIP/2.0`` is not read as a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosipua import SipMessage, SipResponse

from tests.support.phone import exchange_tones
from tests.support.server import Server, start_server
from tests.support.torture import MESSAGES, WRONG_LENGTH
from tests.test_calls import connect, phone

SOURCE_IP = "127.0.0.44"
VIA_PORTS = (5060, 5050)  # where the top Vias send responses; mpart01's rport brings its own back to 5060
# The second of two messages that would be one transaction (same branch, sent-by, method).
RENAMED = {
    "cparam02": (b"saturn.example.com:5060;", b"saturn2.example.com:5060;"),  # as cparam01
    "regescrt": (b"host5.example.com;", b"host6.example.com;"),  # as escnull
}
CHALLENGE = frozenset({401, 407})
DROPPED: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Case:
    name: str
    answers: frozenset[int]  # the final responses that are right; empty: must stay unanswered
    why: str


CASES = [
    # 3.1.1 Valid messages: parsed and answered as any request like them.
    Case("wsinv", frozenset({481}) | CHALLENGE, "To has a tag but no dialog of ours matches: 481 (RFC 3261 §12.2.2)"),
    Case("intmeth", frozenset({405, 501}), "a method the server does not implement"),
    Case("esc01", CHALLENGE, "an INVITE from a caller who has not authenticated is challenged"),
    Case("escnull", CHALLENGE, "a REGISTER without credentials is challenged"),
    Case("esc02", frozenset({405, 501}), "RE%47IST%45R is a method of its own: escapes mean nothing in a method"),
    Case("lwsdisp", frozenset({200}), "OPTIONS to the server"),
    Case("longreq", CHALLENGE, "long values are values: the INVITE is challenged"),
    Case("dblreq", CHALLENGE, "the REGISTER is answered, the octets after Content-Length are ignored"),
    Case("semiuri", frozenset({200, 404}), "OPTIONS with ; in the user part"),
    Case("transports", frozenset({200}), "unknown transports in lower Vias are not ours to check"),
    Case("mpart01", frozenset({405, 501}), "MESSAGE is not served here"),
    Case("unreason", DROPPED, "a 200 that answers no transaction of ours"),
    Case("noreason", DROPPED, "a 100 that answers no transaction of ours"),
    # 3.1.2 Invalid messages: 400, or dropped when the request line is broken.
    Case("badinv01", frozenset({400}), "empty Via and Contact parameters"),
    Case("clerr", frozenset({400}), "Content-Length beyond the datagram (RFC 3261 §18.3)"),
    Case("ncl", frozenset({400}), "negative Content-Length"),
    Case("scalar02", frozenset({400}), "CSeq, Max-Forwards and Expires past their ranges"),
    Case("scalarlg", DROPPED, "a response with overlarge values, to nothing of ours"),
    Case("quotbal", frozenset({400}), "unterminated quoted string in To"),
    Case("ltgtruri", DROPPED, "Request-URI in <>: the request line does not parse"),
    Case("lwsruri", DROPPED, "LWS inside the Request-URI: four elements in the request line"),
    Case("lwsstart", DROPPED, "two spaces between request-line elements"),
    Case("trws", DROPPED, "spaces after SIP/2.0"),
    Case("escruri", frozenset({400}), "headers in the Request-URI (RFC 3261 §19.1.1)"),
    Case("baddate", frozenset({400}) | CHALLENGE, "the server does not use Date: it may ignore the zone or refuse it"),
    Case("regbadct", frozenset({400}), "a Contact URI with ? outside <>"),
    Case("badaspec", frozenset({400}), "spaces inside <> in To"),
    Case("baddn", frozenset({400}), "unquoted comma in display names"),
    Case("badvers", DROPPED, "SIP/7.0: the request line is not SIP/2.0 (RFC 4475 prefers 505)"),
    Case("mismatch01", frozenset({400}), "CSeq method is not the request's"),
    Case("mismatch02", frozenset({400}), "CSeq method is not the request's"),
    Case("bigcode", DROPPED, "a response with status 4294967301"),
    # 3.2 Transaction layer.
    Case("badbranch", frozenset({200}), "a branch of only the magic cookie is still a transaction"),
    # 3.3 Application layer.
    Case("insuf", frozenset({400}), "Call-ID, From, To and Max-Forwards missing"),
    Case("unkscm", frozenset({416}), "Request-URI of an unknown scheme (RFC 3261 §8.2.2.1)"),
    Case("novelsc", frozenset({416}), "soap.beep is no scheme this server serves"),
    Case("unksm2", frozenset({400, 404, 416}) | CHALLENGE, "To is no SIP URI: refused, before or after the challenge"),
    Case("bext01", frozenset({420}), "Require names extensions the server lacks: 420 with Unsupported"),
    Case("invut", frozenset({415}) | CHALLENGE, "an unknown body type; the challenge comes first"),
    Case("regaut01", CHALLENGE, "credentials of an unknown scheme are no credentials"),
    Case("multi01", frozenset({400}), "two From, To, Call-ID and CSeq values"),
    Case("mcl01", frozenset({400}), "two Content-Length values"),
    Case("bcast", DROPPED, "a response to nothing of ours, from a broadcast Via"),
    Case("zeromf", frozenset({200, 483}), "Max-Forwards 0 on an OPTIONS for the server itself"),
    Case("cparam01", CHALLENGE, "Contact parameters without <> belong to the header: challenged"),
    Case("cparam02", CHALLENGE, "Contact parameters inside <>: challenged"),
    Case("regescrt", CHALLENGE, "escaped headers in a Contact URI inside <> are allowed: challenged"),
    Case("sdp01", frozenset({406}) | CHALLENGE, "an Accept without SDP; the challenge comes first"),
    # 3.4 Backward compatibility.
    Case("inv2543", CHALLENGE, "an RFC 2543 INVITE without branch is a request like any"),
]


def message(name: str) -> bytes:
    data = MESSAGES[name].wire
    if name in RENAMED:
        old, new = RENAMED[name]
        assert data.count(old) == 1
        data = data.replace(old, new)
    return data


def call_id(data: bytes) -> str:
    return SipMessage.parse(data).headers.get_first("call-id") or ""


def test_every_case_has_a_message_and_each_message_declares_its_body_length() -> None:
    assert [case.name for case in CASES] == list(MESSAGES)
    for name, torture_message in MESSAGES.items():
        if name in WRONG_LENGTH:
            continue
        # dblreq's REGISTER ends at its Content-Length 0: the INVITE after it is a message, not its body.
        for part in re.split(rb"(?<=\r\n\r\n)\r\n(?=INVITE )", torture_message.wire):
            head, _, body = part.partition(b"\r\n\r\n")
            lengths = re.findall(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\S*)", head)
            assert lengths == [str(len(body)).encode()], name


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx")
    yield srv
    assert await srv.stop() == 0


@contextlib.contextmanager
def via_sockets() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for port in VIA_PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            try:
                sock.bind((SOURCE_IP, port))
            except OSError as exc:
                pytest.fail(f"the torture messages' Vias name {SOURCE_IP}:{port}, which is taken: {exc}")
            sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def torture(server: Server) -> dict[str, list[SipResponse]]:
    """Send every message and collect the responses, by the Call-ID they answer."""
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()
    by_call_id = {call_id(message(case.name)): case.name for case in CASES}
    answers: dict[str, list[SipResponse]] = {case.name: [] for case in CASES}
    with via_sockets() as socks:
        for sock in socks:
            loop.add_reader(sock.fileno(), lambda s=sock: received.put_nowait(s.recv(65535)))
        try:
            expected = sum(1 for case in CASES if case.answers)
            for case in CASES:
                socks[0].sendto(message(case.name), ("127.0.0.1", server.sip_port))
            answered: set[str] = set()
            # Until every message that must be answered has its final answer, then
            # half a second more for answers that must not come.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while len(answered) < expected:
                        response = SipMessage.parse(await received.get())
                        assert isinstance(response, SipResponse)
                        name = by_call_id[response.headers.get_first("call-id") or ""]
                        answers[name].append(response)
                        if response.status_code >= 200:
                            answered.add(name)
            await asyncio.sleep(0.5)  # a bounded wait: silence has to be shown
            while not received.empty():
                response = SipMessage.parse(received.get_nowait())
                assert isinstance(response, SipResponse)
                answers[by_call_id[response.headers.get_first("call-id") or ""]].append(response)
        finally:
            for sock in socks:
                loop.remove_reader(sock.fileno())
    return answers


async def test_rfc4475_torture_messages_get_right_answers_while_a_call_keeps_its_audio(server: Server, tmp_path: Path) -> None:
    async with await phone(server, "1001") as alice, await phone(server, "1002") as bob:
        a, b = await connect(alice, bob)

        answers = await torture(server)

        wrong = []
        for case in CASES:
            finals = [r.status_code for r in answers[case.name] if r.status_code >= 200]
            if case.answers and (not finals or finals[0] not in case.answers):
                wrong.append(f"{case.name}: got {finals or 'no answer'}, want one of {sorted(case.answers)} ({case.why})")
            if not case.answers and answers[case.name]:
                wrong.append(f"{case.name}: got {[r.status_code for r in answers[case.name]]}, want silence ({case.why})")
            if len(set(finals)) > 1:
                wrong.append(f"{case.name}: conflicting answers {finals}")
        assert not wrong, "\n".join(wrong)
        # No server errors; 501 is the right answer to a method the server has never heard of.
        assert not any(r.status_code >= 500 and r.status_code not in case.answers for case in CASES for r in answers[case.name])
        [bext01] = [r for r in answers["bext01"] if r.status_code == 420]
        assert bext01.headers.get("unsupported") == ["nothingSupportsThis", "nothingSupportsThisEither"]
        assert not any("Traceback" in line for line in server.log)

        heard_by_alice, heard_by_bob = await exchange_tones(tmp_path, alice, a, bob, b)
        assert heard_by_alice == pytest.approx(1000, abs=15)
        assert heard_by_bob == pytest.approx(440, abs=15)
        assert await server.metric("pbx_active_calls") == 1
