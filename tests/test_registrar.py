"""Registrar and digest authentication with real SIP messages and a real store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosipua import SipDigestAuth, SipMessage, SipRequest, SipResponse, build_credentials, parse_auth, stringify_auth

from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, AuthStatus, DigestAuthenticator
from pbx.sip.registrar import Registrar
from pbx.store.db import Store

REALM = "pbx.local"
PASSWORDS = {"1001": "secret1001", "1002": "secret1002"}
PHONE = ("127.0.0.2", 5062)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Collects the events a registrar emits."""

    def __init__(self, bus: EventBus) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        for name in ("auth_failure", "registrations_changed"):
            bus.subscribe(name, lambda name=name, **fields: self.seen.append((name, fields)))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for seen, fields in self.seen if seen == name]


class Env:
    """A registrar wired to a real store, with hand-driven clocks."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = Clock()
        self.events = EventBus()
        self.recorder = Recorder(self.events)
        self.auth = DigestAuthenticator(REALM, secret=b"k" * 32, clock=self.clock)
        self.guard = AddressGuard(clock=self.clock)
        self.registrar = self.new_registrar()
        self.cseq = 0

    def new_registrar(self) -> Registrar:
        return Registrar(PASSWORDS.get, self.store, self.auth, self.guard, self.events, clock=self.clock)

    def request(
        self,
        user: str = "1001",
        contacts: tuple[str, ...] = ("<sip:1001@127.0.0.2:5062>",),
        *,
        expires: int | None = None,
        authorization: str | None = None,
    ) -> SipRequest:
        self.cseq += 1
        lines = [
            f"REGISTER sip:{REALM} SIP/2.0",
            f"Via: SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bK{self.cseq}x;rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{REALM}>;tag=ft{self.cseq}",
            f"To: <sip:{user}@{REALM}>",
            "Call-ID: reg-call-1",
            f"CSeq: {self.cseq} REGISTER",
            *(f"Contact: {c}" for c in contacts),
            *([f"Expires: {expires}"] if expires is not None else []),
            *([f"Authorization: {authorization}"] if authorization else []),
            "User-Agent: test-phone/1.0",
            "Content-Length: 0",
        ]
        message = SipMessage.parse("\r\n".join(lines) + "\r\n\r\n")
        assert isinstance(message, SipRequest)
        return message

    async def register(
        self,
        user: str = "1001",
        contacts: tuple[str, ...] = ("<sip:1001@127.0.0.2:5062>",),
        *,
        expires: int | None = None,
        password: str | None = None,
        username: str | None = None,
        algorithm: str = "MD5",
        source: tuple[str, int] = PHONE,
        challenge_ip: str | None = None,
    ) -> SipResponse:
        """Challenge, then answer with credentials, like a phone does."""
        if challenge_ip is None:
            challenge_ip = source[0]
        challenges = [parse_auth(v) for v in self.auth.challenge_headers(challenge_ip)]
        challenge = next(c for c in challenges if c.params["algorithm"] == algorithm)
        credentials = build_credentials(
            SipDigestAuth(username or user, password if password is not None else PASSWORDS[user]),
            challenge,
            "REGISTER",
            f"sip:{REALM}",
        )
        assert credentials is not None
        request = self.request(user, contacts, expires=expires, authorization=stringify_auth(credentials))
        return await self.registrar.handle_register(request, source, "udp")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(tmp_path / "pbx.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def env(store: Store) -> Env:
    env = Env(store)
    await env.registrar.load()
    return env


def contact_headers(response: SipResponse) -> list[str]:
    return response.headers.get("Contact")


async def test_challenge_then_md5_credentials_register_the_contact(env: Env) -> None:
    challenge = await env.registrar.handle_register(env.request(), PHONE, "udp")
    assert challenge.status_code == 401
    offered = [parse_auth(v) for v in challenge.headers.get("WWW-Authenticate")]
    assert [c.params["algorithm"] for c in offered] == ["SHA-256", "MD5"]
    for c in offered:
        assert c.scheme == "Digest"
        assert c.params["qop"] == "auth"
        assert c.params["realm"] == REALM
        assert c.params["nonce"] and c.params["opaque"]
        assert "stale" not in c.params

    credentials = build_credentials(SipDigestAuth("1001", "secret1001"), offered[1], "REGISTER", f"sip:{REALM}")
    assert credentials is not None
    request = env.request(expires=600, authorization=stringify_auth(credentials))
    response = await env.registrar.handle_register(request, PHONE, "udp")

    assert response.status_code == 200
    assert contact_headers(response) == ["<sip:1001@127.0.0.2:5062>;expires=600"]
    assert (response.headers.get_first("Date") or "").endswith(" GMT")
    [binding] = env.registrar.contacts("1001")
    assert binding.contact == "sip:1001@127.0.0.2:5062"
    assert binding.source == PHONE
    assert binding.transport == "udp"
    assert binding.expires_at == env.clock.now + 600
    assert binding.user_agent == "test-phone/1.0"
    assert binding.call_id == "reg-call-1"
    assert env.recorder.named("registrations_changed")[-1] == {"count": 1}
    [row] = await env.store.rows("registrations")
    assert row["source"] == "127.0.0.2:5062"


async def test_sha256_credentials_register(env: Env) -> None:
    response = await env.register(algorithm="SHA-256")
    assert response.status_code == 200
    assert contact_headers(response) == ["<sip:1001@127.0.0.2:5062>;expires=3600"]


async def test_credentials_without_qop_rfc2617_style_register(env: Env) -> None:
    [challenge, _] = [parse_auth(v) for v in env.auth.challenge_headers(PHONE[0])]
    del challenge.params["qop"]
    credentials = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, "REGISTER", f"sip:{REALM}")
    assert credentials is not None and "qop" not in credentials.params
    request = env.request(authorization=stringify_auth(credentials))
    assert (await env.registrar.handle_register(request, PHONE, "udp")).status_code == 200


async def test_wrong_password_is_forbidden_and_recorded(env: Env) -> None:
    response = await env.register(password="guess")
    assert response.status_code == 403
    assert env.recorder.named("auth_failure") == [{"ip": "127.0.0.2", "extension": "1001"}]
    assert env.registrar.contacts("1001") == []
    assert await env.store.rows("registrations") == []


async def test_unknown_extension_is_challenged_then_forbidden(env: Env) -> None:
    challenge = await env.registrar.handle_register(env.request("4711"), PHONE, "udp")
    assert challenge.status_code == 401
    response = await env.register("4711", password="whatever")
    assert response.status_code == 403
    assert env.recorder.named("auth_failure") == [{"ip": "127.0.0.2", "extension": "4711"}]


async def test_nonce_from_another_address_is_forbidden(env: Env) -> None:
    response = await env.register(challenge_ip="127.0.0.9")
    assert response.status_code == 403
    assert env.recorder.named("auth_failure") == [{"ip": "127.0.0.2", "extension": "1001"}]


async def test_expired_nonce_with_right_response_is_stale_not_failure(env: Env) -> None:
    [challenge, _] = [parse_auth(v) for v in env.auth.challenge_headers(PHONE[0])]
    credentials = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, "REGISTER", f"sip:{REALM}")
    assert credentials is not None
    env.clock.now += 301
    request = env.request(authorization=stringify_auth(credentials))
    response = await env.registrar.handle_register(request, PHONE, "udp")

    assert response.status_code == 401
    offered = [parse_auth(v) for v in response.headers.get("WWW-Authenticate")]
    assert [c.params.get("stale") for c in offered] == ["true", "true"]
    assert env.recorder.named("auth_failure") == []
    # The fresh nonce works.
    answer = build_credentials(SipDigestAuth("1001", "secret1001"), offered[0], "REGISTER", f"sip:{REALM}")
    assert answer is not None
    request = env.request(authorization=stringify_auth(answer))
    assert (await env.registrar.handle_register(request, PHONE, "udp")).status_code == 200


async def test_expired_nonce_with_wrong_response_is_a_failure(env: Env) -> None:
    [challenge, _] = [parse_auth(v) for v in env.auth.challenge_headers(PHONE[0])]
    credentials = build_credentials(SipDigestAuth("1001", "nope"), challenge, "REGISTER", f"sip:{REALM}")
    assert credentials is not None
    env.clock.now += 301
    request = env.request(authorization=stringify_auth(credentials))
    result = env.auth.verify(request, PHONE[0], PASSWORDS.get)
    assert result.status is AuthStatus.FAILED
    assert result.username == "1001"


@pytest.mark.parametrize(
    ("field", "value"),
    [("realm", "other.realm"), ("algorithm", "MD5-sess"), ("nonce", "garbage"), ("uri", ""), ("nc", "1")],
)
async def test_malformed_credentials_fail(env: Env, field: str, value: str) -> None:
    [challenge, _] = [parse_auth(v) for v in env.auth.challenge_headers(PHONE[0])]
    credentials = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, "REGISTER", f"sip:{REALM}")
    assert credentials is not None
    credentials.params[field] = value
    request = env.request(authorization=stringify_auth(credentials))
    assert env.auth.verify(request, PHONE[0], PASSWORDS.get).status is AuthStatus.FAILED


async def test_proxy_authorization_is_verified_when_asked_for(env: Env) -> None:
    [challenge, _] = [parse_auth(v) for v in env.auth.challenge_headers(PHONE[0])]
    credentials = build_credentials(SipDigestAuth("1001", "secret1001"), challenge, "REGISTER", f"sip:{REALM}")
    assert credentials is not None
    request = env.request()
    request.headers.set_single("Proxy-Authorization", stringify_auth(credentials))
    assert env.auth.verify(request, PHONE[0], PASSWORDS.get).status is AuthStatus.MISSING
    result = env.auth.verify(request, PHONE[0], PASSWORDS.get, "Proxy-Authorization")
    assert result.ok and result.username == "1001"


async def test_username_must_match_the_registered_extension(env: Env) -> None:
    response = await env.register("1002", ("<sip:1002@127.0.0.2:5062>",), username="1001", password="secret1001")
    assert response.status_code == 403
    assert env.registrar.contacts("1002") == []
    assert env.recorder.named("auth_failure") == [{"ip": "127.0.0.2", "extension": "1002"}]


async def test_two_contacts_then_expires_zero_removes_one(env: Env) -> None:
    assert (await env.register(contacts=("<sip:1001@127.0.0.2:5062>",))).status_code == 200
    env.clock.now += 10
    response = await env.register(contacts=("<sip:1001@10.0.0.5:5070;transport=tcp>",), expires=120)
    assert response.status_code == 200
    assert contact_headers(response) == [
        "<sip:1001@10.0.0.5:5070;transport=tcp>;expires=120",
        "<sip:1001@127.0.0.2:5062>;expires=3590",
    ]
    assert [b.contact for b in env.registrar.contacts("1001")] == [
        "sip:1001@10.0.0.5:5070;transport=tcp",
        "sip:1001@127.0.0.2:5062",
    ]
    assert env.recorder.named("registrations_changed")[-1] == {"count": 2}

    response = await env.register(contacts=("<sip:1001@127.0.0.2:5062>",), expires=0)
    assert response.status_code == 200
    assert contact_headers(response) == ["<sip:1001@10.0.0.5:5070;transport=tcp>;expires=120"]
    assert [row["contact"] for row in await env.store.rows("registrations")] == ["sip:1001@10.0.0.5:5070;transport=tcp"]
    assert env.recorder.named("registrations_changed")[-1] == {"count": 1}


async def test_contact_expires_param_wins_over_header_and_is_capped(env: Env) -> None:
    contacts = ("<sip:1001@127.0.0.2:5062>;expires=90", "sip:1001@127.0.0.3:5062;expires=99999", "<sip:1001@h>")
    response = await env.register(contacts=contacts, expires=300)
    assert response.status_code == 200
    assert sorted(contact_headers(response)) == [
        "<sip:1001@127.0.0.2:5062>;expires=90",
        "<sip:1001@127.0.0.3:5062>;expires=3600",
        "<sip:1001@h>;expires=300",
    ]


async def test_star_removes_all_bindings(env: Env) -> None:
    await env.register(contacts=("<sip:1001@127.0.0.2:5062>", "<sip:1001@127.0.0.3:5062>"))
    await env.register("1002", ("<sip:1002@127.0.0.4:5062>",))
    assert len(env.registrar.all_bindings()) == 3

    response = await env.register(contacts=("*",), expires=0)
    assert response.status_code == 200
    assert contact_headers(response) == []
    assert env.registrar.contacts("1001") == []
    assert [b.extension for b in env.registrar.all_bindings()] == ["1002"]
    assert [row["extension"] for row in await env.store.rows("registrations")] == ["1002"]
    assert env.recorder.named("registrations_changed")[-1] == {"count": 1}


async def test_star_without_expires_zero_is_a_bad_request(env: Env) -> None:
    await env.register()
    assert (await env.register(contacts=("*",), expires=60)).status_code == 400
    assert (await env.register(contacts=("*", "<sip:1001@h>"), expires=0)).status_code == 400
    assert len(env.registrar.contacts("1001")) == 1


async def test_expires_below_minimum_is_interval_too_brief(env: Env) -> None:
    response = await env.register(contacts=("<sip:1001@127.0.0.2:5062>", "<sip:1001@h>;expires=30"))
    assert response.status_code == 423
    assert response.headers.get_first("Min-Expires") == "60"
    # Atomic: the acceptable contact was not bound either.
    assert env.registrar.contacts("1001") == []


async def test_register_without_contact_is_a_query(env: Env) -> None:
    await env.register(expires=200)
    env.clock.now += 50
    changes = len(env.recorder.named("registrations_changed"))
    response = await env.register(contacts=())
    assert response.status_code == 200
    assert contact_headers(response) == ["<sip:1001@127.0.0.2:5062>;expires=150"]
    assert len(env.recorder.named("registrations_changed")) == changes


async def test_bindings_survive_a_restart(env: Env) -> None:
    await env.register(contacts=("<sip:1001@127.0.0.2:5062>",), expires=600)
    env.clock.now += 1
    await env.register(contacts=("<sip:1001@[::1]:5064>",), expires=900, source=("::1", 5064))
    await env.register("1002", ("<sip:1002@127.0.0.4:5062>",), expires=60)
    before = env.registrar.all_bindings()
    env.clock.now += 61

    restarted = env.new_registrar()
    await restarted.load()

    assert [b.contact for b in restarted.contacts("1001")] == ["sip:1001@[::1]:5064", "sip:1001@127.0.0.2:5062"]
    assert restarted.contacts("1001") == [b for b in before if b.extension == "1001"]
    assert restarted.contacts("1002") == []
    assert len(await env.store.rows("registrations")) == 2
    assert env.recorder.named("registrations_changed")[-1] == {"count": 2}


async def test_expired_bindings_vanish(env: Env) -> None:
    await env.register(contacts=("<sip:1001@127.0.0.2:5062>",), expires=60)
    await env.register(contacts=("<sip:1001@127.0.0.3:5062>",), expires=120)
    env.clock.now += 60
    assert [b.contact for b in env.registrar.contacts("1001")] == ["sip:1001@127.0.0.3:5062"]

    assert await env.registrar.expire() == 1
    assert [row["contact"] for row in await env.store.rows("registrations")] == ["sip:1001@127.0.0.3:5062"]
    assert env.recorder.named("registrations_changed")[-1] == {"count": 1}
    env.clock.now += 60
    assert await env.registrar.expire() == 1
    assert env.registrar.all_bindings() == []
    assert await env.store.rows("registrations") == []


async def test_background_sweep_drops_expired_bindings(store: Store) -> None:
    env = Env(store)
    env.registrar = Registrar(
        PASSWORDS.get, store, env.auth, env.guard, env.events, clock=env.clock, sweep_interval=0.01
    )
    await env.register(expires=60)
    env.clock.now += 60
    env.registrar.start()
    try:
        for _ in range(200):
            if not await store.rows("registrations"):
                break
            await asyncio.sleep(0.01)
    finally:
        await env.registrar.stop()
    assert await store.rows("registrations") == []


async def test_guard_bans_after_ten_failures_in_a_minute_and_lifts_after_ten_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(1000.0)
    guard = AddressGuard(clock=clock)
    for _ in range(9):
        assert guard.record_failure("127.0.0.3") is False
        clock.now += 6
    assert not guard.is_banned("127.0.0.3")
    with caplog.at_level(logging.WARNING, logger="pbx.sip.auth"):
        assert guard.record_failure("127.0.0.3") is True
    assert "blocking 127.0.0.3 for 600 s after 10 failed authentications in 60 s" in caplog.messages
    assert guard.is_banned("127.0.0.3")
    assert guard.banned() == {"127.0.0.3": 600.0}

    clock.now += 599
    assert guard.is_banned("127.0.0.3")
    clock.now += 1
    assert not guard.is_banned("127.0.0.3")
    assert guard.banned() == {}


async def test_guard_forgets_failures_older_than_the_window() -> None:
    clock = Clock(1000.0)
    guard = AddressGuard(clock=clock)
    for _ in range(30):
        assert guard.record_failure("127.0.0.3") is False
        clock.now += 7  # ten failures always span more than 60 s
    assert not guard.is_banned("127.0.0.3")


async def test_banned_address_is_refused_without_a_challenge(env: Env) -> None:
    for _ in range(10):
        assert (await env.register(password="guess")).status_code == 403
    assert env.guard.is_banned(PHONE[0])
    assert (await env.registrar.handle_register(env.request(), PHONE, "udp")).status_code == 403
    assert (await env.register()).status_code == 403
    assert env.registrar.contacts("1001") == []
    # Another address is unaffected.
    assert (await env.register(source=("127.0.0.5", 5060))).status_code == 200
    env.clock.now += 600
    assert (await env.register()).status_code == 200


def test_challenge_order_follows_the_configured_algorithms() -> None:
    default = DigestAuthenticator("pbx.local").challenge_headers("127.0.0.1")
    assert [parse_auth(h).params["algorithm"] for h in default] == ["SHA-256", "MD5"]
    md5_first = DigestAuthenticator("pbx.local", algorithms=("MD5", "SHA-256")).challenge_headers("127.0.0.1")
    assert [parse_auth(h).params["algorithm"] for h in md5_first] == ["MD5", "SHA-256"]
    with pytest.raises(ValueError):
        DigestAuthenticator("pbx.local", algorithms=("SHA-1",))


async def test_a_contact_found_unreachable_is_not_rung_until_it_answers_or_registers_again(env: Env) -> None:
    await env.register()
    [binding] = env.registrar.contacts("1001")
    changes = len(env.recorder.named("registrations_changed"))
    env.registrar.qualified(binding, 0.012)
    assert (binding.reachable, binding.rtt_ms) == (True, 12.0)
    env.registrar.qualified(binding, None)
    assert env.registrar.contacts("1001") == [] and env.registrar.bindings("1001") == [binding]
    assert binding.rtt_ms is None
    assert env.registrar.all_bindings() == [binding]  # the API still lists it
    env.registrar.qualified(binding, 0.02)
    assert env.registrar.contacts("1001") == [binding]
    assert len(env.recorder.named("registrations_changed")) == changes + 2  # down, up: the queues look again

    # A refresh from the same address keeps the round trip; a late answer about the replaced binding changes nothing.
    await env.register()
    [fresh] = env.registrar.contacts("1001")
    assert fresh is not binding and fresh.rtt_ms == 20.0
    env.registrar.qualified(binding, None)
    assert env.registrar.contacts("1001") == [fresh]
    env.registrar.qualified(fresh, None)
    assert env.registrar.contacts("1001") == []
    await env.register()  # a REGISTER makes it live at once
    assert [b.reachable for b in env.registrar.contacts("1001")] == [True]
