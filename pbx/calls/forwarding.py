"""Where a call to an extension goes: forwarding and do-not-disturb.

A call to an extension first asks :meth:`Forwarding.route`, which answers
with a step (pbx.calls.steps): go elsewhere (the extension forwards every
call), ring it (with what to do when nobody answers) or give up;
pbx.calls.callees carries the steps out.

- ``always`` (pbx.yaml, or what the phone set with ``*72NUMBER``/``*73``,
  pbx.calls.settings): the call goes there and the extension does not ring.
- ``busy``: when the extension is in do-not-disturb (``*78``/``*79``), in its
  ``max_calls`` calls already, or answers 486/600.
- ``no_answer``: when it rings ``sip.ring_timeout`` seconds unanswered, or
  has no phone registered that answers (Asterisk's "unavailable" goes the
  same way).

``busy`` and ``no_answer`` default to the extension's mailbox, when it has
one: what the server did before forwarding existed. A number outside that
a call is forwarded to is dialed for the forwarding extension (its outbound
rules; pbx.calls.routing). A call is forwarded at most :data:`MAX_FORWARDS`
times: a loop (1001 to 1002 to 1001) stops there, and the extension it stops
at rings (or, for busy and no-answer, the caller hears why it failed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from pbx.calls.model import Call
from pbx.calls.routing import DialPolicy, DialRefused
from pbx.calls.settings import PhoneSettings
from pbx.calls.steps import Redirect, Refuse, Ring, Step
from pbx.config.model import Config, Destination, Forward

logger = logging.getLogger(__name__)

# Asterisk follows up to 20 redirections of a call; one office needs far
# fewer, and a loop should not ring anyone twenty times.
MAX_FORWARDS = 5

_NUMBER = re.compile(r"\+?[0-9]+")


class Forwarding:
    """Each extension's forwarding and do-not-disturb, as pbx.yaml and its phone set them."""

    def __init__(
        self,
        config: Callable[[], Config],
        settings: PhoneSettings,
        dialing: DialPolicy,
        available: Callable[[Destination], bool],
    ) -> None:
        """``available``: whether a destination can take calls now (a mailbox, for the default forwarding)."""
        self.config = config
        self.settings = settings
        self.dialing = dialing
        self.available = available

    # --- what is in effect ---

    def dnd(self, extension: str) -> bool:
        """Whether ``extension`` is in do-not-disturb: rung by nobody, offered no queue call."""
        return self.settings.of(extension).dnd

    def effective(self, extension: str) -> Forward:
        """Where ``extension``'s calls go now: the phone's ``always`` over
        pbx.yaml's, and its mailbox for busy and no answer unless pbx.yaml says otherwise."""
        cfg = self.config()
        ext = cfg.extensions.get(extension)
        if ext is None:
            return Forward()
        phone = self.settings.of(extension).forward
        always = ext.forward.always if phone is None else (self.number(cfg, phone) if phone else None)
        mailbox = Destination("voicemail", extension)
        default = mailbox if ext.voicemail is not None and self.available(mailbox) else None
        return Forward(always, ext.forward.busy or default, ext.forward.no_answer or default)

    @staticmethod
    def number(cfg: Config, number: str) -> Destination:
        """Where a forwarding number leads: an extension, else a number outside."""
        return Destination("extension" if number in cfg.extensions else "external", number)

    # --- a call to an extension ---

    def route(self, call: Call, extension: str) -> Step:
        """The first step of ``call`` to ``extension``."""
        forward = self.effective(extension)
        if forward.always is not None:
            redirect = self.redirect(call, extension, forward.always, "always", extension)
            if redirect is not None:
                return redirect
        if self.dnd(extension) or self.busy(extension):
            reason = "dnd" if self.dnd(extension) else "busy"
            return self.redirect(call, extension, forward.busy, reason, extension) or Refuse(486, "busy")
        return Ring((extension,), self.config().sip.ring_timeout, lambda disposition: self._unanswered(call, extension, disposition))

    def busy(self, extension: str) -> bool:
        """Whether ``extension`` is in its ``max_calls`` calls (being rung counts)."""
        ext = self.config().extensions.get(extension)
        return ext is not None and self.dialing.calls_of(extension) >= ext.max_calls

    def _unanswered(self, call: Call, extension: str, disposition: str) -> Step | None:
        forward = self.effective(extension)
        if disposition == "busy":
            return self.redirect(call, extension, forward.busy, disposition, extension)
        if disposition in ("no-answer", "unavailable"):
            return self.redirect(call, extension, forward.no_answer, disposition, extension)
        return None

    def redirect(self, call: Call, party: str | None, destination: Destination | None, reason: str, by: str) -> Redirect | None:
        """Send ``call`` on to ``destination`` (dialed for ``party`` when it is
        outside); None when there is none, the call was forwarded too often
        (a loop), or ``party`` may not dial the number."""
        if destination is None:
            return None
        if call.forwards >= MAX_FORWARDS:
            logger.warning("call=%s not forwarded to %s by %s: forwarded %d times already (a loop?)", call.id, destination, by, call.forwards)
            return None
        if destination.kind == "external":
            refusal = self.dialing.refusal(destination, party)
            if refusal is not None and refusal.code == "number-not-allowed":
                logger.warning("call=%s not forwarded by %s: %s", call.id, by, refusal)
                return None
        return Redirect(destination, party, reason, by)

    # --- feature codes ---

    async def feature(self, extension: str, code: str, *, src: str = "-") -> str:
        """Carry out ``code`` (do-not-disturb on or off, forwarding on with a
        number or off) for ``extension``, stored before it returns; the prompt
        that confirms it. A number the extension may not dial is refused (a
        security event from ``src``), as is its own."""
        cfg = self.config()
        features = cfg.features
        if code in (features.dnd_on, features.dnd_off):
            on = code == features.dnd_on
            await self.settings.set_dnd(extension, on)
            logger.info("extension %s: do-not-disturb %s", extension, "on" if on else "off")
            return "dnd-on" if on else "dnd-off"
        if code == features.forward_off:
            await self.settings.set_forward(extension, "")
            logger.info("extension %s: forwarding off", extension)
            return "forward-off"
        number = code.removeprefix(features.forward_on)
        if not _NUMBER.fullmatch(number) or number == extension:
            return "invalid"
        destination = self.number(cfg, number)
        if destination.kind == "external":
            try:
                self.dialing.outbound_trunk(destination, extension, src=src, now=False)
            except DialRefused as exc:
                logger.info("extension %s: not forwarding to %s: %s", extension, number, exc)
                return "forward-refused"
        await self.settings.set_forward(extension, number)
        logger.info("extension %s: forwarding every call to %s", extension, destination)
        return "forward-on"
