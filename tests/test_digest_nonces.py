"""Digest nonces and their counts (RFC 7616 §3.4, RFC 3261 §22.4): a nonce
count must grow, a nonce answered without qop is good once, the digest uri
must name the Request-URI, and a nonce pushed out of the bounded ring is
stale, never accepted again."""

from __future__ import annotations

from typing import Any

import pytest
from aiosipua import SipDigestAuth, SipMessage, SipRequest, SipResponse, build_credentials, parse_auth, stringify_auth

from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, AuthStatus, DigestAuthenticator, authenticate_request, same_uri

DOMAIN = "pbx.local"
TOLL_NUMBER = "+15551230000"

class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def request(method: str, uri: str, authorization: str | None = None) -> SipRequest:
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKunit",
        "From: <sip:1001@pbx.local>;tag=a",
        "To: <sip:1002@pbx.local>",
        "Call-ID: unit",
        f"CSeq: 1 {method}",
        *([f"Authorization: {authorization}"] if authorization else []),
        "Content-Length: 0",
    ]
    message = SipMessage.parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, SipRequest)
    return message


def credentials(auth: DigestAuthenticator, method: str, uri: str, *, nc: int = 1, qop: bool = True) -> str:
    challenge = parse_auth(auth.challenge_headers("127.0.0.2")[0])
    if not qop:
        del challenge.params["qop"]
    built = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, method, uri, nonce_count=nc)
    assert built is not None
    return stringify_auth(built)


def with_nc(header: str, auth: DigestAuthenticator, method: str, uri: str, nc: int) -> str:
    """The same nonce and cnonce answered again with nonce count ``nc``."""
    params = parse_auth(header, credentials=True).params
    challenge = parse_auth(auth.challenge_headers("127.0.0.2")[0])
    challenge.params["nonce"] = params["nonce"]
    built = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, method, uri, nonce_count=nc, cnonce=params["cnonce"])
    assert built is not None
    return stringify_auth(built)


PASSWORD = {"1001": "secret1001"}.get


def test_nonce_counts_must_grow_and_a_nonce_without_qop_is_single_use() -> None:
    auth = DigestAuthenticator(DOMAIN, clock=Clock())
    uri = "sip:pbx.local"
    first = credentials(auth, "REGISTER", uri, nc=2)

    def check(header: str) -> AuthStatus:
        return auth.verify(request("REGISTER", uri, header), "127.0.0.2", PASSWORD).status

    assert check(first) is AuthStatus.OK
    assert check(first) is AuthStatus.REPLAY
    assert check(with_nc(first, auth, "REGISTER", uri, 1)) is AuthStatus.REPLAY  # backwards
    assert check(with_nc(first, auth, "REGISTER", uri, 3)) is AuthStatus.OK
    assert check(with_nc(first, auth, "REGISTER", uri, 9)) is AuthStatus.OK  # skipping is allowed
    assert check(with_nc(first, auth, "REGISTER", uri, 9)) is AuthStatus.REPLAY

    once = credentials(auth, "REGISTER", uri, qop=False)
    assert check(once) is AuthStatus.OK
    assert check(once) is AuthStatus.REPLAY


def test_credentials_for_another_request_uri_are_a_replay_even_on_a_fresh_nonce() -> None:
    auth = DigestAuthenticator(DOMAIN, clock=Clock())
    header = credentials(auth, "INVITE", "sip:1002@pbx.local")
    result = auth.verify(request("INVITE", f"sip:{TOLL_NUMBER}@pbx.local", header), "127.0.0.2", PASSWORD)
    assert result.status is AuthStatus.REPLAY and "not the Request-URI" in result.reason
    # The header was not used up by the refusal: on its own request it passes.
    assert auth.verify(request("INVITE", "sip:1002@pbx.local", header), "127.0.0.2", PASSWORD).ok


@pytest.mark.parametrize(
    ("digest_uri", "request_uri", "same"),
    [
        ("sip:1002@pbx.local", "sip:1002@PBX.LOCAL", True),
        ("sip:1002@pbx.local", "sip:1002@pbx.local:5060;user=phone", True),
        ("sip:%31002@pbx.local", "sip:1002@pbx.local", True),
        ("sip:[::1]:5070", "sip:[0:0::1]:5070", True),
        ("sip:1002@pbx.local", "sips:1002@pbx.local", False),
        ("sip:1002@pbx.local", "sip:1003@pbx.local", False),
        ("sip:Bob@pbx.local", "sip:bob@pbx.local", False),
        ("sip:1002@pbx.local", "sip:1002@pbx.local:5070", False),
        ("sip:1002@pbx.local", "sip:1002@evil.example", False),
        ("tel:+15551230000", "tel:+15551230001", False),
    ],
)
def test_digest_uri_compares_as_a_uri(digest_uri: str, request_uri: str, same: bool) -> None:
    assert same_uri(digest_uri, request_uri) is same


def test_a_nonce_pushed_out_of_the_ring_is_stale_and_never_accepted_again() -> None:
    auth = DigestAuthenticator(DOMAIN, clock=Clock(), nonce_slots=4)
    uri = "sip:pbx.local"
    header = credentials(auth, "REGISTER", uri)
    for _ in range(4):  # a flood of challenges to others
        auth.challenge_headers("127.0.0.9")
    result = auth.verify(request("REGISTER", uri, header), "127.0.0.2", PASSWORD)
    assert result.status is AuthStatus.STALE and "forgotten" in result.reason
    assert auth.verify(request("REGISTER", uri, with_nc(header, auth, "REGISTER", uri, 5)), "127.0.0.2", PASSWORD).status is AuthStatus.STALE
    # The newest nonces are all still good.
    assert auth.verify(request("REGISTER", uri, credentials(auth, "REGISTER", uri)), "127.0.0.2", PASSWORD).ok


def test_a_replay_is_answered_with_a_stale_challenge_and_counts_against_the_address() -> None:
    events = EventBus()
    seen: list[dict[str, Any]] = []
    events.subscribe("security", lambda **fields: seen.append(fields))
    auth = DigestAuthenticator(DOMAIN, clock=Clock())
    guard = AddressGuard(max_failures=2, events=events)
    header = credentials(auth, "INVITE", "sip:1002@pbx.local")
    answers: list[SipResponse] = []

    class Txn:
        to_tag = None

        def respond(self, response: SipResponse) -> None:
            answers.append(response)

        def reply(self, status: int) -> None:
            raise AssertionError(f"replied {status}")

    def attempt() -> str | None:
        return authenticate_request(
            request("INVITE", "sip:1002@pbx.local", header), "127.0.0.2", Txn(),  # type: ignore[arg-type]
            authenticator=auth, guard=guard, events=events, passwords=PASSWORD,
        )

    assert attempt() == "1001"
    assert attempt() is None and attempt() is None
    assert [a.status_code for a in answers] == [401, 401]
    assert all(parse_auth(h).params["stale"] == "true" for h in answers[0].headers.get("www-authenticate"))
    assert [e["kind"] for e in seen] == ["replay", "replay", "ban"]
    assert guard.is_banned("127.0.0.2")
