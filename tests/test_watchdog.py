"""Which calls the watchdog ends, looked at with the clock in the test's hands:
every leg the call expects RTP on counts, silence on hold waits longer, and
a call nobody answered yet is no media timeout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest.mock import sentinel

from pbx.calls.bridge import Bridge
from pbx.calls.model import Call
from pbx.calls.watchdog import overdue
from pbx.config.load import load_config
from pbx.config.model import Config
from pbx.media.relay import RtpRelay
from pbx.media.relay_side import RelaySide
from pbx.media.srtp import SrtpSides
from pbx.sip.sdp import MediaDescription

STARTED = 1_000_000.0  # wall clock of the call's start


@dataclass
class Stats:
    received: int = 0


@dataclass(eq=False)
class Side:
    name: str
    stats: Stats = field(default_factory=Stats)
    held: bool = False


@dataclass
class Relay:
    a: Side = field(default_factory=lambda: Side("a"))
    b: Side = field(default_factory=lambda: Side("b"))


def config(tmp_path: Path) -> Config:
    (tmp_path / "pbx.yaml").write_text("rtp: {timeout: 10, hold_timeout: 100}\nsip: {max_call_seconds: 1000}\n")
    return load_config(tmp_path / "pbx.yaml", env={})


def new_call(*, answered: bool = True, bridged: bool = False) -> tuple[Call, Relay]:
    relay = Relay()
    bridge = Bridge(MediaDescription(("127.0.0.1", 4000), (), None, "sendrecv"), SrtpSides("off"), "127.0.0.1", ("PCMU",))
    bridge.relay = cast(RtpRelay, relay)
    call = Call(id="c1", direction="inbound", caller="+1555", callee="8000", a=sentinel.leg, bridge=bridge, started=STARTED)
    call.answered_at = STARTED if answered else None
    call.b = sentinel.callee if bridged else None
    return call, relay


def look(call: Call, cfg: Config, at: float) -> Any:
    return overdue(call, cfg, at, STARTED + at)


async def test_a_bridged_call_ends_when_either_leg_goes_quiet(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    call, relay = new_call(bridged=True)
    for second in range(0, 10):
        relay.a.stats.received += 50
        relay.b.stats.received += 50 if second < 3 else 0  # the callee's phone vanishes after 3 s
        assert look(call, cfg, second) is None
    for second in range(10, 13):
        relay.a.stats.received += 50
        assert look(call, cfg, second) == (None if second < 12 else "rtp-timeout")


async def test_a_live_call_stays_up_and_on_hold_silence_waits_for_hold_timeout(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    call, relay = new_call()
    for second in range(0, 60):
        relay.a.stats.received += 50
        assert look(call, cfg, second) is None
    call.bridge.hold.offered(cast(RelaySide, relay.a), "inactive", bridged=False, music=None, moh_class="default")
    assert all(look(call, cfg, second) is None for second in range(60, 159))
    assert look(call, cfg, 160) == "rtp-timeout"


async def test_a_ringing_call_has_no_media_timeout_but_still_its_cap(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    call, _ = new_call(answered=False)
    assert all(look(call, cfg, second) is None for second in range(0, 1000, 50))
    assert look(call, cfg, 1000) == "max-call-seconds"
