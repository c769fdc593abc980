"""Security events: one log line a fail2ban filter can read, and one counter.

Every refusal that an attacker's probing causes (a wrong password, a replayed
login, a number no rule allows, RTP from a stranger, a connection over the
limit) is announced through :func:`security_event`. It writes one line

    event=security kind=auth_failure src=198.51.100.7 extension=1001

at WARNING and emits the ``security`` domain event that
``pbx_security_events_total{event}`` counts. ``kind`` is one of
:data:`SECURITY_EVENTS`, so the metric's label set stays fixed whatever an
attacker sends.
"""

from __future__ import annotations

import logging
import socket

from pbx.events import EventBus, logfmt

logger = logging.getLogger(__name__)

SECURITY_EVENTS = (
    "auth_failure",  # wrong password, unknown user, foreign nonce
    "ban",  # an address (an IPv6 /64) was banned after repeated failures
    "replay",  # digest credentials used again (nonce count not new, uri not the request's)
    "refused_number",  # a number no outbound rule allows that party to dial
    "call_limit",  # max_calls of an extension or trunk reached
    "rtp_stranger",  # RTP or RTCP from an address that is not the call's peer
    "connection_refused",  # a TCP/TLS connection over the per-address or total limit
    "pin_failure",  # a wrong voicemail PIN
)


def security_event(events: EventBus, kind: str, src: str, **fields: object) -> None:
    """Log ``event=security kind=KIND src=SRC key=value ...`` and count it."""
    if kind not in SECURITY_EVENTS:
        raise ValueError(f"unknown security event {kind!r}")
    pairs = "".join(f" {key}={logfmt(value)}" for key, value in fields.items() if value is not None)
    logger.warning("event=security kind=%s src=%s%s", kind, logfmt(src), pairs)
    events.emit("security", kind=kind, src=src, **fields)


def address_key(ip: str) -> str:
    """What one attacker's address counts as, for bans and connection caps:
    an IPv4 address (also when written IPv4-mapped), or the /64 an IPv6
    address is in (one subscriber's prefix, RFC 6177: a host may take any
    address in it)."""
    if ":" not in ip:
        return ip
    # inet_pton rather than ipaddress: every packet asks while a ban is on,
    # and this is some thirty times faster.
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except OSError:
        return ip
    if packed.startswith(_IPV4_MAPPED):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


_IPV4_MAPPED = bytes(10) + b"\xff\xff"
