"""Short-lived single-use tickets: how a browser opens a WebSocket.

A browser cannot set an ``Authorization`` header on a WebSocket, so the
page asks ``POST /api/tickets`` (with the bearer token) for a ticket and
opens ``/api/events?ticket=...``. A ticket is 192 random bits, good once
and for :data:`TICKET_SECONDS`: one seen in a log or a proxy's URL list is
worth nothing by then.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

TICKET_SECONDS = 30
MAX_TICKETS = 1000  # outstanding at once; beyond it the oldest goes, so a token holder cannot fill memory


class Tickets:
    """The tickets handed out and not yet used nor expired."""

    def __init__(self) -> None:
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def issue(self) -> tuple[str, float]:
        """A new ticket and when it expires (time.time())."""
        now = time.time()
        self._expire(now)
        ticket = secrets.token_urlsafe(24)
        self._expiry[ticket] = now + TICKET_SECONDS
        while len(self._expiry) > MAX_TICKETS:
            self._expiry.popitem(last=False)
        return ticket, self._expiry[ticket]

    def redeem(self, ticket: str) -> bool:
        """Whether ``ticket`` is good; it is not, ever again, after this."""
        expiry = self._expiry.pop(ticket, None)
        return expiry is not None and time.time() < expiry

    def _expire(self, now: float) -> None:
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)
