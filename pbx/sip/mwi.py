"""Message-waiting indication: the ``message-summary`` event package (RFC 3842)
over SIP-specific event notification (RFC 6665).

A phone learns how many voicemail messages wait in its mailbox in two ways.
It may SUBSCRIBE to its own mailbox: the subscription is a dialog of its own,
and every change is a NOTIFY inside it. Phones that never subscribe get what
Asterisk sends them: an unsolicited, out-of-dialog NOTIFY to each registered
contact whenever the mailbox changes and whenever the phone registers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosipua import (
    Dialog,
    SipRequest,
    SipResponse,
    create_dialog_from_request,
    stringify_uri,
)

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator, authenticate_request
from pbx.sip.messages import uri_user
from pbx.sip.registrar import Binding, Registrar
from pbx.sip.stack import SipStack
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow
from pbx.store.db import Store
from pbx.tasks import Background

logger = logging.getLogger(__name__)

EVENT = "message-summary"
CONTENT_TYPE = "application/simple-message-summary"
MIN_EXPIRES = 60
MAX_EXPIRES = 3600
DEFAULT_EXPIRES = 3600


def summary_body(account: str, new: int, old: int) -> str:
    """An ``application/simple-message-summary`` body (RFC 3842 §5.2) for
    ``account`` with ``new`` unheard and ``old`` heard voice messages."""
    return (
        f"Messages-Waiting: {'yes' if new else 'no'}\r\n"
        f"Message-Account: {account}\r\n"
        f"Voice-Message: {new}/{old} (0/0)\r\n"
    )


def granted_expires(value: str | None) -> int:
    """The seconds a subscription is granted for a SUBSCRIBE's Expires value:
    0 stays 0 (unsubscribe, or a one-time fetch), anything else is clamped
    into MIN_EXPIRES..MAX_EXPIRES; absent or malformed means DEFAULT_EXPIRES."""
    if value is None:
        return DEFAULT_EXPIRES
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return DEFAULT_EXPIRES
    # Python refuses int() of over 4,300 digits; anything past ten is past the clamp anyway.
    seconds = int(value) if len(value) <= 10 else MAX_EXPIRES
    return 0 if seconds == 0 else max(MIN_EXPIRES, min(seconds, MAX_EXPIRES))


@dataclass(eq=False)
class Subscription:
    """One phone's subscription to one mailbox: a dialog we are the notifier in."""

    mailbox: str
    dialog: Dialog
    flow: Flow
    expires_at: float = 0.0  # event-loop time
    active: bool = True
    timer: asyncio.TimerHandle | None = None
    # NOTIFYs of one dialog go out one at a time, each after the previous
    # one's answer (RFC 6665 §4.2.2), so they also arrive in order.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dialog.call_id, self.dialog.local_tag)


class MessageWaiting:
    """Answers SUBSCRIBE requests for ``message-summary`` and notifies phones
    of their mailboxes' message counts.

    Events: ``auth_failure(ip, extension)`` after every SUBSCRIBE refused for
    bad credentials.
    """

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        stack: SipStack,
        registrar: Registrar,
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        store: Store,
        events: EventBus,
    ) -> None:
        self._config = config
        self._stack = stack
        self._registrar = registrar
        self._auth = authenticator
        self._guard = guard
        self._store = store
        self._events = events
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._tasks = Background("mwi")

    # --- entry points ---

    def handle_subscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        """Answer any SUBSCRIBE: a new subscription, or a refresh or an
        unsubscribe (Expires: 0) inside one of our subscription dialogs."""
        event = _event_package(request)
        if event != EVENT:
            logger.info("SUBSCRIBE from %s:%d for event %r: 489", *flow.addr, event)
            txn.reply(489, "Bad Event", headers={"Allow-Events": EVENT})
            return
        to = request.to_addr
        if to is not None and to.tag:
            self._resubscribe(request, flow, txn, to.tag)
        else:
            self._subscribe(request, flow, txn)

    def changed(self, mailbox: str) -> None:
        """``mailbox``'s messages changed: NOTIFY every subscription to it and,
        unsolicited, every registered contact of its extension that has no
        subscription. Returns at once; the NOTIFYs go out in the background."""
        if self._config().mailbox(mailbox) is None:
            logger.debug("mwi: %s is not a mailbox; nobody to notify", mailbox)
            return
        subscriptions = [s for s in self._subscriptions.values() if s.mailbox == mailbox]
        for subscription in subscriptions:
            self._tasks.spawn(self._notify(subscription))
        for binding in self._registrar.contacts(mailbox):
            if not self._subscribed(mailbox, binding):
                self._tasks.spawn(self._notify_contact(mailbox, binding))

    def registered(self, binding: Binding) -> None:
        """A REGISTER added or refreshed ``binding``: tell the contact about its
        mailbox unless it has subscribed (the registrar calls this)."""
        if self._config().mailbox(binding.extension) is not None and not self._subscribed(binding.extension, binding):
            self._tasks.spawn(self._notify_contact(binding.extension, binding))

    async def counts(self, mailbox: str) -> tuple[int, int]:
        """(new, old) voice messages in ``mailbox``."""

        def query() -> list[tuple[int | None, int]]:
            sql = "select heard, count(*) from voicemail where mailbox = ? group by heard"
            return list(self._store.db.execute(sql, [mailbox]).fetchall())

        rows: list[tuple[int | None, int]] = await self._store.run(query)
        new = sum(count for heard, count in rows if heard == 0)
        return new, sum(count for _, count in rows) - new

    async def stop(self) -> None:
        """Forget every subscription and abandon the NOTIFYs under way. The
        phones find out at their next refresh (481) and subscribe again."""
        for subscription in list(self._subscriptions.values()):
            self._end(subscription)
        await self._tasks.close()

    # --- SUBSCRIBE ---

    def _subscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        ip = flow.addr[0]
        if not _accepts_summary(request.headers.get("accept")):
            txn.reply(406, headers={"Accept": CONTENT_TYPE})
            return
        to = request.to_addr
        # RFC 3842 §3: the Request-URI names the account; phones that send
        # SUBSCRIBE to the server's address still name it in To.
        mailbox = uri_user(request.uri) or (to.uri.user if to is not None else None)
        if not mailbox:
            txn.reply(400, "Missing mailbox in Request-URI")
            return
        if not request.contact:
            txn.reply(400, "Missing Contact")
            return
        username = authenticate_request(
            request,
            ip,
            txn,
            authenticator=self._auth,
            guard=self._guard,
            events=self._events,
            passwords=self._registrar.passwords,
        )
        if username is None:
            return
        if self._config().mailbox(mailbox) is None:
            logger.info("mwi: %s subscribed to %s, which is not a mailbox: 404", username, mailbox)
            txn.reply(404)
            return
        if username != mailbox:
            logger.info("mwi: %s may not subscribe to mailbox %s: 403", username, mailbox)
            txn.reply(403)
            return

        expires = granted_expires(request.headers.get_first("expires"))
        dialog = create_dialog_from_request(request)
        dialog.confirm()
        subscription = Subscription(mailbox, dialog, flow)
        txn.to_tag = dialog.local_tag
        self._accept(txn, flow, expires)
        if expires == 0:
            # A fetch (RFC 6665 §4.4.3): one NOTIFY with the state, no subscription.
            logger.info("mwi: %s fetched its mailbox state from %s:%d", mailbox, *flow.addr)
            subscription.active = False
            self._tasks.spawn(self._notify(subscription, final=True))
            return
        self._subscriptions[subscription.key] = subscription
        self._arm(subscription, expires)
        logger.info("mwi: %s subscribed from %s:%d/%s for %d s", mailbox, *flow.addr, flow.name, expires)
        self._tasks.spawn(self._notify(subscription))

    def _resubscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction, to_tag: str) -> None:
        """A SUBSCRIBE inside a subscription dialog: refresh, or end it with Expires: 0."""
        subscription = self._subscriptions.get((request.call_id or "", to_tag))
        from_addr = request.from_addr
        if subscription is None or (from_addr.tag if from_addr else None) != subscription.dialog.remote_tag:
            txn.reply(481)
            return
        cseq = request.cseq
        if cseq is not None:
            if cseq.seq <= subscription.dialog.remote_cseq:
                txn.reply(500, "CSeq out of order")
                return
            subscription.dialog.remote_cseq = cseq.seq
        if request.contact:
            subscription.dialog.remote_target = stringify_uri(request.contact[0].uri)
        subscription.flow = flow  # the phone may have moved behind its NAT
        expires = granted_expires(request.headers.get_first("expires"))
        self._accept(txn, flow, expires)
        if expires == 0:
            logger.info("mwi: %s unsubscribed from %s:%d", subscription.mailbox, *flow.addr)
            self._end(subscription)
            self._tasks.spawn(self._notify(subscription, final=True))
            return
        self._arm(subscription, expires)
        logger.debug("mwi: %s refreshed its subscription for %d s", subscription.mailbox, expires)
        self._tasks.spawn(self._notify(subscription))

    def _accept(self, txn: ServerTransaction, flow: Flow, expires: int) -> None:
        txn.reply(
            200,
            headers={
                "Expires": str(expires),
                "Contact": f"<{self._stack.contact_uri(flow)}>",
                "Allow-Events": EVENT,
            },
        )

    # --- subscription lifetime ---

    def _arm(self, subscription: Subscription, expires: int) -> None:
        loop = asyncio.get_running_loop()
        if subscription.timer is not None:
            subscription.timer.cancel()
        subscription.expires_at = loop.time() + expires
        subscription.timer = loop.call_later(expires, self._expired, subscription)

    def _expired(self, subscription: Subscription) -> None:
        if not subscription.active:
            return
        logger.info("mwi: subscription of %s from %s:%d expired", subscription.mailbox, *subscription.flow.addr)
        self._end(subscription)
        self._tasks.spawn(self._notify(subscription, final=True))

    def _end(self, subscription: Subscription) -> None:
        subscription.active = False
        if subscription.timer is not None:
            subscription.timer.cancel()
            subscription.timer = None
        self._subscriptions.pop(subscription.key, None)

    def _subscribed(self, mailbox: str, binding: Binding) -> bool:
        """Whether the phone behind ``binding`` has an active subscription to ``mailbox``."""
        return any(
            s.mailbox == mailbox
            and (
                s.dialog.remote_target == binding.contact
                or (s.flow.addr == binding.source and s.flow.name == binding.transport)
            )
            for s in self._subscriptions.values()
        )

    def _account(self, mailbox: str) -> str:
        return f"sip:{mailbox}@{self._config().sip.domain}"

    # --- NOTIFY ---

    async def _notify(self, subscription: Subscription, *, final: bool = False) -> None:
        """NOTIFY the subscriber of the mailbox's counts; ``final`` ends the
        subscription (``terminated;reason=timeout``)."""
        async with subscription.lock:
            if not final and not subscription.active:
                return  # ended while this NOTIFY waited its turn
            new, old = await self.counts(subscription.mailbox)
            flow = subscription.flow
            request = subscription.dialog.create_request(
                "NOTIFY",
                via_host=self._stack.advertised_host,
                via_port=self._stack.local_port(flow.transport),
                via_transport=flow.name.upper(),
            )
            if final:
                state = "terminated;reason=timeout"
            else:
                remaining = max(0, math.ceil(subscription.expires_at - asyncio.get_running_loop().time()))
                state = f"active;expires={remaining}"
            request.headers.set_single("Subscription-State", state)
            self._stamp(request, flow, subscription.mailbox, new, old)
            response = await self._send(request, flow)
        status = response.status_code
        if status == 481 and subscription.active:
            logger.info("mwi: %s's subscriber answered NOTIFY with 481; subscription ended", subscription.mailbox)
            self._end(subscription)
        elif status >= 300:
            logger.debug("mwi: NOTIFY for %s answered %d %s", subscription.mailbox, status, response.reason_phrase)
        else:
            logger.debug("mwi: notified %s's subscriber: %d new, %d old (%s)", subscription.mailbox, new, old, state)

    async def _notify_contact(self, mailbox: str, binding: Binding) -> None:
        """An unsolicited, out-of-dialog NOTIFY to a registered contact."""
        try:
            flow = Flow(self._stack.transport(binding.transport), binding.source)
        except LookupError:
            return
        new, old = await self.counts(mailbox)
        if self._subscribed(mailbox, binding):
            return  # it subscribed while we read the counts
        request = self._stack.out_of_dialog("NOTIFY", binding.contact, self._account(mailbox), flow, self._config().sip.domain)
        self._stamp(request, flow, mailbox, new, old)
        response = await self._send(request, flow)
        if response.status_code >= 300:
            logger.debug(
                "mwi: unsolicited NOTIFY for %s to %s answered %d %s",
                mailbox,
                binding.contact,
                response.status_code,
                response.reason_phrase,
            )
        else:
            logger.debug("mwi: notified %s at %s: %d new, %d old", mailbox, binding.contact, new, old)

    def _stamp(self, request: SipRequest, flow: Flow, mailbox: str, new: int, old: int) -> None:
        request.headers.set_single("Event", EVENT)
        request.headers.set_single("Contact", f"<{self._stack.contact_uri(flow)}>")
        request.headers.set_single("User-Agent", self._stack.user_agent)
        request.headers.set_single("Content-Type", CONTENT_TYPE)
        request.text = summary_body(self._account(mailbox), new, old)

    async def _send(self, request: SipRequest, flow: Flow) -> SipResponse:
        """Send ``request`` in a new client transaction; its final response (408 on timeout)."""
        done: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()

        def on_response(response: SipResponse) -> None:
            if response.status_code >= 200 and not done.done():
                done.set_result(response)

        self._stack.request(request, flow, on_response)
        return await done


def _event_package(request: SipRequest) -> str | None:
    """The event package a SUBSCRIBE names, without parameters (``o`` is Event's compact form)."""
    value = request.headers.get_first("event") or request.headers.get_first("o")
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower()


def _accepts_summary(values: list[str]) -> bool:
    """Whether Accept headers admit application/simple-message-summary; with
    none the package's default type is implied (RFC 3842 §4)."""
    if not values:
        return True
    for value in values:
        for item in value.split(","):
            media, *params = (part.strip().lower() for part in item.split(";"))
            if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
                continue
            if media in (CONTENT_TYPE, "application/*", "*/*"):
                return True
    return False
