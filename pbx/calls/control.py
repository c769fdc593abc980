"""The narrow interfaces between calls and the features they reach.

Features (queues, callbacks, click-to-call) reach calls only through
:class:`CallControl`, which the call service implements; the call service
reaches the features that answer calls (queues, voicemail) only through
:class:`Queues` and :class:`Voicemail`, which app.py wires in. So nothing
below pbx.calls imports the call service, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiosipua import SipResponse

from pbx.calls.model import Answered, Call, Unreachable
from pbx.calls.routing import DialPolicy
from pbx.config.model import Destination
from pbx.ivr.audio import CallAudio
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.sdp import SdpCodec


class CallControl(Protocol):
    """What features (queues, callbacks, click-to-call) may do with calls:
    answer one, ring people, join an answered leg to a call, place a call,
    hang up. The call service is the one implementation."""

    @property
    def draining(self) -> bool:
        """Whether the server is stopping: no new calls."""

    @property
    def dialing(self) -> DialPolicy:
        """Who may dial what (outbound rules, max_calls)."""

    def answer(self, call: Call) -> SdpCodec:
        """Answer the caller ourselves (once); the codec it talks."""

    def hang_up(self, call: Call, disposition: str | None = None, ringing_status: int = 480) -> None:
        """End ``call`` from the server's side with ``disposition``."""

    def offer_sdp(self, call: Call) -> str:
        """The SDP offer to ring someone for ``call``."""

    async def dial(self, targets: Sequence[Destination], *, caller: str, offer: str, timeout: float) -> Answered | Unreachable:
        """Ring every target at once; the first leg to answer, or why nobody did."""

    def connect(self, call: Call, leg: OutboundLeg, resp: SipResponse) -> bool:
        """Join a leg :meth:`dial` got answered to ``call``'s caller; False when that failed."""

    async def originate(
        self,
        extension: str,
        destination: Destination,
        *,
        caller_id: str,
        timeout: float,
        direction: str,
        call_id: str | None = None,
        party: str | None = None,
        before: Callable[[CallAudio], Awaitable[None]] | None = None,
    ) -> Call | Unreachable:
        """Ring ``extension``, then ``destination`` for it: a call the server
        places; ``before`` plays to ``extension`` once it answered, before
        ``destination`` rings."""

    def extension_busy(self, extension: str) -> bool:
        """Whether ``extension`` is on a call or being rung."""

    def extension_dnd(self, extension: str) -> bool:
        """Whether ``extension`` is in do-not-disturb."""


class Queues(Protocol):
    """What the call service needs of the queues."""

    def exists(self, name: str) -> bool:
        """Whether ``queue:NAME`` can take callers."""

    async def wait(self, call: Call, queue: str) -> Destination | None:
        """Keep ``call`` in ``queue`` until an agent has it (None, also when the
        caller hung up or asked for a callback) or it must go elsewhere."""

    async def feature(self, extension: str, code: str) -> str:
        """Carry out agent feature ``code`` for ``extension``; the prompt confirming it, once stored."""

    async def rated(self, call: Call, score: int) -> None:
        """Store the survey ``score`` the caller of ``call`` gave (with its queue and agent, if any), then announce it."""


class Voicemail(Protocol):
    """What the call service needs of voicemail."""

    def exists(self, mailbox: str) -> bool:
        """Whether ``mailbox`` takes messages."""

    async def deposit(self, audio: CallAudio, mailbox: str, caller: str) -> None:
        """Greeting, beep, and the caller's message."""

    async def main(self, audio: CallAudio, mailbox: str | None, *, own: bool, source: str) -> None:
        """Voicemail by phone: sign in (wrong PINs charged to ``source``, the
        caller's address), then hear and manage messages."""
