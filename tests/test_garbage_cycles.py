"""What an ended call leaves to the garbage collector: nothing, where a
reference cycle used to keep the call alive until a full collection (the
server's longest pauses, every few seconds under load: its media clock
skipped up to 13 ticks at once).

Each test disables the collector, ends the thing, drops the last plain
reference and checks that reference counting alone freed it. A recording's
case is in tests/test_recordings.py, beside its rig.
"""

from __future__ import annotations

import asyncio
import weakref


from pbx.media.relay import RtpRelay
from pbx.sip.session_timer import SessionTimer
from pbx.tasks import Background


class Owner:
    """A call, say: it holds its task, and the task's frames hold it."""

    task: asyncio.Task[None] | None = None


async def test_a_cancelled_task_does_not_keep_what_its_frames_held(no_collector: None) -> None:
    async def work(owner: Owner) -> None:
        await asyncio.sleep(3600)

    tasks = Background("test")
    owner = Owner()
    owner.task = task = tasks.spawn(work(owner))
    await asyncio.sleep(0)  # the task is waiting in work(), its frame holding owner
    gone = weakref.ref(owner)
    task.cancel()
    await asyncio.wait([task])  # not gather(), which takes the CancelledError itself
    assert task.cancelled()
    del owner, task

    assert gone() is None


class Leg:
    """A leg, say: it holds its session timer, the timer its methods."""

    def __init__(self) -> None:
        self.timer = SessionTimer(1800, self.refresh, self.expire)

    def refresh(self, on_answer: object, by_invite: bool) -> None:
        raise AssertionError("an ended leg's timer refreshed it")

    def expire(self) -> None:
        raise AssertionError("an ended leg's timer expired it")


def test_an_ended_leg_s_session_timer_lets_go_of_the_leg(no_collector: None) -> None:
    leg = Leg()
    timer = leg.timer
    gone = weakref.ref(leg)
    timer.end()
    del leg

    assert gone() is None
    timer._refresh_due()  # a timer that fired just as the leg ended: calls nobody
    assert timer._handle is None


class KeyPad:
    """A call's feature keys, say: they hold the call, which holds its relay."""

    def __init__(self, relay: RtpRelay) -> None:
        self.relay = relay

    def press(self, key: str) -> bool:
        return False


def test_a_closed_relay_lets_go_of_its_key_listeners(no_collector: None, relay: RtpRelay) -> None:
    pad = KeyPad(relay)
    relay.a.on_dtmf = relay.b.on_dtmf = pad.press
    gone = weakref.ref(pad)
    relay.close()
    del pad

    assert gone() is None
