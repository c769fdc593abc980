"""The steps of a call to an extension or a ring group, as forwarding
(pbx.calls.forwarding) and ring groups (pbx.calls.groups) choose them and
pbx.calls.callees takes them: go elsewhere, ring some extensions (and what
next when nobody answers), or give up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pbx.config.model import Destination


@dataclass(frozen=True)
class Redirect:
    """Send the call to ``destination``; a number outside is dialed for ``party``."""

    destination: Destination
    party: str | None
    reason: str  # always | busy | dnd | no-answer | unavailable
    by: str  # the extension (or group:NAME) that sends it on


@dataclass(frozen=True)
class Ring:
    """Ring ``extensions`` at once for ``timeout`` seconds; when nobody answers,
    ``fallback(disposition)`` says what next (None: the caller gets the failure)."""

    extensions: tuple[str, ...]
    timeout: float
    fallback: Fallback


@dataclass(frozen=True)
class Refuse:
    """End the call for the caller with ``status`` (the CDR's ``disposition``)."""

    status: int
    disposition: str


type Step = Redirect | Ring | Refuse
type Fallback = Callable[[str], Step | None]
