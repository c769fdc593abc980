"""SIPVicious, the scanner most SIP attacks start with, run as Debian ships it
against `pbx serve` on loopback.

``svwar`` enumerates extensions by comparing the answer to each candidate with
the answer to a random name that surely does not exist; ``svcrack`` tries a
password list against one extension. The server must give every candidate the
same answer, and must stop answering an address after 10 wrong passwords while
a phone on another address keeps its registration.

Both tools bind 0.0.0.0 whatever ``-b`` says (their ``main`` never passes the
binding address on), so their packets reach 127.0.0.1 from 127.0.0.1: each
test gets its own server, and the innocent phone is SIPp on 127.0.0.2. svcrack
speaks only MD5 and reads only the first challenge, so these servers list MD5
first (``sip.auth_algorithms``, as for any fleet of MD5-only phones): against
the default order, SHA-256 first, svcrack stops at once with a traceback.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.server import PASSWORDS, Server, free_port, start_server
from tests.support.sipp import BENCH_SCENARIOS, run_sipp
from tests.test_hostile_input import raw_udp, register

ATTACKER = "127.0.0.1"  # where svwar and svcrack come from, whatever -b says
PHONE_IP = "127.0.0.2"
CANDIDATES = "1000-1005"  # 1001, 1002 and 1003 exist; 1000, 1004 and 1005 do not
MD5_FIRST = {"auth_algorithms": ["MD5", "SHA-256"]}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path / "pbx", sip=MD5_FIRST)
    yield srv
    assert await srv.stop() == 0


async def sipvicious(tool: str, server: Server, *args: str, timeout: float = 40) -> str:
    """Run ``tool`` against ``server`` from a port of its own; its whole output."""
    proc = await asyncio.create_subprocess_exec(
        tool, "-p", str(server.sip_port), "-P", str(free_port()), "-x", ATTACKER, *args, ATTACKER,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


async def test_svwar_cannot_tell_existing_extensions_from_missing_ones(server: Server) -> None:
    methods = ("REGISTER", "INVITE", "OPTIONS")
    # --force: keep scanning although a made-up extension is challenged too,
    # comparing every answer with that one; --maximumtime 1: stop a second
    # after the last answer. Each scan has a port of its own, so they run at once.
    *forced, plain = await asyncio.gather(
        *(sipvicious("svwar", server, "--force", "-vv", "-m", method, "-e", CANDIDATES, "--maximumtime", "1") for method in methods),
        sipvicious("svwar", server, "-m", "REGISTER", "-e", CANDIDATES),
    )
    for method, out in zip(methods, forced, strict=True):
        assert "Ok SIP device found" in out, out  # it was answered, not ignored
        # What it prints: the answer to a random extension (401 to REGISTER and
        # INVITE, 200 to OPTIONS) as the "bad user" reply that every candidate
        # got as well, then "found nothing" and no table of extensions.
        bad_user = re.search(r"Bad user = (SIP/2\.0 \d{3})", out)
        assert bad_user is not None and bad_user.group(1) == ("SIP/2.0 200" if method == "OPTIONS" else "SIP/2.0 401"), out
        assert "found nothing" in out, out
        assert "exists" not in out and "Extension" not in out, out
    # Unforced, it stops at the first sign that it cannot work.
    assert "SIP server replied with an authentication request for an unknown extension" in plain, plain
    assert "found nothing" in plain, plain


def wordlist(tmp_path: Path, password_at: int | None, size: int = 15) -> Path:
    """``size`` wrong passwords, with the right one at 1-based ``password_at``."""
    words = [f"guess{n}" for n in range(1, size + 1)]
    if password_at is not None:
        words[password_at - 1] = PASSWORDS["1001"]
    path = tmp_path / f"words-{password_at}.txt"
    path.write_text("\n".join(words) + "\n")
    return path


async def phone_registers(server: Server, tmp_path: Path, port: int) -> None:
    """SIPp on 127.0.0.2 registers 1002 with the right password."""
    result = await run_sipp(
        BENCH_SCENARIOS / "register.xml", server.sip, local_ip=PHONE_IP, local_port=port, service="1002",
        extra=["-au", "1002", "-ap", PASSWORDS["1002"]], timeout=10, log_dir=tmp_path / f"sipp-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    assert result.ok, result.report()


async def test_svcrack_finds_a_password_among_its_first_ten_tries(server: Server, tmp_path: Path) -> None:
    """The control: svcrack as shipped does crack this server when it is answered,
    so "found nothing" below means the ban stopped it."""
    out = await sipvicious("svcrack", server, "-u", "1001", "-d", str(wordlist(tmp_path, 4)), "--maximumtime", "1")
    assert re.search(rf"1001\s*\|\s*{re.escape(PASSWORDS['1001'])}", out), out


async def test_svcrack_is_banned_after_ten_tries_while_a_registered_phone_keeps_working(tmp_path: Path) -> None:
    # Each wordlist against a server of its own (the bans are the servers'), at once.
    first, second = await asyncio.gather(start_server(tmp_path / "a", sip=MD5_FIRST), start_server(tmp_path / "b", sip=MD5_FIRST))
    try:
        await asyncio.gather(banned(first, tmp_path / "a", None), banned(second, tmp_path / "b", 12))
    finally:
        assert await first.stop() == 0
        assert await second.stop() == 0


async def banned(server: Server, tmp_path: Path, password_at: int | None) -> None:
    """svcrack from 127.0.0.1 with 15 passwords (the right one at ``password_at``)
    gets 10 tries, then silence, while SIPp on 127.0.0.2 keeps its registration."""
    phone_port = free_port(host=PHONE_IP)
    await phone_registers(server, tmp_path, phone_port)
    start = len(server.log)

    out = await sipvicious("svcrack", server, "-u", "1001", "-d", str(wordlist(tmp_path, password_at)), "--maximumtime", "1")

    # svcrack ran out of answers: it prints no password, only this.
    assert "since we last received a response - stopping" in out, out
    assert "found nothing" in out, out
    assert PASSWORDS["1001"] not in out, out
    await server.wait_log(rf"event=security kind=ban src={re.escape(ATTACKER)}\b", start=start, timeout=1)
    failures = [line for line in server.log[start:] if re.search(rf"kind=auth_failure src={re.escape(ATTACKER)}\b", line)]
    assert len(failures) == 10, "\n".join(failures)

    # The attacker's address gets no answer any more, even without credentials.
    transport, attacker = await raw_udp(ATTACKER, server)
    ip, port = transport.get_extra_info("sockname")
    try:
        transport.sendto(register(ip, port, "1001", uuid.uuid4().hex, 1))
        with pytest.raises(TimeoutError):
            await attacker.reply(timeout=1.0)
    finally:
        transport.close()

    # The phone on 127.0.0.2 registers again, from the same port, as its timer would.
    await phone_registers(server, tmp_path, phone_port)
    assert await server.metric("pbx_registrations") == 1
