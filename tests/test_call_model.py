"""A call moves between states only along TRANSITIONS; anything else raises.
(The tests are coroutines because a Call makes its futures on the running loop.)"""

from __future__ import annotations

import itertools
from unittest.mock import sentinel

import pytest

from pbx.calls.bridge import Bridge
from pbx.calls.model import TRANSITIONS, Call, CallState, IllegalTransition
from pbx.errors import CallError
from pbx.media.srtp import SrtpSides
from pbx.sip.sdp import MediaDescription


def new_call() -> Call:
    media = MediaDescription(("127.0.0.1", 4000), (), None, "sendrecv")
    bridge = Bridge(media, SrtpSides("off"), "127.0.0.1", ("PCMU",))
    return Call(id="c1", direction="internal", caller="1001", callee="1002", a=sentinel.leg, bridge=bridge)


def reach(call: Call, state: CallState) -> None:
    """Walk ``call`` from ringing to ``state`` by allowed moves."""
    path = {
        CallState.RINGING: [],
        CallState.IVR: [CallState.IVR],
        CallState.QUEUED: [CallState.QUEUED],
        CallState.ANSWERED: [CallState.ANSWERED],
        CallState.PARKED: [CallState.PARKED],
        CallState.ENDED: [CallState.ENDED],
    }[state]
    for step in path:
        call.move(step)


async def test_every_move_is_either_allowed_or_refused() -> None:
    for start, target in itertools.product(CallState, CallState):
        call = new_call()
        reach(call, start)
        if target in TRANSITIONS[start]:
            call.move(target)
            assert call.state is target
        else:
            with pytest.raises(IllegalTransition, match=f"from {start.value} to {target.value}"):
                call.move(target)
            assert call.state is start


async def test_a_call_walks_the_ivr_then_the_queue_then_an_agent() -> None:
    call = new_call()
    for state in (CallState.IVR, CallState.RINGING, CallState.QUEUED, CallState.ANSWERED, CallState.ENDED):
        call.move(state)
    assert call.ended


async def test_an_ended_call_stays_ended_and_the_state_cannot_be_assigned() -> None:
    call = new_call()
    call.move(CallState.ENDED)
    with pytest.raises(IllegalTransition) as refused:
        call.move(CallState.RINGING)
    assert isinstance(refused.value, CallError) and refused.value.code == "illegal-transition"
    with pytest.raises(AttributeError):
        call.state = CallState.ANSWERED  # type: ignore[misc]
