"""Message-waiting indication (RFC 3842): pjsua2 phones against `pbx serve`
learn their voicemail counts by registering (unsolicited NOTIFY) or by
subscribing; hand-built SUBSCRIBEs from a bare UDP socket check the refusals
and the subscription's lifetime; an in-process server checks that
``changed()`` reaches subscribers and registered phones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosipua import SipMessage, SipRequest, generate_tag, parse_auth

from pbx.config.load import load_config
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.sip.mwi import CONTENT_TYPE, MessageWaiting, summary_body
from pbx.sip.registrar import Registrar
from pbx.sip.stack import SipStack
from pbx.sip.subscriptions import EventRouter, granted_expires
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow
from pbx.store.db import Store
from tests.support.phone import Phone
from tests.support.raw_phone import DOMAIN, RawDialog, RawPhone
from tests.support.server import PASSWORDS, Server, base_config, free_port, start_server

# 1001 and 1002 have mailboxes, 1003 has none.
EXTENSIONS: dict[str, dict[str, Any]] = {
    "1001": {"name": "User 1001", "password": PASSWORDS["1001"], "voicemail": {}},
    "1002": {"name": "User 1002", "password": PASSWORDS["1002"], "voicemail": {}},
    "1003": {"name": "User 1003", "password": PASSWORDS["1003"]},
}


def summary(notify: SipRequest) -> dict[str, str]:
    """The body of a message-summary NOTIFY, by lower-case field name."""
    fields = {}
    for line in notify.text.splitlines():
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def to_tag(message: SipMessage) -> str | None:
    to = message.to_addr
    return to.tag if to is not None else None


# --- unit level ---


def test_the_summary_body_says_whether_new_messages_wait_and_counts_new_and_old() -> None:
    assert summary_body("sip:1001@pbx.local", 2, 1) == (
        "Messages-Waiting: yes\r\nMessage-Account: sip:1001@pbx.local\r\nVoice-Message: 2/1 (0/0)\r\n"
    )
    assert summary_body("sip:1002@pbx.local", 0, 4) == (
        "Messages-Waiting: no\r\nMessage-Account: sip:1002@pbx.local\r\nVoice-Message: 0/4 (0/0)\r\n"
    )


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        (None, 3600),
        ("0", 0),
        ("1", 60),
        ("59", 60),
        ("60", 60),
        ("600", 600),
        ("3600", 3600),
        ("86400", 3600),
        ("soon", 3600),
        (" 120 ", 120),
        ("9" * 5000, 3600),
    ],
)
def test_the_subscription_interval_is_clamped_into_one_minute_to_one_hour(asked: str | None, granted: int) -> None:
    assert granted_expires(asked) == granted


# --- end to end against `pbx serve` ---


async def mwi_server(folder: Path, messages: list[tuple[str, int]]) -> Server:
    """A server whose voicemail table holds one row per (mailbox, heard) in ``messages``."""
    store = Store(folder / "pbx.db")
    await store.open()
    for number, (mailbox, heard) in enumerate(messages):
        await store.insert(
            "voicemail",
            {
                "id": f"msg-{number}",
                "mailbox": mailbox,
                "caller": "1003",
                "received": "2024-05-01T10:00:00+00:00",
                "seconds": 4.0,
                "heard": heard,
                "path": f"voicemail/{mailbox}/msg-{number}.wav",
                "email": "",
            },
        )
    await store.close()
    return await start_server(folder, extensions=EXTENSIONS)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """1001 has two new messages and one old one; 1002 one old one."""
    server = await mwi_server(tmp_path / "pbx", [("1001", 0), ("1001", 0), ("1001", 1), ("1002", 1)])
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def raw(server: Server) -> AsyncIterator[RawPhone]:
    phone = await RawPhone.open(("127.0.0.1", server.sip_port), "1001")
    try:
        yield phone
    finally:
        phone.close()


async def test_registering_phones_are_told_how_many_messages_wait(server: Server) -> None:
    async with await Phone.start(name="p1001") as alice, await Phone.start(name="p1002") as bob:
        await alice.register(server.sip, "1001", PASSWORDS["1001"])
        await bob.register(server.sip, "1002", PASSWORDS["1002"])

        alice_mwi = await alice.wait_event("mwi")
        assert not alice_mwi["in_dialog"]
        assert alice_mwi["waiting"] is True
        assert (alice_mwi["new"], alice_mwi["old"]) == (2, 1)
        assert alice_mwi["account"] == "sip:1001@pbx.local"
        assert "Voice-Message: 2/1 (0/0)" in alice_mwi["body"]

        bob_mwi = await bob.wait_event("mwi")
        assert bob_mwi["waiting"] is False  # an old message is not waiting
        assert (bob_mwi["new"], bob_mwi["old"]) == (0, 1)
        assert bob_mwi["account"] == "sip:1002@pbx.local"


async def test_a_subscribing_phone_gets_the_counts_inside_its_subscription(server: Server) -> None:
    async with await Phone.start(name="p1001") as alice:
        await alice.register(server.sip, "1001", PASSWORDS["1001"], mwi=True)
        await server.wait_log(r"mwi: 1001 subscribed from 127\.0\.0\.1:\d+/udp for 3600 s")
        notify = await alice.wait_event("mwi", in_dialog=True)
        assert notify["subscription_state"].startswith("active;expires=")
        assert 3590 <= int(notify["subscription_state"].rpartition("=")[2]) <= 3600
        assert notify["waiting"] is True
        assert (notify["new"], notify["old"]) == (2, 1)
        mark = len(server.log)
    # Closing the phone ends its subscription.
    await server.wait_log(r"mwi: 1001 unsubscribed", start=mark)


async def test_a_subscription_is_accepted_notified_refreshed_and_ended(server: Server, raw: RawPhone) -> None:
    response, dialog = await raw.subscribe("1001", PASSWORDS["1001"], expires=30)
    assert response.status_code == 200
    assert dialog.to_tag
    assert response.headers.get_first("Expires") == "60"  # clamped up to the minimum
    assert response.headers.get_first("Contact") == f"<sip:127.0.0.1:{server.sip_port}>"

    notify = await raw.next_notify()
    assert notify.uri == raw.contact
    assert notify.call_id == dialog.call_id
    assert to_tag(notify) == dialog.from_tag
    from_addr = notify.from_addr
    assert from_addr is not None and from_addr.tag == dialog.to_tag
    assert notify.headers.get_first("Event") == "message-summary"
    assert notify.headers.get_first("Content-Type") == CONTENT_TYPE
    assert notify.headers.get_first("Subscription-State") in ("active;expires=60", "active;expires=59")
    assert summary(notify) == {
        "messages-waiting": "yes",
        "message-account": "sip:1001@pbx.local",
        "voice-message": "2/1 (0/0)",
    }

    response, _ = await raw.subscribe("1001", dialog=dialog, expires=99999)
    assert response.status_code == 200
    assert response.headers.get_first("Expires") == "3600"  # clamped down to the maximum
    notify = await raw.next_notify()
    assert notify.headers.get_first("Subscription-State") in ("active;expires=3600", "active;expires=3599")

    response, _ = await raw.subscribe("1001", dialog=dialog, expires=0)
    assert response.status_code == 200
    assert response.headers.get_first("Expires") == "0"
    notify = await raw.next_notify()
    assert notify.headers.get_first("Subscription-State") == "terminated;reason=timeout"
    assert summary(notify)["voice-message"] == "2/1 (0/0)"

    response, _ = await raw.subscribe("1001", dialog=dialog)
    assert response.status_code == 481


async def test_a_subscriber_that_answers_notify_with_481_loses_its_subscription(server: Server, raw: RawPhone) -> None:
    raw.notify_status = 481
    response, dialog = await raw.subscribe("1001", PASSWORDS["1001"])
    assert response.status_code == 200
    await raw.next_notify()
    await server.wait_log(r"mwi: 1001's subscriber answered NOTIFY with 481; subscription ended")
    response, _ = await raw.subscribe("1001", dialog=dialog)
    assert response.status_code == 481


async def test_subscribe_without_credentials_is_challenged(server: Server, raw: RawPhone) -> None:
    response, _ = await raw.subscribe("1001")
    assert response.status_code == 401
    challenges = [parse_auth(v) for v in response.headers.get("WWW-Authenticate")]
    assert {c.params.get("algorithm") for c in challenges} == {"SHA-256", "MD5"}
    assert all(c.params.get("realm") == DOMAIN for c in challenges)


async def test_subscribe_with_a_wrong_password_is_refused_and_counted(server: Server, raw: RawPhone) -> None:
    before = await server.metric("pbx_auth_failures_total")
    response, _ = await raw.subscribe("1001", "not-the-password")
    assert response.status_code == 403
    assert await server.metric("pbx_auth_failures_total") == before + 1


@pytest.mark.parametrize(
    ("mailbox", "options", "status"),
    [
        ("1002", {}, 403),  # someone else's mailbox
        ("1003", {}, 404),  # an extension without a mailbox
        ("4711", {}, 404),  # no such extension
        ("1001", {"event": "presence"}, 489),
        ("1001", {"accept": "application/pidf+xml"}, 406),
        ("1001", {"accept": "application/simple-message-summary;q=0, text/plain"}, 406),
    ],
)
async def test_subscribe_refusals(server: Server, raw: RawPhone, mailbox: str, options: dict[str, Any], status: int) -> None:
    response, _ = await raw.subscribe(mailbox, PASSWORDS["1001"], **options)
    assert response.status_code == status
    if status == 489:
        assert response.headers.get_first("Allow-Events") == "message-summary, dialog"


async def test_subscribe_accepts_wildcards_and_a_missing_accept(server: Server, raw: RawPhone) -> None:
    for accept in (None, "*/*", "application/*", "application/sdp, application/simple-message-summary"):
        response, _ = await raw.subscribe("1001", PASSWORDS["1001"], accept=accept, expires=0)
        assert response.status_code == 200, accept
        notify = await raw.next_notify()  # a fetch: one final NOTIFY
        assert notify.headers.get_first("Subscription-State") == "terminated;reason=timeout"


async def test_subscribe_inside_an_unknown_dialog_is_481(server: Server, raw: RawPhone) -> None:
    dialog = RawDialog("1001", "no-such-call@127.0.0.1", generate_tag(), to_tag="no-such-tag")
    response, _ = await raw.subscribe("1001", dialog=dialog)
    assert response.status_code == 481


# --- changed(), in process ---


@dataclass
class InProcess:
    """A SIP stack, registrar and message-waiting service on loopback, wired like app.py."""

    store: Store
    stack: SipStack
    registrar: Registrar
    mwi: MessageWaiting

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.stack.local_port(self.stack.transport("udp")))


@pytest.fixture
async def in_process(tmp_path: Path) -> AsyncIterator[InProcess]:
    cfg = base_config(free_port(), free_port(), tmp_path)
    cfg["extensions"] = EXTENSIONS
    (tmp_path / "pbx.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "pbx.yaml")
    events = EventBus()
    store = Store(tmp_path / "pbx.db")
    await store.open()
    stack = SipStack(events=events, advertised_host="127.0.0.1", user_agent="pbx-test")
    auth = DigestAuthenticator(DOMAIN)
    guard = AddressGuard()

    def password(ext: str) -> str | None:
        extension = config.extensions.get(ext)
        return extension.password if extension else None

    registrar = Registrar(password, store, auth, guard, events)
    mwi = MessageWaiting(
        config=lambda: config, stack=stack, registrar=registrar, authenticator=auth, guard=guard, store=store, events=events
    )
    registrar.on_bound = mwi.registered
    router = EventRouter(mwi.subscriptions)
    tasks: set[asyncio.Task[None]] = set()

    async def register(request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        txn.respond(await registrar.handle_register(request, flow.addr, flow.name))

    def on_request(request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        if request.method == "REGISTER":
            task = asyncio.get_running_loop().create_task(register(request, flow, txn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif request.method == "SUBSCRIBE":
            router.handle_subscribe(request, flow, txn)
        else:
            txn.reply(501)

    stack.on_request = on_request
    await stack.listen("udp", "127.0.0.1", 0)
    try:
        yield InProcess(store, stack, registrar, mwi)
    finally:
        await mwi.stop()
        await stack.close()
        await store.close()


async def add_message(store: Store, mailbox: str, heard: int = 0) -> None:
    rows = await store.rows("voicemail")
    await store.insert(
        "voicemail",
        {
            "id": f"m{len(rows)}",
            "mailbox": mailbox,
            "caller": "1003",
            "received": "",
            "seconds": 3.0,
            "heard": heard,
            "path": "",
            "email": "",
        },
    )


async def test_changed_notifies_subscribers_in_dialog_and_other_registered_phones_unsolicited(
    in_process: InProcess,
) -> None:
    desk = await RawPhone.open(in_process.addr, "1001")  # registers, never subscribes
    soft = await RawPhone.open(in_process.addr, "1001")  # registers and subscribes
    other = await RawPhone.open(in_process.addr, "1002")  # another mailbox
    try:
        assert (await desk.register(PASSWORDS["1001"])).status_code == 200
        first = await desk.next_notify()
        assert to_tag(first) is None  # out of dialog
        assert summary(first)["voice-message"] == "0/0 (0/0)"
        assert summary(first)["messages-waiting"] == "no"

        assert (await soft.register(PASSWORDS["1001"])).status_code == 200
        await soft.next_notify()  # the unsolicited one for registering
        response, dialog = await soft.subscribe("1001", PASSWORDS["1001"])
        assert response.status_code == 200
        assert summary(await soft.next_notify())["voice-message"] == "0/0 (0/0)"

        assert (await other.register(PASSWORDS["1002"])).status_code == 200
        await other.next_notify()

        await add_message(in_process.store, "1001")
        await add_message(in_process.store, "1001", heard=1)
        in_process.mwi.changed("1001")

        unsolicited = await desk.next_notify()
        assert to_tag(unsolicited) is None
        assert unsolicited.uri == desk.contact
        assert unsolicited.headers.get_first("Event") == "message-summary"
        assert summary(unsolicited) == {
            "messages-waiting": "yes",
            "message-account": "sip:1001@pbx.local",
            "voice-message": "1/1 (0/0)",
        }

        in_dialog = await soft.next_notify()
        assert in_dialog.call_id == dialog.call_id
        assert to_tag(in_dialog) == dialog.from_tag
        assert (in_dialog.headers.get_first("Subscription-State") or "").startswith("active;expires=")
        assert summary(in_dialog)["voice-message"] == "1/1 (0/0)"

        # Each NOTIFY is answered before its task ends: once they all have,
        # nothing else was sent — no unsolicited NOTIFY to the subscriber,
        # none to another mailbox's phone.
        await asyncio.wait_for(asyncio.gather(*in_process.mwi.subscriptions.tasks), 5)
        assert soft.notifies.empty()
        assert other.notifies.empty()
        assert await in_process.mwi.counts("1001") == (1, 1)
        assert await in_process.mwi.counts("1002") == (0, 0)
    finally:
        for phone in (desk, soft, other):
            phone.close()
