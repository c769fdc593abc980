"""SIP-specific event notification (RFC 6665), the notifier's side: what every
event package the server serves shares.

A SUBSCRIBE names its package in Event; :class:`EventRouter` hands it to that
package's :class:`Subscriptions`, or answers 489. The package says what a
subscription may watch and what each NOTIFY's body is (:class:`EventPackage`:
message waiting in pbx.sip.mwi, busy lamps in pbx.sip.blf). The rest is the
same for every package and lives here: the subscriber's digest
authentication, the Expires interval granted, refreshes and unsubscribes
inside the subscription dialog, expiry, NOTIFYs sent one at a time, and the
final NOTIFY (``terminated``) when a subscription ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiosipua import (
    Dialog,
    SipRequest,
    SipResponse,
    create_dialog_from_request,
    stringify_uri,
)

from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator, authenticate_request
from pbx.sip.messages import uri_user
from pbx.sip.stack import SipStack
from pbx.sip.transactions import ServerTransaction
from pbx.sip.transport import Flow
from pbx.tasks import Background

logger = logging.getLogger(__name__)

MIN_EXPIRES = 60
MAX_EXPIRES = 3600
DEFAULT_EXPIRES = 3600


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


def event_package(request: SipRequest) -> str | None:
    """The event package a request names, without parameters (``o`` is Event's compact form)."""
    value = request.headers.get_first("event") or request.headers.get_first("o")
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower()


def accepts(values: list[str], content_type: str) -> bool:
    """Whether Accept headers admit ``content_type``; with none the
    package's default type, which is the one we send, is implied."""
    if not values:
        return True
    wildcard = content_type.split("/", 1)[0] + "/*"
    for value in values:
        for item in value.split(","):
            media, *params = (part.strip().lower() for part in item.split(";"))
            if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
                continue
            if media in (content_type, wildcard, "*/*"):
                return True
    return False


@dataclass(eq=False)
class Subscription:
    """One subscriber's subscription to one resource (a mailbox, an
    extension): a dialog we are the notifier in."""

    resource: str
    subscriber: str  # the extension that subscribed
    dialog: Dialog
    flow: Flow
    expires_at: float = 0.0  # event-loop time
    active: bool = True
    timer: asyncio.TimerHandle | None = None
    notified: int = 0  # NOTIFYs sent in it so far: dialog-info numbers its bodies with this
    # NOTIFYs of one dialog go out one at a time, each after the previous
    # one's answer (RFC 6665 §4.2.2), so they also arrive in order.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dialog.call_id, self.dialog.local_tag)


class EventPackage(Protocol):
    """What one event package adds to the subscription lifecycle."""

    @property
    def event(self) -> str:
        """The package's name in Event headers."""
        ...

    @property
    def content_type(self) -> str:
        """The type of its NOTIFY bodies; a SUBSCRIBE whose Accept refuses it gets 406."""
        ...

    def refusal(self, subscriber: str, resource: str) -> int | None:
        """The status that refuses the authenticated extension ``subscriber``
        a subscription to ``resource`` (404, 403), or None to accept it."""
        ...

    async def body(self, subscription: Subscription) -> str:
        """The NOTIFY body: the state of the subscription's resource now."""
        ...


class Subscriptions:
    """The subscriptions to one event package, and the NOTIFYs sent in them.
    ``name`` starts their log lines (``mwi: 1001 subscribed ...``).

    Events: ``auth_failure(ip, extension)`` after every SUBSCRIBE refused for
    bad credentials.
    """

    def __init__(
        self,
        package: EventPackage,
        *,
        name: str,
        stack: SipStack,
        passwords: Callable[[str], str | None],
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        events: EventBus,
    ) -> None:
        self.package = package
        self.name = name
        self.allow_events = package.event  # every package the server serves, once an EventRouter has them
        self.tasks = Background(name)  # the NOTIFYs under way
        self._stack = stack
        self._passwords = passwords
        self._auth = authenticator
        self._guard = guard
        self._events = events
        self._subscriptions: dict[tuple[str, str], Subscription] = {}

    # --- entry points ---

    def handle_subscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        """Answer a SUBSCRIBE for this package: a new subscription, or a refresh
        or an unsubscribe (Expires: 0) inside one of our subscription dialogs."""
        to = request.to_addr
        if to is not None and to.tag:
            self._resubscribe(request, flow, txn, to.tag)
        else:
            self._subscribe(request, flow, txn)

    def of(self, resource: str) -> list[Subscription]:
        """The active subscriptions to ``resource``."""
        return [s for s in self._subscriptions.values() if s.resource == resource]

    def notify(self, resource: str) -> None:
        """``resource`` changed: NOTIFY each of its subscribers in the background."""
        for subscription in self.of(resource):
            self.tasks.spawn(self._notify(subscription))

    def stamp(self, request: SipRequest, flow: Flow, body: str) -> None:
        """Give a NOTIFY of this package its headers and ``body``."""
        request.headers.set_single("Event", self.package.event)
        request.headers.set_single("Contact", f"<{self._stack.contact_uri(flow)}>")
        request.headers.set_single("User-Agent", self._stack.user_agent)
        request.headers.set_single("Content-Type", self.package.content_type)
        request.text = body

    async def send(self, request: SipRequest, flow: Flow) -> SipResponse:
        """Send ``request`` in a new client transaction; its final response (408 on timeout)."""
        done: asyncio.Future[SipResponse] = asyncio.get_running_loop().create_future()

        def on_response(response: SipResponse) -> None:
            if response.status_code >= 200 and not done.done():
                done.set_result(response)

        self._stack.request(request, flow, on_response)
        return await done

    async def stop(self) -> None:
        """Forget every subscription and abandon the NOTIFYs under way. The
        phones find out at their next refresh (481) and subscribe again."""
        for subscription in list(self._subscriptions.values()):
            self._end(subscription)
        await self.tasks.close()

    # --- SUBSCRIBE ---

    def _subscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        ip = flow.addr[0]
        if not accepts(request.headers.get("accept"), self.package.content_type):
            txn.reply(406, headers={"Accept": self.package.content_type})
            return
        to = request.to_addr
        # The Request-URI names the resource; phones that send SUBSCRIBE to
        # the server's address still name it in To.
        resource = uri_user(request.uri) or (to.uri.user if to is not None else None)
        if not resource:
            txn.reply(400, "Missing resource in Request-URI")
            return
        if not request.contact:
            txn.reply(400, "Missing Contact")
            return
        username = authenticate_request(
            request, ip, txn, authenticator=self._auth, guard=self._guard, events=self._events, passwords=self._passwords
        )
        if username is None:
            return
        refusal = self.package.refusal(username, resource)
        if refusal is not None:
            logger.info("%s: %s may not subscribe to %s: %d", self.name, username, resource, refusal)
            txn.reply(refusal)
            return

        expires = granted_expires(request.headers.get_first("expires"))
        dialog = create_dialog_from_request(request)
        dialog.confirm()
        subscription = Subscription(resource, username, dialog, flow)
        txn.to_tag = dialog.local_tag
        self._accept(txn, flow, expires)
        if expires == 0:
            # A fetch (RFC 6665 §4.4.3): one NOTIFY with the state, no subscription.
            logger.info("%s: %s fetched the state of %s from %s:%d", self.name, username, resource, *flow.addr)
            subscription.active = False
            self.tasks.spawn(self._notify(subscription, final=True))
            return
        self._subscriptions[subscription.key] = subscription
        self._arm(subscription, expires)
        watched = "" if username == resource else f" to {resource}"
        logger.info("%s: %s subscribed%s from %s:%d/%s for %d s", self.name, username, watched, *flow.addr, flow.name, expires)
        self.tasks.spawn(self._notify(subscription))

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
            logger.info("%s: %s unsubscribed from %s:%d", self.name, subscription.resource, *flow.addr)
            self._end(subscription)
            self.tasks.spawn(self._notify(subscription, final=True))
            return
        self._arm(subscription, expires)
        logger.debug("%s: %s refreshed its subscription for %d s", self.name, subscription.resource, expires)
        self.tasks.spawn(self._notify(subscription))

    def _accept(self, txn: ServerTransaction, flow: Flow, expires: int) -> None:
        txn.reply(
            200,
            headers={
                "Expires": str(expires),
                "Contact": f"<{self._stack.contact_uri(flow)}>",
                "Allow-Events": self.allow_events,
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
        logger.info("%s: subscription to %s from %s:%d expired", self.name, subscription.resource, *subscription.flow.addr)
        self._end(subscription)
        self.tasks.spawn(self._notify(subscription, final=True))

    def _end(self, subscription: Subscription) -> None:
        subscription.active = False
        if subscription.timer is not None:
            subscription.timer.cancel()
            subscription.timer = None
        self._subscriptions.pop(subscription.key, None)

    # --- NOTIFY ---

    async def _notify(self, subscription: Subscription, *, final: bool = False) -> None:
        """NOTIFY the subscriber of the resource's state; ``final`` ends the
        subscription (``terminated;reason=timeout``)."""
        async with subscription.lock:
            if not final and not subscription.active:
                return  # ended while this NOTIFY waited its turn
            body = await self.package.body(subscription)
            subscription.notified += 1
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
            self.stamp(request, flow, body)
            response = await self.send(request, flow)
        status = response.status_code
        if status == 481 and subscription.active:
            logger.info("%s: %s's subscriber answered NOTIFY with 481; subscription ended", self.name, subscription.resource)
            self._end(subscription)
        elif status >= 300:
            logger.debug("%s: NOTIFY for %s answered %d %s", self.name, subscription.resource, status, response.reason_phrase)
        else:
            logger.debug("%s: notified %s's subscriber (%s)", self.name, subscription.resource, state)


class EventRouter:
    """Hands each SUBSCRIBE to the subscriptions of the event package it
    names; any other package gets 489 Bad Event (RFC 6665 §4.2.1.1)."""

    def __init__(self, *packages: Subscriptions) -> None:
        self._packages = {subscriptions.package.event: subscriptions for subscriptions in packages}
        self.allow_events = ", ".join(self._packages)
        for subscriptions in packages:
            subscriptions.allow_events = self.allow_events

    def handle_subscribe(self, request: SipRequest, flow: Flow, txn: ServerTransaction) -> None:
        event = event_package(request)
        subscriptions = self._packages.get(event or "")
        if subscriptions is None:
            logger.info("SUBSCRIBE from %s:%d for event %r: 489", *flow.addr, event)
            txn.reply(489, "Bad Event", headers={"Allow-Events": self.allow_events})
            return
        subscriptions.handle_subscribe(request, flow, txn)
