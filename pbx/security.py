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
