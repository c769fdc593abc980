"""Message-waiting indication: the ``message-summary`` event package (RFC 3842)
over SIP-specific event notification (RFC 6665).

A phone learns how many voicemail messages wait in its mailbox in two ways.
It may SUBSCRIBE to its own mailbox: the subscription is a dialog of its own,
and every change is a NOTIFY inside it. Phones that never subscribe get what
Asterisk sends them: an unsolicited, out-of-dialog NOTIFY to each registered
contact whenever the mailbox changes and whenever the phone registers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.sip.registrar import Binding, Registrar
from pbx.sip.stack import SipStack
from pbx.sip.subscriptions import Subscription, Subscriptions
from pbx.sip.transport import Flow
from pbx.store.db import Store

logger = logging.getLogger(__name__)

EVENT = "message-summary"
CONTENT_TYPE = "application/simple-message-summary"


def summary_body(account: str, new: int, old: int) -> str:
    """An ``application/simple-message-summary`` body (RFC 3842 §5.2) for
    ``account`` with ``new`` unheard and ``old`` heard voice messages."""
    return (
        f"Messages-Waiting: {'yes' if new else 'no'}\r\n"
        f"Message-Account: {account}\r\n"
        f"Voice-Message: {new}/{old} (0/0)\r\n"
    )


class MessageWaiting:
    """The ``message-summary`` package: phones SUBSCRIBE to their own mailbox
    (``subscriptions``, routed by app.py) and hear of its message counts.

    Events: ``auth_failure(ip, extension)`` after every SUBSCRIBE refused for
    bad credentials.
    """

    event = EVENT
    content_type = CONTENT_TYPE

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
        self._store = store
        self.subscriptions = Subscriptions(
            self,
            name="mwi",
            stack=stack,
            passwords=registrar.passwords,
            authenticator=authenticator,
            guard=guard,
            events=events,
        )

    # --- entry points ---

    def changed(self, mailbox: str) -> None:
        """``mailbox``'s messages changed: NOTIFY every subscription to it and,
        unsolicited, every registered contact of its extension that has no
        subscription. Returns at once; the NOTIFYs go out in the background."""
        if self._config().mailbox(mailbox) is None:
            logger.debug("mwi: %s is not a mailbox; nobody to notify", mailbox)
            return
        self.subscriptions.notify(mailbox)
        for binding in self._registrar.contacts(mailbox):
            if not self._subscribed(mailbox, binding):
                self.subscriptions.tasks.spawn(self._notify_contact(mailbox, binding))

    def registered(self, binding: Binding) -> None:
        """A REGISTER added or refreshed ``binding``: tell the contact about its
        mailbox unless it has subscribed (the registrar calls this)."""
        if self._config().mailbox(binding.extension) is not None and not self._subscribed(binding.extension, binding):
            self.subscriptions.tasks.spawn(self._notify_contact(binding.extension, binding))

    async def counts(self, mailbox: str) -> tuple[int, int]:
        """(new, old) voice messages in ``mailbox``."""

        def query() -> list[tuple[int | None, int]]:
            sql = "select heard, count(*) from voicemail where mailbox = ? group by heard"
            return list(self._store.db.execute(sql, [mailbox]).fetchall())

        rows: list[tuple[int | None, int]] = await self._store.run(query)
        new = sum(count for heard, count in rows if heard == 0)
        return new, sum(count for _, count in rows) - new

    async def stop(self) -> None:
        """Forget every subscription and abandon the NOTIFYs under way."""
        await self.subscriptions.stop()

    # --- the package (pbx.sip.subscriptions.EventPackage) ---

    def refusal(self, subscriber: str, mailbox: str) -> int | None:
        """A phone may watch only its own extension's mailbox (RFC 3842 §3)."""
        if self._config().mailbox(mailbox) is None:
            return 404
        return None if subscriber == mailbox else 403

    async def body(self, subscription: Subscription) -> str:
        new, old = await self.counts(subscription.resource)
        return summary_body(self._account(subscription.resource), new, old)

    # --- unsolicited NOTIFY ---

    def _subscribed(self, mailbox: str, binding: Binding) -> bool:
        """Whether the phone behind ``binding`` has an active subscription to ``mailbox``."""
        return any(
            s.dialog.remote_target == binding.contact or (s.flow.addr == binding.source and s.flow.name == binding.transport)
            for s in self.subscriptions.of(mailbox)
        )

    def _account(self, mailbox: str) -> str:
        return f"sip:{mailbox}@{self._config().sip.domain}"

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
        self.subscriptions.stamp(request, flow, summary_body(self._account(mailbox), new, old))
        response = await self.subscriptions.send(request, flow)
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
