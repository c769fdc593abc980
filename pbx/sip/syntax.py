"""What aiosipua's lenient parser lets through but RFC 3261 forbids.

aiosipua reads almost anything (it splits the request line on any run of
spaces, keeps a body shorter than its Content-Length, takes the first of two
Call-IDs). A server that acted on such a message would act on a guess, so the
stack checks each request here first, as Kamailio's parser and pjsip's do:
a request line that is not exactly ``METHOD SP Request-URI SP SIP/2.0`` is
dropped like any unparsable datagram, and a request whose headers break the
grammar gets the answer RFC 3261 (and RFC 4475, its torture tests) names:
400, 416 for a Request-URI scheme we do not serve, 420 for an extension we
do not support.
"""

from __future__ import annotations

import re

from aiosipua import SipRequest

# RFC 3261 §25.1 token, and a header parameter (`;name` or `;name=value`, with LWS
# allowed around `;` and `=`; the value a token, an IPv6 reference or a quoted string).
_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = rf"\s*;\s*{_TOKEN}(?:\s*=\s*(?:{_TOKEN}|\[[0-9A-Fa-f:.]+\]|{_QUOTED}))?"
_PARAMS = re.compile(rf"(?:{_PARAM})*\s*", re.DOTALL)
_VIA = re.compile(
    rf"SIP\s*/\s*2\.0\s*/\s*{_TOKEN}\s+(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:\s*:\s*[0-9]{{1,5}})?(?:{_PARAM})*\s*",
    re.DOTALL,
)
# An unquoted display name: tokens and LWS (non-ASCII letters tolerated, as
# phones write names); a comma, quote or other separator needs quotes.
_DISPLAY_TOKENS = re.compile(r"[\w\-.!%*+`'~\s]*")
_DIGITS = re.compile(r"[0-9]+")

# Headers RFC 3261 §7.3.1 allows once: a second value is a second opinion on
# who, which call or how long, and answering either is a guess.
SINGLE_HEADERS = ("From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length", "Content-Type")
# Request-URI schemes this server serves (RFC 3261 §8.2.2.1: others get 416).
URI_SCHEMES = ("sip", "sips", "tel")
# Option tags a `Require` may name (RFC 3261 §8.2.2.3: others get 420). Session
# timers (RFC 4028) and Replaces (RFC 3891) are what phones require of a PBX.
SUPPORTED_OPTION_TAGS = frozenset({"timer", "replaces", "norefersub", "path"})


def check_request_line(data: bytes) -> None:
    """Raise ValueError when ``data`` is a request whose first line is not
    ``METHOD SP Request-URI SP SIP/2.0`` (RFC 3261 §7.1: single spaces, no
    LWS in the URI, no angle brackets around it, version 2.0 only)."""
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if line.startswith(b"SIP/"):
        return  # a status line; responses are matched to our transactions or dropped
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts) or b"\t" in line:
        raise ValueError(f"request line is not METHOD SP URI SP VERSION: {line[:80]!r}")
    if parts[2] != b"SIP/2.0":
        raise ValueError(f"unsupported SIP version {parts[2][:20]!r}")
    if parts[1].startswith(b"<"):
        raise ValueError("Request-URI in angle brackets")


def request_problem(request: SipRequest, *, reliable: bool) -> tuple[int, str, dict[str, str]] | None:
    """The final response a request that breaks the grammar gets (status,
    reason, extra headers), or None when nothing is wrong with it.

    ``reliable`` is the transport: over UDP a body shorter than its
    Content-Length is a truncated datagram (RFC 3261 §18.3), over TCP the
    transport has framed it already.
    """
    for name in SINGLE_HEADERS:
        if len(request.headers.get(name)) > 1:
            return 400, f"Duplicate {name}", {}
    if not all(_VIA.fullmatch(via) for via in request.headers.get("via")):
        return 400, "Malformed Via", {}
    length = request.headers.get_first("content-length")
    if length is not None:
        if not _DIGITS.fullmatch(length.strip()):
            return 400, "Malformed Content-Length", {}
        if not reliable and int(length) > len(request.body):
            return 400, "Content-Length Beyond Datagram", {}
    max_forwards = request.headers.get_first("max-forwards")
    if max_forwards is not None and not _DIGITS.fullmatch(max_forwards.strip()):
        return 400, "Malformed Max-Forwards", {}
    for name in ("From", "To"):
        if not _address_valid(request.headers.get_first(name) or ""):
            return 400, f"Malformed {name}", {}
    for contact in request.headers.get("contact"):
        if contact.strip() != "*" and not _address_valid(contact):
            return 400, "Malformed Contact", {}
    scheme, colon, rest = request.uri.partition(":")
    if not colon or scheme.lower() not in URI_SCHEMES:
        return 416, "Unsupported URI Scheme", {}
    if "?" in rest.rpartition("@")[2] and scheme.lower() != "tel":  # a user part may hold "?"
        return 400, "Headers in Request-URI", {}  # RFC 3261 §19.1.1: not allowed there
    required = {tag.strip() for value in request.headers.get("require") for tag in value.split(",") if tag.strip()}
    unsupported = sorted(tag for tag in required if tag.lower() not in SUPPORTED_OPTION_TAGS)
    if unsupported and request.method.upper() not in ("ACK", "CANCEL"):  # §8.2.2.3
        return 420, "Bad Extension", {"Unsupported": ", ".join(unsupported)}
    return None


def _address_valid(value: str) -> bool:
    """``name-addr`` or ``addr-spec`` followed by parameters (RFC 3261 §20.10,
    §25.1): a display name quoted or made of tokens, no LWS inside ``<...>``,
    and an addr-spec without brackets may hold no ``?`` or ``,``."""
    value = value.strip()
    if not value:
        return False
    quoted = re.match(rf"\s*{_QUOTED}\s*", value, re.DOTALL)
    if value.startswith('"'):
        if quoted is None:
            return False  # an unterminated quoted string
        rest = value[quoted.end() :]
        if not rest.startswith("<"):
            return False
    else:
        before, bracket, _ = value.partition("<")
        if not bracket:
            addr_spec, _, params = value.partition(";")
            addr_spec = addr_spec.strip()
            return bool(addr_spec) and not re.search(r"[\s?,<>\"]", addr_spec) and bool(_PARAMS.fullmatch(";" + params if params else ""))
        if not _DISPLAY_TOKENS.fullmatch(before):
            return False
        rest = value[len(before) :]
    uri, closing, params = rest[1:].partition(">")
    return bool(closing) and bool(uri) and not re.search(r"\s", uri) and bool(_PARAMS.fullmatch(params))
