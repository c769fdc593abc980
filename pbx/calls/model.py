"""What a call is: its legs, its bridge, the states it moves through, how it ends.

A call has one inbound leg (the caller's dialog with us; for calls the server
places, the first phone's outbound leg) and, while it rings, one outbound leg
per registered contact of the callee (or one to a trunk). The first to answer
joins the caller in the call's :class:`~pbx.calls.bridge.Bridge`; the others
get CANCEL. Every call ends with one CDR row, whose disposition is one of
DISPOSITIONS.

Each step of a call is logged as one INFO line of ``key=value`` pairs that
starts with ``call=ID event=NAME`` (see :func:`call_event`), so one grep for
the call id tells its story: started, ivr, queued, routed, forwarded,
picked_up, answered, parked, ended (with the CDR's fields), or refused for an INVITE turned
away before it became a call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiosipua import SipResponse

from pbx.calls.bridge import Bridge
from pbx.calls.steps import Fallback
from pbx.errors import CallError
from pbx.events import logfmt
from pbx.ivr.audio import CallAudio
from pbx.recordings.recorder import Recording
from pbx.sip.dialog import Leg
from pbx.sip.outbound_leg import OutboundLeg

logger = logging.getLogger("pbx.calls")

# How a call ended, as the CDR, the call_ended event and pbx_calls_total say it:
#   answered     someone took the call: a person, the IVR, a queue's agent (also when
#                the server hung it up at shutdown after it was answered)
#   busy         the callee was busy (486/600)
#   no-answer    the callee rang out (sip.ring_timeout, 408/480/487)
#   cancelled    the caller hung up while it rang
#   rejected     the callee declined (603), or a `hangup` destination
#   unavailable  the callee is not registered, or the server stopped while the call
#                still waited for a person (ringing or in a queue)
#   failed       anything else: no route, no RTP port, a trunk error, unusable media
#   abandoned    the caller hung up while waiting in a queue
#   callback     the caller left the queue asking to be called back
#   timeout      the caller waited a queue's max_wait and had nowhere to go
#   voicemail    the caller left a message
#   interrupted  the server's process died while it carried the call; the next
#                start closed its journal row (pbx.calls.journal)
DISPOSITIONS = (
    "answered",
    "busy",
    "no-answer",
    "cancelled",
    "rejected",
    "unavailable",
    "failed",
    "abandoned",
    "callback",
    "timeout",
    "voicemail",
    "interrupted",
)


def call_event(call_id: str, event: str, **fields: object) -> None:
    """Log one step of a call as ``call=ID event=NAME key=value ...`` at INFO.

    Fields that are None are left out; floats get one decimal; values with
    spaces, quotes or ``=`` are double-quoted (logfmt), so the line splits
    on spaces.
    """
    if logger.isEnabledFor(logging.INFO):
        pairs = "".join(f" {key}={logfmt(value)}" for key, value in fields.items() if value is not None)
        logger.info("call=%s event=%s%s", logfmt(call_id), event, pairs)


def new_call_id() -> str:
    """A new call's id. The server makes it: the CDR, the calls map, the API
    and recordings are keyed by it, never by a SIP Call-ID, which any peer
    chooses and may reuse."""
    return uuid.uuid4().hex[:16]


class CallState(enum.Enum):
    RINGING = "ringing"  # the caller waits for someone: a callee rings, or nothing yet
    IVR = "ivr"  # the server answered and talks to the caller (flow, feature code, voicemail)
    QUEUED = "queued"
    ANSWERED = "answered"  # the caller talks to a person through the bridge
    PARKED = "parked"  # the caller waits in a park slot, with music, for someone to dial the slot
    ENDED = "ended"


# The moves a call may make. A flow or a queue that sends the caller on makes
# it ring again; a person who answered is the end of the road: a transfer goes
# on in a new call, a piece of the same conversation (pbx.calls.moves). Only
# the survey goes on in the same call: a queue's caller whose agent hung up
# first rates the call in a flow (pbx.calls.survey).
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.RINGING: frozenset({CallState.IVR, CallState.QUEUED, CallState.ANSWERED, CallState.PARKED, CallState.ENDED}),
    CallState.IVR: frozenset({CallState.RINGING, CallState.ENDED}),
    CallState.QUEUED: frozenset({CallState.RINGING, CallState.ANSWERED, CallState.ENDED}),
    CallState.ANSWERED: frozenset({CallState.IVR, CallState.ENDED}),
    # Retrieved from its slot, or ringing its parker again (pbx.calls.park).
    CallState.PARKED: frozenset({CallState.ANSWERED, CallState.RINGING, CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


class IllegalTransition(CallError):
    """A call asked to move to a state its current one does not lead to: a bug, never a caller's doing."""

    code = "illegal-transition"


class Unreachable(Exception):
    """A destination that cannot be rung now, with the status and CDR disposition
    that say why (and the SIP Call-ID of a leg that answered but could not be used)."""

    def __init__(self, status: int, disposition: str, *, sip_call_id: str | None = None) -> None:
        super().__init__(f"{status} {disposition}")
        self.status = status
        self.disposition = disposition
        self.sip_call_id = sip_call_id


# A dialed leg that answered, and its 200 OK.
Answered = tuple[OutboundLeg, SipResponse]


@dataclass(eq=False)
class Call:
    """One call: the caller's leg, the callee's forks, and the bridge between them.

    ``state`` changes only through :meth:`move`, which refuses a move
    :data:`TRANSITIONS` does not allow."""

    id: str
    direction: str  # internal | inbound | outbound
    caller: str
    callee: str
    a: Leg  # an InboundLeg, or for calls the server places (callbacks) the agent's OutboundLeg
    bridge: Bridge
    # The SIP Call-ID of the caller's INVITE (of the first leg, for calls the server
    # places): in the log and the CDR to find the call in a SIP trace; never a key.
    sip_call_id: str = ""
    forks: list[OutboundLeg] = field(default_factory=list)
    b: Leg | None = None  # whoever the caller talks to: a leg we dialed, or one a transfer moved in
    _state: CallState = CallState.RINGING
    started: float = field(default_factory=time.time)
    answered_at: float | None = None
    fork_codes: list[int] = field(default_factory=list)
    ring_timer: asyncio.TimerHandle | None = None
    early_sdp: str | None = None
    ringing_sent: bool = False
    task: asyncio.Task[Any] | None = None
    audio: CallAudio | None = None
    queue: str | None = None
    agent: str | None = None
    recording: Recording | None = None
    recordings: int = 0  # recordings begun on this call, the API's included
    queued_at: float | None = None  # when the call joined its queue
    wait: float | None = None  # seconds in the (last) queue until an agent answered or the caller left it
    hangup_by: str | None = None  # caller | callee | pbx
    end_reason: str | None = None  # why the server ended it: rtp-timeout, max-call-seconds, session-expired
    voicemail: str | None = None  # the mailbox the caller is leaving a message in
    # How the caller left its queue once the queue decided it (a callback
    # request): what the call ends as even if the caller hangs up right after.
    left_queue: str | None = None
    # What happens when nobody answers the extensions rung now (where the rung
    # extension forwards, a ring group's next member), and which they are.
    fallback: Fallback | None = None
    rung: tuple[str, ...] = ()
    forwards: int = 0  # times forwarded (pbx.calls.forwarding caps them: loops)
    # Extensions this call occupies: the calling one, the rung or bridged one, the agent.
    extensions: set[str] = field(default_factory=set)
    # The id every piece of one conversation shares across transfers (pbx.calls.moves):
    # the first piece's own id.
    linked_id: str = ""
    transferred_by: str | None = None  # who sent the caller here: the transferring extension or number
    transfer_to: str | None = None  # where this piece's caller was transferred to when it ended so
    picked_up_by: str | None = None  # the extension that answered it by pickup, or took it from its park slot
    # Resolves with the CDR disposition when the call ends.
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Resolves when the caller is bridged to someone.
    bridged: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Resolves when someone takes the call: a person, or the server (IVR, queue, voicemail).
    taken: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Resolves when the queue's agent hung up first and the caller went on into
    # the survey (pbx.calls.survey): the agent is done before the call is. The
    # survey puts a new one in its place for an agent the flow may lead to next.
    agent_left: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        self.linked_id = self.linked_id or self.id

    @property
    def state(self) -> CallState:
        return self._state

    def move(self, state: CallState) -> None:
        """Move to ``state``; IllegalTransition when the current state does not lead there."""
        if state not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"call {self.id} cannot go from {self._state.value} to {state.value}")
        self._state = state
        if state in (CallState.IVR, CallState.QUEUED, CallState.ANSWERED, CallState.PARKED) and not self.taken.done():
            self.taken.set_result(None)

    @property
    def ended(self) -> bool:
        return self._state is CallState.ENDED

    def leave_queue(self, now: float) -> None:
        """The caller's time in its queue ends: an agent answered, the queue
        sent it on, or it hung up there. Only the first of these counts."""
        if self.queued_at is not None and self.wait is None:
            self.wait = now - self.queued_at

    def hung_up_disposition(self, queued: str, unanswered: str) -> str:
        """How the call ends when it is hung up now: ``queued`` while in a queue
        (or how the caller left it, when the queue has decided: a caller who
        hangs up during the callback confirmation asked for a callback),
        voicemail while leaving a message, answered once answered, else ``unanswered``."""
        if self._state is CallState.QUEUED:
            return self.left_queue or queued
        if self.voicemail is not None:
            return "voicemail"
        return "answered" if self.answered_at else unanswered


def outcome(codes: list[int]) -> tuple[int, str]:
    """The status for the caller when every fork failed, and the CDR disposition."""
    if any(code in (486, 600) for code in codes):
        return 486, "busy"
    if any(code in (603,) for code in codes):
        return 603, "rejected"
    if all(code in (408, 480, 487) for code in codes):
        return 480, "no-answer"
    return (min(codes) if codes else 480), "failed"
