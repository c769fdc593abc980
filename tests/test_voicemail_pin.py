"""Voicemail PINs cannot be guessed: a pjsua2 caller on voicemail:main of
`pbx serve` types wrong PINs across calls until the mailbox locks, then the
right PIN is refused; wrong PINs count towards the caller's address ban,
except when the call came through a trunk (the carrier's address is every
customer's). Plus the lock's clock, and the fsyncs before a message's row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pbx.app import load_setup
from pbx.config.load import load_config
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.sip.auth import AddressGuard
from pbx.store.db import Store
from pbx.pin_locks import PIN_LOCK_FAILURES, PIN_LOCK_SECONDS, PinLocks
from pbx.voicemail.service import VoicemailService
from tests.support.phone import Phone
from tests.support.server import PASSWORDS, Server, start_server
from tests.support.sipp import run_sipp

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "config" / "sounds"
SIPP = REPO / "tests" / "sipp"
MAIN = "8600"  # voicemail:main
PIN = "4321"


async def pin_server(folder: Path, **overrides: Any) -> Server:
    extensions: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["voicemail"] = {"pin": PIN}
    return await start_server(
        folder,
        sounds={"dir": str(SOUNDS), "tts": None},
        sip={"auth_algorithms": ["MD5"]},  # SIPp's guesser answers MD5 only
        extensions=extensions,
        inbound={MAIN: "voicemail:main"},
        log_level="INFO",
        **overrides,
    )


async def dial(phone: Phone, number: str) -> int:
    call = await phone.call(f"sip:{number}@pbx.local")
    await phone.wait_event("call_state", call=call, state="confirmed")
    await phone.wait_event("media", call=call, active=True)
    return call


async def guess(server: Server, phone: Phone, attempts: list[str]) -> list[str]:
    """One call to voicemail:main typing mailbox 1001 and each PIN of
    ``attempts`` in turn (each once the server has judged the one before);
    the log lines that judged them. The caller hangs up after the last one
    rather than hear the prompts out."""
    call = await dial(phone, MAIN)
    answers = []
    for pin in attempts:
        mark = len(server.log)
        await phone.dtmf(call, f"1001#{pin}#")
        answers.append(await server.wait_log(r"voicemail: (wrong PIN|mailbox 1001 (signed in|is locked))", start=mark, timeout=20))
    await phone.hangup(call)
    await phone.wait_event("call_state", call=call, state="disconnected", timeout=20)
    return answers


def security_lines(server: Server, kind: str) -> list[str]:
    return [line for line in server.log if f"event=security kind={kind} " in line]


async def test_five_wrong_pins_across_calls_lock_the_mailbox_and_count_towards_the_address_ban(tmp_path: Path) -> None:
    server = await pin_server(tmp_path / "pbx")
    try:
        async with await Phone.start(name="guesser") as phone:
            await phone.register(server.sip, "1002", PASSWORDS["1002"])
            # Three tries a call, so the guesser calls again: the count goes on across calls.
            first = await guess(server, phone, ["0000", "1111", "2222"])
            assert all("wrong PIN" in line for line in first)
            second = await guess(server, phone, ["3333", "5555"])
            assert "wrong PIN" in second[0] and "mailbox 1001 is locked" in second[1]
            await server.wait_log(r"mailbox 1001 locked for 900 s after 5 wrong PINs")
            # Locked: even the right PIN is refused, and the caller is hung up.
            [third] = await guess(server, phone, [PIN])
            assert "mailbox 1001 is locked" in third
            assert not any("signed in" in line for line in server.log)

            failures = security_lines(server, "pin_failure")
            assert len(failures) == 5 and all("src=127.0.0.1 mailbox=1001" in line for line in failures)
            assert "trunk=" not in "".join(failures)
            assert await server.metric("pbx_security_events_total", event="pin_failure") == 5
            assert not security_lines(server, "ban")

            # 5 wrong SIP passwords alone ban no one (10 are needed within a
            # minute); with the 5 wrong PINs they ban the guesser's address.
            result = await run_sipp(SIPP / "register_wrong.xml", server.sip, local_ip="127.0.0.1", service="1001", calls=5)
            assert result.returncode == 0, result.report()
            await server.wait_log(r"event=security kind=ban src=127.0.0.1\b")
    finally:
        await server.stop()


async def test_wrong_pins_through_a_trunk_lock_the_mailbox_but_never_ban_the_carrier(tmp_path: Path) -> None:
    # Calls from 127.0.0.1 are the provider's: every customer of the carrier shares its address.
    server = await pin_server(tmp_path / "pbx", trunks={"carrier": {"host": "127.0.0.1:5999", "inbound_from": ["127.0.0.1/32"]}})
    try:
        async with await Phone.start(name="carrier") as phone:
            await phone.register(server.sip, "1002", PASSWORDS["1002"])  # the phone's calls then go through the server
            await guess(server, phone, ["0000", "1111", "2222"])
            second = await guess(server, phone, ["3333", "5555"])
            assert "mailbox 1001 is locked" in second[1]
            failures = security_lines(server, "pin_failure")
            assert len(failures) == 5 and all("src=127.0.0.1 trunk=carrier mailbox=1001" in line for line in failures)

            # 6 wrong passwords from the same address: 11 failures if the PINs counted.
            result = await run_sipp(SIPP / "register_wrong.xml", server.sip, local_ip="127.0.0.1", service="1001", calls=6)
            assert result.returncode == 0, result.report()
            assert len([line for line in security_lines(server, "auth_failure") if "src=127.0.0.1 " in line]) == 6
            assert not security_lines(server, "ban")
            # The carrier's calls still come in; the mailbox stays locked for them too.
            [locked] = await guess(server, phone, [PIN])
            assert "mailbox 1001 is locked" in locked
    finally:
        await server.stop()


async def test_a_mailbox_without_a_pin_opens_only_from_its_own_phone(tmp_path: Path) -> None:
    extensions: dict[str, Any] = {ext: {"name": f"User {ext}", "password": pw} for ext, pw in PASSWORDS.items()}
    extensions["1001"]["voicemail"] = {"pin": "${PBX_VM_PIN_1001:-}"}  # as shipped, with the PIN unset
    server = await start_server(
        tmp_path / "pbx",
        sounds={"dir": str(SOUNDS), "tts": None},
        extensions=extensions,
        inbound={MAIN: "voicemail:main"},
        log_level="INFO",
    )
    try:
        async with await Phone.start(name="p1001") as owner, await Phone.start(name="p1002") as other:
            await owner.register(server.sip, "1001", PASSWORDS["1001"])
            await other.register(server.sip, "1002", PASSWORDS["1002"])
            # The old shipped PIN and an empty one open nothing from outside.
            answers = await guess(server, other, ["1234", ""])
            assert all("wrong PIN or mailbox for '1001'" in line for line in answers)
            # *97 from the owner's own, digest-authenticated phone asks no PIN.
            mark = len(server.log)
            call = await dial(owner, "*97")
            await server.wait_log(r"voicemail: mailbox 1001 signed in", start=mark)
            await owner.hangup(call)
    finally:
        await server.stop()


def test_the_shipped_config_has_no_pin_until_the_admin_sets_one() -> None:
    env = {f"PBX_PASSWORD_{n}": f"random-password-{n}" for n in (1001, 1002, 1003)}
    mailbox = load_config(REPO / "pbx.yaml", env=env).mailbox("1001")
    assert mailbox is not None and mailbox.pin is None
    mailbox = load_config(REPO / "pbx.yaml", env={**env, "PBX_VM_PIN_1001": "086420"}).mailbox("1001")
    assert mailbox is not None and mailbox.pin == "086420"


def test_the_lock_counts_wrong_pins_in_a_row_and_lasts_fifteen_minutes() -> None:
    now = [1000.0]
    locks = PinLocks(clock=lambda: now[0])
    assert (PIN_LOCK_FAILURES, PIN_LOCK_SECONDS) == (5, 900)
    for _ in range(4):
        assert not locks.failed("1001")
    locks.succeeded("1001")  # an owner's typo now and then never adds up
    assert [locks.failed("1001") for _ in range(5)] == [False, False, False, False, True]
    assert locks.locked("1001") and not locks.locked("1002")
    assert not locks.failed("1001")  # guesses while locked do not extend it
    now[0] += 899
    assert locks.locked("1001")
    now[0] += 1
    assert not locks.locked("1001")
    assert not locks.failed("1001")  # a fresh count after the lock


async def test_a_message_file_and_its_folder_are_fsynced_before_its_row_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pbx.yaml"
    path.write_text(
        f"storage: {{data_dir: {tmp_path / 'data'}}}\nsounds: {{dir: {SOUNDS}, tts: null}}\nhttp: {{token: t}}\n"
        "extensions:\n  '1001': {name: A, password: secret-1001, voicemail: {pin: '4321'}}\n"
    )
    config, _, _ = load_setup(path)
    steps: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        steps.append(f"fsync {target.relative_to(tmp_path / 'data')}")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = Store(config.storage.db)
    await store.open()
    real_insert = store.insert

    async def insert(table: str, row: dict[str, Any]) -> None:
        steps.append(f"insert {table} {row['path']}")
        await real_insert(table, row)

    monkeypatch.setattr(store, "insert", insert)
    service = VoicemailService(config=lambda: config, store=store, events=EventBus(), clock=MediaClock(), guard=AddressGuard())
    try:
        await service._save("1001", "1002", np.full(16000, 1000, dtype=np.int16), "#")
    finally:
        await store.close()
    [wav] = (tmp_path / "data" / "voicemail" / "1001").glob("*.wav")
    assert steps == [
        "fsync .",  # data/ holds the new voicemail/ folder
        "fsync voicemail",  # which holds the new mailbox folder
        f"fsync voicemail/1001/.{wav.name}.part",  # the message's data, before the rename
        "fsync voicemail/1001",  # the rename
        f"insert voicemail voicemail/1001/{wav.name}",  # only then the row
    ]
