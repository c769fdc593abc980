"""Keys sent by SIP INFO, as softphones without RFC 4733 send them."""

from __future__ import annotations

import pytest
from aiosipua import SipMessage, SipRequest

from pbx.sip.messages import info_key


def info(content_type: str, body: str) -> SipRequest:
    raw = (
        "INFO sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
        "From: <sip:1001@pbx.local>;tag=a\r\nTo: <sip:8000@pbx.local>;tag=b\r\nCall-ID: c\r\nCSeq: 2 INFO\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    request = SipMessage.parse(raw)
    assert isinstance(request, SipRequest)
    return request


@pytest.mark.parametrize(
    ("content_type", "body", "key"),
    [
        ("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n", "5"),
        ("application/dtmf-relay", "Signal= #\r\nDuration=250\r\n", "#"),
        ("application/dtmf-relay", "Signal=11\r\n", "#"),
        ("application/dtmf-relay", "Signal=10\r\n", "*"),
        ("application/dtmf", "7", "7"),
        ("application/dtmf-relay", "Duration=160\r\n", None),
        ("application/dtmf-relay", "Signal=99\r\n", None),
        ("text/plain", "Signal=5", None),
    ],
)
def test_info_key(content_type: str, body: str, key: str | None) -> None:
    assert info_key(info(content_type, body)) == key
