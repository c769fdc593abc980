"""The media of a bridged call: RTP and RTCP relayed between two legs.

Each leg ("side") has its own socket pair, whose port goes into that leg's
SDP. A packet arriving on one side's RTP socket leaves through the other
side's socket towards the other side's peer. Nothing is parsed into objects
(ENGINE.md, "Bridged calls"): a packet whose payload type needs no change is
sent on as the very ``bytes`` object received; one that does (a different
telephone-event number, PCMU <-> PCMA) is copied once and patched in place.

:class:`RtpRelay` joins the two sides. What a side takes from whom, and how
it forwards, is :mod:`pbx.media.relay_side`; what it sends its peer of its
own (prompts, music on hold) is :mod:`pbx.media.playback`; what it counts is
:mod:`pbx.media.relay_stats`.
"""

from __future__ import annotations

from dataclasses import asdict

from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.ports import RtpPortPool, RtpSocketPair
from pbx.media.relay_side import RelaySide, RtcpForwarder
from pbx.media.relay_stats import RelayCounters


class RtpRelay:
    """Relays the media of one bridged call between side ``a`` and side ``b``."""

    def __init__(self, media_clock: MediaClock | None = None, events: EventBus | None = None) -> None:
        """Use ``await RtpRelay.create(pool)``, which also binds the sockets."""
        self.a = RelaySide("a", media_clock)
        self.b = RelaySide("b", media_clock)
        self.a.events = self.b.events = events
        self.a.other = self.b
        self.b.other = self.a
        self._pairs: list[RtpSocketPair[RelaySide, RtcpForwarder]] = []

    @classmethod
    async def create(cls, pool: RtpPortPool, clock: MediaClock | None = None, events: EventBus | None = None) -> RtpRelay:
        """Bind a socket pair per side from ``pool``.

        ``clock`` (the process's one media clock) lets the sides ``play()``;
        a relay without one only relays. Packets from strangers are reported
        on ``events`` as ``rtp_stranger`` security events, when given.
        Raises what the pool raises (RtpPortsExhausted, an OSError) and then
        holds no port. The least busy of the pool's ``relay_workers``, when
        it has any, reads the RTP sockets from then on (:mod:`pbx.media.relay_worker`).
        """
        relay = cls(clock, events)
        try:
            await relay._bind(relay.a, pool)
            await relay._bind(relay.b, pool)
        except BaseException:
            relay.close()
            raise
        worker = min((w for w in pool.relay_workers if w.running), key=lambda w: w.attached, default=None)
        if worker is not None:
            worker.attach(relay.a)
            worker.attach(relay.b)
        return relay

    async def _bind(self, side: RelaySide, pool: RtpPortPool) -> None:
        pair = await pool.open(lambda: side, lambda: side.rtcp)
        self._pairs.append(pair)
        side.port = pair.port

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per direction: ``{"a_to_b": {...}, "b_to_a": {...}}``."""
        worker = self.a.worker or self.b.worker
        if worker is not None:
            worker.sync([self.a, self.b])
        return {"a_to_b": asdict(self.a.counters), "b_to_a": asdict(self.b.counters)}

    def total(self) -> RelayCounters:
        """Both directions added up, e.g. for a metrics event when the call ends."""
        return self.a.counters + self.b.counters

    def close(self) -> None:
        """Close all four sockets and give the ports back; safe to call twice.

        Stops what the sides send of their own first (a playback's ``done``
        becomes False), after the worker reading the sockets, if any, let go
        of them and everything it had of them was counted. Lets go of the
        key listeners too: a call's key pad holds the call, which holds
        this relay, a cycle that kept every ended call until a full garbage
        collection.
        """
        worker = self.a.worker or self.b.worker
        if worker is not None:
            worker.detach([self.a, self.b])
        for side in (self.a, self.b):
            side.close()
            side.on_dtmf = None
        for pair in self._pairs:
            pair.close()
        self._pairs.clear()
