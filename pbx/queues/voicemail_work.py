"""Voicemail as work: the messages of a mailbox that belongs to a queue
(``extensions.N.voicemail.queue``) are offered to that queue's agents.

A message left there becomes a callback to its caller (pbx.queues.callbacks)
that names the message (the callbacks row's ``message``) and keeps the time
the message was left as its place in line. When a free agent answers its
offer, the agent first hears the message, then the server dials the caller
and bridges them, as for any callback; a caller who cannot be reached is
tried again by the queue's callback rules. Once the callback has completed,
the message is handled (its voicemail row's ``handled``). A message still
not handled ``respond_within`` after it was left is overdue: the queue's
figures and ``pbx_voicemail_overdue{mailbox}`` count it.

A message whose caller cannot be called back (no outbound rule dials that
number, or it is unknown) stays an ordinary message of its mailbox. At start
the pending work comes back into its lines, and an unheard message of such
a mailbox without its callback (a crash came between the two rows, or the
mailbox was just given its queue) becomes work then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.queues.model import Entry, Lines
from pbx.queues.stats import is_overdue
from pbx.store.db import Store, iso_time
from pbx.tasks import Background

if TYPE_CHECKING:
    from pbx.calls.control import CallControl
    from pbx.ivr.audio import CallAudio
    from pbx.queues.callbacks import Callbacks

logger = logging.getLogger(__name__)

MarkHeard = Callable[[Mapping[str, Any], bool], Awaitable[None]]  # pbx.voicemail.service.VoicemailService.mark_heard


class VoicemailWork:
    """Turns the messages of a queue's mailbox into that queue's callbacks,
    plays each to its agent, and marks it handled once its caller was reached."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        calls: CallControl,
        store: Store,
        events: EventBus,
        lines: Lines,
        callbacks: Callbacks,
        tasks: Background,
    ) -> None:
        self.config = config
        self.calls = calls
        self.store = store
        self.lines = lines
        self.callbacks = callbacks
        self.tasks = tasks
        self.mark_heard: MarkHeard | None = None  # app.py wires voicemail's: a message an agent heard is old
        callbacks.messages = self
        events.subscribe("voicemail_left", self._left)

    def _queue_of(self, mailbox: str) -> str | None:
        box = self.config().mailbox(mailbox)
        return box.queue if box is not None else None

    # --- a message becomes work ---

    def _left(self, mailbox: str, message_id: str, caller: str, **_: object) -> None:
        queue = self._queue_of(mailbox)
        if queue is not None:  # the event is sent right after the message is stored: now is when it was left
            self.tasks.spawn(self.add(queue, mailbox, message_id, caller, time.time()))

    async def add(self, queue: str, mailbox: str, message_id: str, caller: str, left: float) -> Entry | None:
        """Message ``message_id`` of ``mailbox`` as a callback to ``caller`` in
        ``queue``, in line as of ``left``; None when the caller cannot be called back."""
        self.lines.sync(self.config().queues)
        line = self.lines.get(queue)
        if line is None:
            return None
        refused = self.callbacks.refusal(caller)
        if refused is not None:
            logger.info("voicemail %s of %s stays in the mailbox: %s cannot be called back (%s)", message_id, mailbox, caller, refused)
            return None
        entry = await self.callbacks.create(line, caller, left, None, message=message_id, mailbox=mailbox)
        logger.info("voicemail %s of %s is work for queue %s: callback %s to %s", message_id, mailbox, queue, entry.id, caller)
        return entry

    # --- start ---

    async def restore(self) -> None:
        """Pending voicemail work back in its lines; unheard messages of a
        queue's mailbox that have no callback become work."""
        mailboxes = {number: ext.voicemail.queue for number, ext in self.config().extensions.items() if ext.voicemail and ext.voicemail.queue}
        pending, unlisted = await self.store.run(self._rows, sorted(mailboxes))
        for row in pending:
            line = self.lines.get(row["queue"])
            if line is None:
                continue
            line.add(Entry.pending_callback(row))
        if pending:
            logger.info("%d pending voicemail callbacks restored", len(pending))
        for row in unlisted:
            left = datetime.fromisoformat(row["received"]).timestamp()
            await self.add(mailboxes[row["mailbox"]], row["mailbox"], row["id"], row["caller"], left)

    def _rows(self, mailboxes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        db = self.store.db
        pending = db.query(
            "select c.id, c.queue, c.number, c.entered, c.attempts, c.next_attempt, c.message, v.mailbox"
            " from callbacks c left join voicemail v on v.id = c.message"
            " where c.status = 'pending' and c.message is not null order by c.entered"
        )
        marks = ",".join("?" * len(mailboxes))
        unlisted = db.query(
            f"select v.id, v.mailbox, v.caller, v.received from voicemail v where v.mailbox in ({marks}) and v.heard = 0"
            " and v.handled is null and not exists (select 1 from callbacks c where c.message = v.id) order by v.received",
            mailboxes,
        )
        return list(pending), list(unlisted)

    # --- offered to an agent (pbx.queues.callbacks.MessageWork) ---

    async def play(self, entry: Entry, audio: CallAudio) -> None:
        """"Message" and the message, to the agent who answered; a key skips the rest."""
        rows = await self.store.rows("voicemail", "id = ?", [entry.message])
        if not rows:
            logger.warning("voicemail %s is gone: callback %s to %s goes on without it", entry.message, entry.id, entry.number)
            return
        row = rows[0]
        logger.info("voicemail %s of %s plays to the agent of callback %s", row["id"], row["mailbox"], entry.id)
        if await audio.play(["vm-message"], interruptible=True) is None:
            await audio.play_file(self.config().storage.data_dir / row["path"], interruptible=True)
        if self.mark_heard is not None:
            await self.mark_heard(row, True)

    async def handled(self, entry: Entry) -> None:
        """The message's caller was called back: the message is handled."""
        if not await self.store.rows("voicemail", "id = ?", [entry.message]):
            return  # deleted meanwhile
        await self.store.update("voicemail", str(entry.message), {"handled": iso_time(time.time())})
        logger.info("voicemail %s of %s handled: %s was called back", entry.message, entry.mailbox, entry.number)

    # --- figures ---

    def overdue(self) -> dict[str, int]:
        """Overdue messages by mailbox, for every mailbox of a queue (0 included)."""
        cfg = self.config()
        counts = {number: 0 for number, ext in cfg.extensions.items() if ext.voicemail is not None and ext.voicemail.queue is not None}
        now = time.time()
        for line in self.lines.values():
            for entry in line.entries:
                if entry.mailbox in counts and is_overdue(cfg, entry, now):
                    counts[entry.mailbox] += 1
        return counts
