"""REFER (RFC 3515) as the server takes it: what a Refer-To asks for, the
dialog a Replaces names (RFC 3891), and the implicit ``refer`` subscription
whose NOTIFYs tell the transferor how the transfer goes (message/sipfrag).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from aiosipua import SipResponse

from pbx.sip.dialog import Leg, LegState

logger = logging.getLogger(__name__)

SUBSCRIPTION_SECONDS = 60  # how long the implicit subscription lasts unless a final NOTIFY ends it first


@dataclass(frozen=True)
class Replaces:
    """A dialog named by its Call-ID and tags as seen by whoever names it
    (RFC 3891 §6.1): ``to_tag`` is the tag of the far end of that dialog,
    which for a dialog with this server is the server's own tag."""

    call_id: str
    to_tag: str
    from_tag: str
    early_only: bool = False


@dataclass(frozen=True)
class ReferTo:
    """What a Refer-To names: the user part of its URI (a number, or an
    escaped ``KIND:TARGET``) and the dialog it replaces, if it carries a Replaces."""

    user: str
    replaces: Replaces | None


def parse_replaces(value: str) -> Replaces | None:
    """A Replaces header value (``call-id;to-tag=X;from-tag=Y[;early-only]``), None when malformed."""
    call_id, *params = (part.strip() for part in value.split(";"))
    fields: dict[str, str] = {}
    for param in params:
        name, _, val = param.partition("=")
        fields[name.lower()] = val
    if not call_id or "to-tag" not in fields or "from-tag" not in fields:
        return None
    return Replaces(call_id, fields["to-tag"], fields["from-tag"], "early-only" in fields)


def parse_refer_to(value: str) -> ReferTo | None:
    """A Refer-To header value (``<sip:USER@HOST?Replaces=...>``, a name-addr or a bare URI); None when it names no SIP user."""
    text = value.strip()
    if "<" in text:
        text = text[text.index("<") + 1 : text.rindex(">")] if ">" in text else ""
    uri, _, headers = text.partition("?")
    if not uri.lower().startswith(("sip:", "sips:", "tel:")):
        return None
    user = uri.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0]
    replaces = None
    for header in headers.split("&") if headers else []:
        name, _, val = header.partition("=")
        if name.lower() == "replaces":
            replaces = parse_replaces(unquote(val))
            if replaces is None:
                return None
    user = unquote(user)
    return ReferTo(user, replaces) if user else None


class ReferSubscription:
    """The implicit subscription a REFER accepted with 202 creates (RFC 3515
    §2.4.4): NOTIFYs in the REFER's dialog carrying the status line of the
    request the server makes for the transferor, as a sipfrag."""

    def __init__(self, leg: Leg) -> None:
        self.leg = leg
        # Without the REFER's CSeq as ;id, which RFC 3515 §2.4.6 needs only for a
        # second REFER in one dialog: pjsip matches a NOTIFY to its first REFER without it.
        self.event = "refer"
        self.done = False

    def progress(self, status: int, reason: str) -> None:
        """How the transfer goes, while it goes (``100 Trying``, ``180 Ringing``)."""
        self._notify(status, reason, f"active;expires={SUBSCRIPTION_SECONDS}")

    def final(self, status: int, reason: str, then: Callable[[], None]) -> None:
        """How the transfer ended; the subscription ends with it. ``then``
        once the transferor answered that NOTIFY (or at once, if it is gone):
        a BYE sent sooner could overtake it."""
        self._notify(status, reason, "terminated;reason=noresource", then)
        self.done = True

    def _notify(self, status: int, reason: str, state: str, then: Callable[[], None] | None = None) -> None:
        if self.done or self.leg.state is not LegState.ANSWERED:
            if then is not None:
                then()
            return
        request = self.leg.new_request("NOTIFY")
        request.headers.set_single("Event", self.event)
        request.headers.set_single("Subscription-State", state)
        request.headers.set_single("Content-Type", "message/sipfrag;version=2.0")
        request.text = f"SIP/2.0 {status} {reason}\r\n"

        def answered(resp: SipResponse) -> None:
            if then is not None and resp.status_code >= 200:
                then()

        self.leg.stack.request(request, self.leg.flow, answered)
        logger.debug("NOTIFY %s to %s: %d %s", self.event, self.leg.dialog.remote_target, status, reason)
