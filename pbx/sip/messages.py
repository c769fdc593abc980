"""Building SIP messages the way every part of the server needs them."""

from __future__ import annotations

from aiosipua import SipRequest, SipResponse, generate_tag, parse_address, parse_uri

REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    603: "Decline",
}


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: dict[str, str] | None = None,
) -> SipResponse:
    """A response to ``request`` (RFC 3261 §8.2.6): Via, From, Call-ID and CSeq
    copied; To copied with ``to_tag`` added (a fresh one for non-100 responses
    when the request's To has none)."""
    resp = SipResponse(status_code=status, reason_phrase=reason or REASONS.get(status, ""))
    for via in request.headers.get("via"):
        resp.headers.append("Via", via)
    for name in ("From", "Call-ID", "CSeq"):
        value = request.headers.get_first(name)
        if value is not None:
            resp.headers.set_single(name, value)
    to = request.headers.get_first("to")
    if to is not None:
        to_addr = request.to_addr
        if status != 100 and to_addr is not None and not to_addr.tag:
            to = f"{to};tag={to_tag or generate_tag()}"
        resp.headers.set_single("To", to)
    for name, value in (headers or {}).items():
        resp.headers.set_single(name, value)
    return resp


def uri_user(uri: str) -> str | None:
    """The user part of a SIP URI; None when it has none or does not parse."""
    try:
        return parse_uri(uri).user
    except (ValueError, IndexError):
        return None


def address_user(header: str | None) -> str | None:
    """The user part of the URI in a From/To-style header; None when it has none or does not parse."""
    if not header:
        return None
    try:
        return parse_address(header).uri.user
    except (ValueError, IndexError):
        return None


def info_key(request: SipRequest) -> str | None:
    """The key a SIP INFO carries (application/dtmf-relay or application/dtmf), if any."""
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    text = request.text.strip()
    if content_type == "application/dtmf-relay":
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == "signal":
                text = value.strip()
                break
        else:
            return None
    elif content_type != "application/dtmf":
        return None
    key = {"10": "*", "11": "#"}.get(text, text)
    return key if len(key) == 1 and key in "0123456789*#ABCD" else None
