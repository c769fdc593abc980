"""Property-based fuzzing (hypothesis) of every parser that reads what others write.

- SIP: bytes as the UDP listener hands them to the stack (aiosipua's
  ``SipMessage.parse`` in the transport's dispatch, then the stack's own
  checks and transactions, then `pbx.sip.messages`). Nothing may raise;
  a request is answered 400 or reaches the handler, and whatever is answered
  is a well-formed response to that request.
- SDP (`pbx.sip.sdp.parse_media`): only ``SdpNegotiationError``.
- pbx.yaml (`pbx.config.load.load_config`): only ``ConfigError``, each issue with
  a line inside the file.
- IVR flows (`pbx.ivr.flows.load_flow`): never raises; a flow or issues.

Inputs are built from grammar-shaped pieces (real header names, URIs, SDP
lines, config keys) mixed with arbitrary text and bytes, so that most examples
get past the first check. Settings: ``derandomize=True`` (the same examples on
every run and machine, so CI never fails on a draw it cannot repeat) and no
example database; ``PBX_FUZZ_EXAMPLES`` raises the example count for a deeper
local run (new examples, since the seed depends on it).
"""

from __future__ import annotations

import contextlib
import os
import string
from pathlib import Path
from typing import Any

import yaml
from aiosipua import SdpNegotiationError, SipMessage, SipRequest, SipResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbx.config.load import load_config
from pbx.config.model import Config, ConfigError
from pbx.events import EventBus
from pbx.ivr.flows import load_flow
from pbx.sip.messages import make_response, uri_user
from pbx.sip.sdp import parse_media
from pbx.sip.stack import SipStack
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow, UdpTransport

EXAMPLES = int(os.environ.get("PBX_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- SIP ------------------------------------------------------------------------

METHODS = ["INVITE", "REGISTER", "OPTIONS", "ACK", "BYE", "CANCEL", "SUBSCRIBE", "NOTIFY", "INFO", "UPDATE", "PRACK", "REFER"]
NASTY = "\r\n\t \x00\x7f;:,=<>\"\\%@/?&[]*~" + "é€\u2028"
noise = st.text(alphabet=st.sampled_from(string.ascii_letters + string.digits + NASTY), max_size=40)
token = st.text(alphabet=string.ascii_letters + string.digits + "-.!%*_+`'~", min_size=1, max_size=12)
number = st.one_of(st.integers(-5, 2**32 + 5).map(str), st.sampled_from(["", "0", "01", "1e3", "9" * 40, " 7", "-0"]))
host = st.one_of(
    st.sampled_from(["127.0.0.1", "pbx.local", "[::1]", "[2001:db8::1]", "example.com", "", "256.1.1.1", "[::1"]), noise
)
port = st.one_of(st.just(""), number.map(lambda n: ":" + n))
uri_params = st.lists(st.tuples(token, st.one_of(st.just(None), token, noise)), max_size=3).map(
    lambda ps: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in ps)
)
sip_uri = st.one_of(
    st.builds(lambda s, u, h, p, ps: f"{s}:{u}{h}{p}{ps}",
              st.sampled_from(["sip", "sips", "tel", "SIP", "http", ""]),
              st.one_of(st.just(""), st.builds(lambda u: f"{u}@", st.one_of(token, number, noise))),
              host, port, uri_params),
    noise,
)  # fmt: skip
name_addr = st.one_of(
    st.builds(lambda d, u, t: f"{d}<{u}>{t}", st.sampled_from(["", '"Alice" ', '"a\\"b" ', "Bob "]), sip_uri,
              st.sampled_from(["", ";tag=abc", ";tag=", ";tag"])),
    sip_uri,
)  # fmt: skip
via = st.builds(
    lambda proto, h, p, ps: f"SIP/2.0/{proto} {h}{p}{ps}",
    st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "udp", "", "XYZ"]),
    host,
    port,
    st.one_of(st.sampled_from([";branch=z9hG4bK776asdhds;rport", ";branch=z9hG4bK1", ";rport", ";branch=", ""]), uri_params),
)
cseq = st.builds(lambda n, m: f"{n} {m}", number, st.one_of(st.sampled_from(METHODS), token))
HEADER_VALUES: dict[str, Any] = {
    "Via": via,
    "From": name_addr,
    "To": name_addr,
    "Call-ID": st.one_of(token, noise),
    "CSeq": cseq,
    "Contact": st.one_of(name_addr, st.sampled_from(["*", "<sip:a@b>;expires=0", "<sip:a@b>;expires=" + "9" * 5000])),
    "Max-Forwards": number,
    "Expires": number,
    "Content-Length": number,
    "Content-Type": st.sampled_from(["application/sdp", "multipart/mixed;boundary=x", "text/plain", ""]),
    "Authorization": st.builds(
        lambda u, r, n: f'Digest username="{u}", realm="{r}", nonce="{n}", uri="sip:pbx.local", response="00", nc=00000001, qop=auth, cnonce="c"',
        noise, noise, noise,
    ),
    "Route": name_addr,
    "Record-Route": name_addr,
    "Event": st.sampled_from(["message-summary", "presence", "", "refer;id=1"]),
    "Require": token,
    "Supported": token,
    "Session-Expires": number,
    "Refer-To": name_addr,
    "Replaces": noise,
}  # fmt: skip
header_name = st.one_of(
    st.sampled_from(list(HEADER_VALUES) + ["v", "f", "t", "i", "m", "l", "c", "via", "CSEQ"]),
    token,
)


good_host = st.sampled_from(["127.0.0.1", "192.0.2.7", "pbx.local", "[2001:db8::1]", "host.example.com"])
good_port = st.sampled_from(["", ":5060", ":5070"])
good_uri = st.builds(
    lambda user, h, p, ps: f"sip:{user}@{h}{p}{ps}",
    st.one_of(st.sampled_from(["1001", "1002", "9999", "+15551230000", "8000", "*97"]), token), good_host, good_port,
    st.sampled_from(["", ";transport=udp", ";lr", ";user=phone", ";ob"]),
)  # fmt: skip
good_name_addr = st.builds(
    lambda d, u, t: f"{d}<{u}>{t}", st.sampled_from(["", '"Alice" ', "Bob ", '"Ünïcode \\"q\\"" ']), good_uri,
    st.sampled_from(["", ";tag=abc123", ";tag=x;foo=bar"]),
)  # fmt: skip
good_via = st.builds(lambda h, p, b: f"SIP/2.0/UDP {h}{p};branch=z9hG4bK{b};rport", good_host, good_port, token)
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"


def _mostly[T](draw: st.DrawFn, good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> T:
    """A value from ``good`` four times in five, else from ``bad``."""
    return draw(good) if draw(st.integers(0, 4)) else draw(bad)


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    """A SIP request (now and then a response): most parts well-formed, so
    that most examples get past the first check, and some part broken."""
    method = _mostly(draw, st.sampled_from(METHODS), token)
    if draw(st.integers(0, 5)) == 0:
        start = f"SIP/2.0 {draw(st.one_of(st.sampled_from(['100', '180', '200', '401', '487', '999', '1000']), number))} {draw(noise)}"
    else:
        start = f"{method} {_mostly(draw, good_uri, sip_uri)} {_mostly(draw, st.just('SIP/2.0'), st.sampled_from(['SIP/3.0', 'sip/2.0', '']))}"
    headers: list[tuple[str, str]] = [
        ("Via", _mostly(draw, good_via, via)),
        ("From", _mostly(draw, good_name_addr, name_addr)),
        ("To", _mostly(draw, good_name_addr, name_addr)),
        ("Call-ID", _mostly(draw, token, noise)),
        ("CSeq", _mostly(draw, st.integers(0, 2**31 - 1).map(lambda n: f"{n} {method}"), cseq)),
        ("Max-Forwards", _mostly(draw, st.just("70"), number)),
    ]
    if draw(st.booleans()):
        headers.append(("Contact", _mostly(draw, good_name_addr, HEADER_VALUES["Contact"])))
    for name in draw(st.lists(header_name, max_size=4)):
        canonical = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length", "c": "Content-Type", "via": "Via", "CSEQ": "CSeq"}.get(name, name)
        headers.append((name, draw(HEADER_VALUES.get(canonical, noise))))
    if draw(st.integers(0, 3)) == 0:  # one header's value broken
        at = draw(st.integers(0, len(headers) - 1))
        headers[at] = (headers[at][0], draw(noise))
    headers = draw(st.permutations(headers))
    body = _mostly(draw, st.sampled_from(["", SDP]), noise)
    if body and draw(st.integers(0, 3)):
        headers.append(("Content-Type", "application/sdp"))
    headers.append(("Content-Length", _mostly(draw, st.just(str(len(body.encode("utf-8", errors="surrogatepass")))), number)))
    eol = _mostly(draw, st.just("\r\n"), st.sampled_from(["\n", "\r"]))
    text = eol.join([start, *(f"{n}{_mostly(draw, st.just(': '), st.sampled_from([':', ' : ', ':  ', ' :']))}{v}" for n, v in headers)]) + eol + eol + body
    raw = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 5)) == 0:  # now and then, raw bytes spliced in anywhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=16)) + raw[at + draw(st.integers(0, 8)) :]
    return raw


class _Recording(UdpTransport):
    """The server's UDP transport, with sends recorded instead of put on the wire."""

    def __init__(self) -> None:
        super().__init__(local_addr=("127.0.0.1", 5060))
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, message: SipRequest | SipResponse, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(message), addr))


@FUZZ
@given(sip_messages())
async def test_sip_messages_are_answered_or_dropped_never_crash_the_stack(raw: bytes) -> None:
    stack = SipStack(EventBus(), "127.0.0.1", "pbx")
    transport = _Recording()
    handled: list[tuple[SipRequest, ServerTransaction]] = []

    def on_request(request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        handled.append((request, txn))

    stack.on_request = on_request
    transport.on_message = lambda msg, addr: stack._received(msg, Flow(transport, addr))
    try:
        transport._dispatch(raw, ("127.0.0.1", 40000))  # raises on a bug: that is the finding
        for request, txn in handled:
            # What handlers do first with any request: read its user, answer it.
            uri_user(request.uri)
            if request.body:  # the B2BUA reads an offer from any body
                with contextlib.suppress(SdpNegotiationError):
                    parse_media(request.body.decode("utf-8", errors="replace"), ("PCMU", "PCMA"))
            response = make_response(request, 404)
            reparsed = SipMessage.parse(bytes(response))
            assert isinstance(reparsed, SipResponse) and reparsed.status_code == 404
            assert reparsed.headers.get_first("call-id") == request.headers.get_first("call-id")
            if txn.request.method.upper() != "ACK":
                txn.reply(486)
        for data, _ in transport.sent:
            answer = SipMessage.parse(data)
            assert isinstance(answer, SipResponse), data
            assert answer.status_code in (100, 400, 416, 420, 486), data
            assert answer.headers.get("via"), data
    finally:
        for txn in list(stack._server.values()):
            txn.terminate()


# --- SDP ------------------------------------------------------------------------

sdp_line = st.one_of(
    st.sampled_from([
        "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "c=IN IP6 ::1", "c=IN IP4 0.0.0.0", "c=IN IP4",
        "c=", "t=0 0", "m=audio 4000 RTP/AVP 0 8 101", "m=audio 0 RTP/AVP 0", "m=audio x RTP/AVP 0", "m=audio 4000 RTP/AVP",
        "m=video 5000 RTP/AVP 96", "m=audio 4000/2 RTP/AVP 0", "m=audio 99999 RTP/AVP 0", "a=rtpmap:101 telephone-event/8000",
        "a=rtpmap:0 PCMU/8000", "a=rtpmap:8", "a=rtpmap:x PCMA/8000", "a=rtpmap:9 G722/8000/1", "a=rtpmap:96 opus/48000/2",
        "a=fmtp:101 0-16", "a=sendonly", "a=recvonly", "a=inactive", "a=ptime:", "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x",
        "b=AS:64", "a=rtcp:4001", "a=rtcp:", "m=", "a=",
    ]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(list("vosicbtmak") + ["x", ""]), noise),
    st.builds(lambda pt, name, rate: f"a=rtpmap:{pt} {name}/{rate}", number, st.one_of(st.sampled_from(["PCMU", "PCMA", "G722", "telephone-event"]), token), number),
    st.builds(lambda p, fmts: f"m=audio {p} RTP/AVP {' '.join(fmts)}", number, st.lists(st.one_of(number, token), max_size=4)),
)  # fmt: skip


@FUZZ
@given(st.lists(sdp_line, max_size=14), st.sampled_from(["\r\n", "\n"]), st.sampled_from([("PCMU", "PCMA", "G722"), ("PCMA",), ()]))
def test_sdp_bodies_parse_or_raise_sdp_negotiation_error(lines: list[str], eol: str, supported: tuple[str, ...]) -> None:
    try:
        media = parse_media(eol.join(lines) + eol, supported)
    except SdpNegotiationError:
        return
    assert all(c.name in supported for c in media.codecs)
    assert isinstance(media.addr[0], str) and isinstance(media.addr[1], int)


# --- pbx.yaml ---------------------------------------------------------------------

scalar: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), noise,
    st.sampled_from(["${PBX_FUZZ_UNSET}", "${PBX_FUZZ_UNSET:-x}", "${", "udp:127.0.0.1:5060", "127.0.0.1:8080", "1001",
                     "ivr:main", "queue:support", "voicemail:1001", "external:+15551230000", "hangup", "^[0-9]+$", "(",
                     "2026-12-25", "mon-fri 09:00-17:00", "PCMU", "secret-password"]),
)  # fmt: skip
CONFIG_KEYS = [
    "sip", "rtp", "http", "storage", "sounds", "ivr", "timezone", "extensions", "trunks", "outbound", "inbound", "queues",
    "recording", "voicemail", "features", "smtp", "listen", "domain", "external_ip", "ports", "codecs", "token", "data_dir",
    "db", "dir", "tts", "name", "password", "pin", "email", "host", "inbound_from", "register", "match", "trunk", "agents",
    "strategy", "ring_timeout", "callback", "max_calls", "max_contacts", "forward", "tls", "srtp", "extensions", "1001",
]  # fmt: skip
yaml_values = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(CONFIG_KEYS), noise), inner, max_size=5)),
    max_leaves=25,
)


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """YAML text: a dumped document of config-shaped values, or raw text now and then."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=200))
    document = draw(st.dictionaries(st.sampled_from(CONFIG_KEYS[:16]), yaml_values, max_size=8))
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    if draw(st.booleans()):  # cut it anywhere, or repeat a piece: broken indentation, dangling quotes
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", "\n  - x\n", ": :\n", "&a [*a]\n", "'\n", "\t"])) + text[at:]
    return text


@FUZZ
@given(config_texts())
def test_config_text_loads_or_raises_config_error_with_lines(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, env={})
    except ConfigError as exc:
        # YAML breaks lines at \r, \x85 and \u2028 too; splitlines() counts those and more.
        lines = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
        assert exc.issues
        assert all(0 <= issue.line <= lines + 1 for issue in exc.issues), exc.issues


# --- IVR flows --------------------------------------------------------------------

FLOW_KEYS = ["start", "nodes", "type", "prompt", "options", "timeout", "retries", "invalid", "on_fail", "next", "var",
             "max_digits", "terminator", "url", "on_error", "cases", "default", "open", "holidays", "true", "false",
             "value", "to", "method", "menu", "hours"]  # fmt: skip
NODE_TYPES = ["play", "menu", "collect", "hours", "branch", "set", "http", "goto", "hangup", "rate", "nope"]
flow_values = st.recursive(
    st.one_of(scalar, st.sampled_from(NODE_TYPES + ["menu", "say:hello {caller}", "welcome", "{", "#", "*", "1", "extension:1001"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FLOW_KEYS), noise), inner, max_size=6)),
    max_leaves=30,
)


@st.composite
def flow_texts(draw: st.DrawFn) -> str:
    nodes = draw(st.dictionaries(st.sampled_from(["menu", "hours", "play1", "end", "x"]),
                                 st.dictionaries(st.sampled_from(FLOW_KEYS), flow_values, max_size=6), max_size=4))  # fmt: skip
    document = {"start": draw(st.one_of(st.sampled_from(["menu", "hours", "missing"]), scalar)), "nodes": nodes}
    if draw(st.integers(0, 4)) == 0:
        document = draw(flow_values)
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["#: x\n", "'", "\t", "*1\n", ": ["])) + text[at:]
    return text


_FLOW_CONFIG = """\
sounds: {dir: sounds, tts: espeak-ng}
ivr: {dir: flows}
extensions:
  "1001": {name: Alice, password: secret-1001}
queues:
  support: {agents: ["1001"]}
"""


_configs: dict[Path, Config] = {}


def _config(tmp_path: Path) -> Config:
    """The pbx.yaml the flows are checked against, loaded once per test."""
    if tmp_path in _configs:
        return _configs[tmp_path]
    (tmp_path / "sounds").mkdir(exist_ok=True)
    (tmp_path / "sounds" / "welcome.wav").touch()
    (tmp_path / "flows").mkdir(exist_ok=True)
    path = tmp_path / "pbx.yaml"
    path.write_text(_FLOW_CONFIG)
    _configs[tmp_path] = load_config(path, env={})
    return _configs[tmp_path]


@FUZZ
@given(flow_texts())
def test_flow_text_loads_or_reports_issues_never_raises(tmp_path: Path, text: str) -> None:
    config = _config(tmp_path)
    path = tmp_path / "flows" / "main.yaml"
    path.write_text(text, encoding="utf-8")
    flow, issues = load_flow(path, config, lambda name: name == "welcome", {"main"})
    assert (flow is None) == bool(issues)
