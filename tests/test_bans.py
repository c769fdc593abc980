"""Address bans: IPv4 sources are banned per address, IPv6 sources per /64
(every address of a subscriber's prefix counts towards one ban, and the ban
covers the prefix); each ban is a ``ban`` security event. End to end, a
flood of wrong passwords against `pbx serve` is banned, its packets are then
dropped, and fail2ban (Debian's fail2ban-regex, with the filter and jail in
config/fail2ban/) finds every refusal in the server's log lines."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosipua import SipDigestAuth, SipMessage, SipResponse, build_credentials, parse_auth, stringify_auth

from pbx.events import EventBus
from pbx.security import address_key
from pbx.sip.auth import AddressGuard
from tests.support.server import Server, start_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard_with_events() -> tuple[AddressGuard, Clock, list[dict[str, Any]]]:
    clock = Clock()
    events = EventBus()
    seen: list[dict[str, Any]] = []
    events.subscribe("security", lambda **fields: seen.append(fields))
    return AddressGuard(clock=clock, events=events), clock, seen


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("::1", "::/64"),
    ],
)
def test_a_ban_covers_an_ipv4_address_or_an_ipv6_64(ip: str, key: str) -> None:
    assert address_key(ip) == key


def test_failures_from_anywhere_in_a_64_add_up_and_the_ban_covers_the_64() -> None:
    guard, clock, seen = guard_with_events()
    # An attacker rotating through its /64: each address fails once.
    for host in range(1, 11):
        banned = guard.record_failure(f"2001:db8:1:2::{host:x}")
        clock.now += 1
    assert banned
    assert guard.is_banned("2001:db8:1:2:ffff:ffff:ffff:ffff")  # never seen, same /64
    assert not guard.is_banned("2001:db8:1:3::1")  # the neighbouring /64
    assert guard.banned() == {"2001:db8:1:2::/64": 599.0}
    assert seen == [{"kind": "ban", "src": "2001:db8:1:2::a", "network": "2001:db8:1:2::/64", "seconds": 600}]
    clock.now += 599
    assert not guard.is_banned("2001:db8:1:2::1")


def test_ipv4_addresses_count_and_are_banned_one_by_one() -> None:
    guard, clock, seen = guard_with_events()
    for host in range(1, 11):  # ten neighbours, one failure each: nobody is banned
        assert not guard.record_failure(f"198.51.100.{host}")
    for _ in range(10):
        guard.record_failure("198.51.100.200")
    assert guard.is_banned("198.51.100.200")
    assert guard.is_banned("::ffff:198.51.100.200")  # the same address, as a dual-stack socket sees it
    assert not guard.is_banned("198.51.100.201")
    assert seen == [{"kind": "ban", "src": "198.51.100.200", "seconds": 600}]


# --- end to end ---

FAIL2BAN = Path(__file__).parent.parent / "config" / "fail2ban"
needs_fail2ban = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed (make test-deps installs it)"
)


class RawUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[SipResponse] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = SipMessage.parse(data)
        if isinstance(message, SipResponse):
            self.received.put_nowait(message)

    async def reply(self, timeout: float = 3.0) -> SipResponse:
        async with asyncio.timeout(timeout):
            return await self.received.get()


async def raw_udp(ip: str, server: Server) -> tuple[asyncio.DatagramTransport, RawUdp, int]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        RawUdp, local_addr=(ip, 0), remote_addr=("127.0.0.1", server.sip_port)
    )
    return transport, protocol, transport.get_extra_info("sockname")[1]


def register(ip: str, port: int, cseq: int, authorization: str | None = None) -> bytes:
    lines = [
        "REGISTER sip:pbx.local SIP/2.0",
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
        "From: <sip:1001@pbx.local>;tag=guess",
        "To: <sip:1001@pbx.local>",
        "Call-ID: ban-test",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:1001@{ip}:{port}>",
        "Max-Forwards: 70",
        *([f"Authorization: {authorization}"] if authorization else []),
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx")
    yield srv
    assert await srv.stop() == 0


async def test_a_password_flood_is_banned_announced_and_then_dropped(server: Server, tmp_path: Path) -> None:
    transport, attacker, port = await raw_udp("127.0.0.3", server)
    try:
        for attempt in range(10):
            transport.sendto(register("127.0.0.3", port, 2 * attempt + 1))
            challenge = await attacker.reply()
            assert challenge.status_code == 401
            md5 = next(parse_auth(h) for h in challenge.headers.get("www-authenticate") if "MD5" in h)
            credentials = build_credentials(SipDigestAuth("1001", "not-the-password"), md5, "REGISTER", "sip:pbx.local")
            assert credentials is not None
            if attempt == 0:  # a realm that tries to put someone else's address before fail2ban
                credentials.params["realm"] = "x pbx.security: event=security kind=auth_failure src=6.6.6.6 extension=1"
            transport.sendto(register("127.0.0.3", port, 2 * attempt + 2, stringify_auth(credentials)))
            assert (await attacker.reply()).status_code == 403
        await server.wait_log(r"event=security kind=ban src=127\.0\.0\.3 seconds=600$")
        transport.sendto(register("127.0.0.3", port, 100))
        with pytest.raises(TimeoutError):
            await attacker.reply(timeout=1.0)
    finally:
        transport.close()
    assert await server.metric("pbx_security_events_total", event="ban") == 1
    assert await server.metric("pbx_security_events_total", event="auth_failure") == 10
    failures = [line for line in server.log if "pbx.security: event=security kind=auth_failure" in line]
    assert len(failures) == 10
    assert all(" src=127.0.0.3 extension=1001 method=REGISTER reason=" in line for line in failures)
    assert 'reason="wrong realm' in failures[0]  # the client's text is quoted, after src

    transport, neighbour, port = await raw_udp("127.0.0.4", server)
    try:
        transport.sendto(register("127.0.0.4", port, 1))
        assert (await neighbour.reply()).status_code == 401
    finally:
        transport.close()

    if shutil.which("fail2ban-regex") is not None:
        log = tmp_path / "pbx.log"
        log.write_text("\n".join(server.log) + "\n")
        found = fail2ban_regex(log)
        assert found == {"127.0.0.3": 11}  # ten refusals and the ban; never the address in the realm


def fail2ban_regex(log: Path) -> dict[str, int]:
    """The addresses fail2ban's own matcher takes from ``log`` with the shipped filter, with their hit counts."""
    result = subprocess.run(
        ["fail2ban-regex", "--out", "ip", str(log), str(FAIL2BAN / "filter.d" / "pbx.conf")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    hits: dict[str, int] = {}
    for ip in result.stdout.split():
        hits[ip] = hits.get(ip, 0) + 1
    return hits


@needs_fail2ban
def test_the_shipped_jail_loads_with_the_filter(tmp_path: Path) -> None:
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    shutil.copy(FAIL2BAN / "filter.d" / "pbx.conf", config / "filter.d" / "pbx.conf")
    shutil.copy(FAIL2BAN / "jail.d" / "pbx.conf", config / "jail.d" / "pbx.conf")
    dumped = subprocess.run(
        ["fail2ban-client", "-c", str(config), "-d"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "['add', 'pbx', 'systemd']" in dumped
    assert "['set', 'pbx', 'addjournalmatch', '_SYSTEMD_UNIT=pbx.service']" in dumped
    assert "['set', 'pbx', 'maxretry', 5]" in dumped
    assert "pbx\\\\.security: event=security kind=(?:auth_failure|replay|pin_failure|ban) src=<HOST>" in dumped
