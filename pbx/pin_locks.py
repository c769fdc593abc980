"""Mailbox locks against PIN guessing across calls (voicemail by phone).

A caller gets three PIN tries per call and may call again; what stops a
guesser is the count per mailbox that outlives the call: after
:data:`PIN_LOCK_FAILURES` wrong PINs in a row the mailbox is locked for
:data:`PIN_LOCK_SECONDS`. Locks live in memory: a restart, which no caller
can cause, lifts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PIN_LOCK_FAILURES = 5  # wrong PINs in a row, across calls, that lock a mailbox
PIN_LOCK_SECONDS = 15 * 60


class PinLocks:
    """Wrong PINs per mailbox, across calls: ``failures`` in a row lock it for
    ``seconds``. The right PIN starts the count again, so an owner's typo
    now and then never adds up; once a lock runs out the count starts over.
    Only configured mailboxes are tracked, so memory stays bounded whatever
    numbers a caller types."""

    def __init__(
        self, *, failures: int = PIN_LOCK_FAILURES, seconds: float = PIN_LOCK_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.seconds = seconds
        self._clock = clock
        self._wrong: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def locked(self, mailbox: str) -> bool:
        """True while ``mailbox`` is locked."""
        until = self._until.get(mailbox)
        if until is not None and until <= self._clock():
            del self._until[mailbox]
            return False
        return until is not None

    def failed(self, mailbox: str) -> bool:
        """Count a wrong PIN for ``mailbox``; True when it locks the mailbox."""
        if self.locked(mailbox):
            return False
        wrong = self._wrong.get(mailbox, 0) + 1
        if wrong < self.failures:
            self._wrong[mailbox] = wrong
            return False
        self._wrong.pop(mailbox, None)
        self._until[mailbox] = self._clock() + self.seconds
        return True

    def succeeded(self, mailbox: str) -> None:
        self._wrong.pop(mailbox, None)
