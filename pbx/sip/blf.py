"""Busy lamps: the ``dialog`` event package (RFC 4235).

A phone's BLF key SUBSCRIBEs to another extension's dialogs: any extension
of the server may watch any other. Each NOTIFY carries the full state as
``application/dialog-info+xml`` and, as Asterisk's do, one dialog that
stands for the extension: ``terminated`` while it is idle, ``early`` while
it rings (direction ``recipient``) or calls out (``initiator``),
``confirmed`` while it is in a call, with the number at the other end.
Yealink, Zoiper and Linphone light their keys from that state. It comes
from the call model's ``extension_state`` events
(pbx.calls.extension_states); each change is one NOTIFY to each subscriber.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from pbx.config.model import Config
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator
from pbx.sip.stack import SipStack
from pbx.sip.subscriptions import Subscription, Subscriptions

logger = logging.getLogger(__name__)

EVENT = "dialog"
CONTENT_TYPE = "application/dialog-info+xml"
NAMESPACE = "urn:ietf:params:xml:ns:dialog-info"
USER_SAFE = "!*'()&=+$,;?/"  # what a SIP URI's user part may hold unescaped besides letters, digits and -_.~


@dataclass(frozen=True)
class Lamp:
    """What a busy lamp shows of an extension (see pbx.calls.extension_states)."""

    state: str = "terminated"  # terminated (idle) | early (ringing) | confirmed (in a call)
    direction: str | None = None  # initiator | recipient
    remote: str | None = None  # the number at the other end


IDLE = Lamp()


def dialog_info(extension: str, domain: str, version: int, lamp: Lamp) -> str:
    """The dialog-info document (RFC 4235 §4) of ``extension``, full state,
    numbered ``version`` (0 in a subscription's first NOTIFY, then one more each)."""

    def uri(user: str) -> str:
        # A caller's number from a trunk is anything the trunk sent.
        return f"sip:{quote(user, safe=USER_SAFE)}@{domain}"

    root = ET.Element("dialog-info", {"xmlns": NAMESPACE, "version": str(version), "state": "full", "entity": uri(extension)})
    dialog = ET.SubElement(root, "dialog", {"id": extension, **({"direction": lamp.direction} if lamp.direction else {})})
    ET.SubElement(dialog, "state").text = lamp.state
    if lamp.remote is not None:
        ET.SubElement(ET.SubElement(dialog, "local"), "identity").text = uri(extension)
        ET.SubElement(ET.SubElement(dialog, "remote"), "identity").text = uri(lamp.remote)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


class BusyLamps:
    """The ``dialog`` package: subscriptions to extensions' states
    (``subscriptions``, routed by app.py) and their NOTIFYs."""

    event = EVENT
    content_type = CONTENT_TYPE

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        stack: SipStack,
        passwords: Callable[[str], str | None],
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        events: EventBus,
    ) -> None:
        self._config = config
        self._lamps: dict[str, Lamp] = {}  # extensions that are not idle
        self.subscriptions = Subscriptions(
            self, name="blf", stack=stack, passwords=passwords, authenticator=authenticator, guard=guard, events=events
        )
        events.subscribe("extension_state", self._changed)

    async def stop(self) -> None:
        """Forget every subscription and abandon the NOTIFYs under way."""
        await self.subscriptions.stop()

    def _changed(self, extension: str, state: str, direction: str | None, remote: str | None, **_: object) -> None:
        lamp = Lamp(state, direction, remote)
        logger.debug("blf: %s is %s (%s %s)", extension, state, direction, remote)
        if lamp == IDLE:
            self._lamps.pop(extension, None)
        else:
            self._lamps[extension] = lamp
        self.subscriptions.notify(extension)

    # --- the package (pbx.sip.subscriptions.EventPackage) ---

    def refusal(self, subscriber: str, extension: str) -> int | None:
        """Any extension may watch any extension of the server."""
        return None if extension in self._config().extensions else 404

    async def body(self, subscription: Subscription) -> str:
        extension = subscription.resource
        return dialog_info(extension, self._config().sip.domain, subscription.notified, self._lamps.get(extension, IDLE))
