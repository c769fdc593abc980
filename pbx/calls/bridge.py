"""The media of one call: a relay whose side a faces the caller and side b
whoever talks to it (a callee, an agent), the codecs each side talks and the
SDES keys of each.

The bridge joins the two sides when someone answers (:meth:`Bridge.join`),
answers the caller for the server itself when nobody else does
(:meth:`Bridge.answer_here`), answers every re-INVITE itself (hold, unhold,
a new address; hold music is :mod:`pbx.calls.hold`'s), and at the end
closes the relay and reports each side's voice quality. Signalling stays
with the legs: the bridge builds and reads SDP and points relay sides,
nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiosipua import SdpNegotiationError, SipRequest

from pbx.calls.hold import DEFAULT_MOH_CLASS, Hold
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.codecs import Codec
from pbx.media.moh import MusicOnHold
from pbx.media.ports import RtpPortPool
from pbx.media.quality import estimate_mos
from pbx.media.relay import RtpRelay
from pbx.media.relay_side import RelaySide
from pbx.media.srtp import SrtpSides
from pbx.sip.dialog import Leg
from pbx.sip.sdp import (
    DTMF_PT,
    MediaDescription,
    SdpCodec,
    SdpOrigin,
    answer_codec,
    offer_codecs,
    parse_media,
    reverse_direction,
)
from pbx.sip.transactions import ServerTransaction


@dataclass(eq=False)
class Bridge:
    """One call's media; ``relay`` exists once :meth:`open` got it ports."""

    a_media: MediaDescription  # what the caller offered (or, for calls we place, answered)
    srtp: SrtpSides  # the SDES keys of the relay's sides
    media_ip: str  # the address our SDP names
    codecs: tuple[str, ...]  # rtp.codecs when the call began
    relay: RtpRelay | None = None
    a_codec: SdpCodec | None = None
    b_codec: SdpCodec | None = None
    b_dtmf_pt: int | None = None
    music: MusicOnHold | None = None  # what a party hears while the other holds; None: silence
    moh_class: str = DEFAULT_MOH_CLASS  # its class: the queue's when a queue's agent took the call
    hold: Hold = field(default_factory=Hold)
    # Side name -> (RTP packets its peer had sent, loop time that count was first seen).
    heard: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Side name -> our SDP towards that side's peer, one origin for the whole call.
    origins: dict[str, SdpOrigin] = field(default_factory=lambda: {"a": SdpOrigin(), "b": SdpOrigin()})

    async def open(self, ports: RtpPortPool, clock: MediaClock, events: EventBus) -> RtpRelay:
        """The relay, with a port for each side (OSError when there is none)."""
        self.relay = await RtpRelay.create(ports, clock, events)
        return self.relay

    def offer(self) -> str:
        """The SDP offer for ringing someone on side b: the caller's codecs,
        or once the caller is answered (by the IVR) its codec and what we can
        transcode it to; SRTP unless rtp.srtp is off (the dialer makes it plain
        for legs that should not get keys)."""
        assert self.relay is not None
        if self.a_codec is None:
            codecs = offer_codecs(self.a_media, self.codecs)
        else:
            fixed = MediaDescription(self.a_media.addr, (self.a_codec,), self.a_media.dtmf_pt, "sendrecv")
            codecs = offer_codecs(fixed, self.codecs)
        return self._describe(self.relay.b, codecs, DTMF_PT, crypto=self.srtp.offer(self.relay.b))

    def answer_here(self, a_signal_ip: str) -> tuple[SdpCodec, str]:
        """Settle the caller's codec (its first offered one) for the server to
        talk to it; that codec and the SDP answer for the caller. Until
        someone joins, the caller gets a packet every 20 ms: silence whenever
        no prompt or music plays."""
        assert self.relay is not None
        if self.a_codec is None:
            self.a_codec = self.a_media.codecs[0]
            self.relay.a.set_remote(self.a_media.addr, codec_of(self.a_codec), self.a_media.dtmf_pt, a_signal_ip)
        self.relay.a.start_filling()
        crypto = self.srtp.crypto(self.relay.a)
        return self.a_codec, self._describe(self.relay.a, (self.a_codec,), self.a_media.dtmf_pt, crypto=crypto)

    def join(self, b_body: str, b_signal_ip: str, a_signal_ip: str) -> str:
        """Point the relay at both peers (the one that answered with
        ``b_body`` on side b) and return the SDP answer for the caller;
        SdpNegotiationError when the answer is unusable. The signalling IPs
        say where each peer's RTP may come from when NAT hides its SDP address."""
        assert self.relay is not None
        b_media = parse_media(b_body, self.codecs)
        if not b_media.codecs:
            raise SdpNegotiationError("callee rejected the audio stream")
        chosen = b_media.codecs[0]
        if self.a_codec is None:
            a_codec = answer_codec(self.a_media, chosen)
        else:  # the caller was answered earlier (IVR): its codec is settled
            a_codec = answer_codec(MediaDescription(self.a_media.addr, (self.a_codec,), None, "sendrecv"), chosen)
        if not self.srtp.take_answer(self.relay.b, b_media.secure, b_media.cryptos):
            raise SdpNegotiationError("callee's answer has no usable SRTP key, or is plain RTP while rtp.srtp is mandatory")
        self.a_codec, self.b_codec, self.b_dtmf_pt = a_codec, chosen, b_media.dtmf_pt
        self.relay.b.set_remote(b_media.addr, codec_of(chosen), b_media.dtmf_pt, b_signal_ip)
        self.relay.a.set_remote(self.a_media.addr, codec_of(a_codec), self.a_media.dtmf_pt, a_signal_ip)
        self.relay.a.hand_over()  # no more prompts, music or silence: side b's peer continues the stream
        crypto = self.srtp.crypto(self.relay.a)
        return self._describe(self.relay.a, (a_codec,), self.a_media.dtmf_pt, crypto=crypto)

    def turn(self) -> None:
        """Swap the sides: side b's party becomes side a's, with its socket,
        codec, SDP origin and keys, and side a's becomes side b's. A party
        that stays in the bridge while the other leaves it (a transfer) is
        always side a's: whoever comes next joins on side b, as a callee does."""
        relay = self.relay
        assert relay is not None and self.a_codec is not None and self.b_codec is not None
        relay.a, relay.b = relay.b, relay.a
        relay.a.name, relay.b.name = "a", "b"
        addr = relay.a.remote or self.a_media.addr
        b_media = MediaDescription(addr, (self.b_codec,), self.b_dtmf_pt, "sendrecv")
        self.a_media, self.a_codec, self.b_codec, self.b_dtmf_pt = b_media, self.b_codec, self.a_codec, self.a_media.dtmf_pt
        self.origins = {"a": self.origins["b"], "b": self.origins["a"]}
        self.srtp.turn()
        self.heard.clear()

    def vacate(self) -> None:
        """Side b's party has left the bridge: no more hold (or music) of
        either party, side a's peer hears the server (silence, or what it
        plays) until someone joins on side b, and side b sends nothing to
        the party that left. The next one to join gets new keys and
        continues our SDP towards side b with the origin it is given."""
        relay = self.relay
        assert relay is not None
        self.hold.end()
        self.hold = Hold()
        relay.a.start_filling()
        relay.b.forget_peer()
        self.srtp.forget(relay.b)
        self.b_codec = self.b_dtmf_pt = None
        self.origins["b"] = SdpOrigin()

    def answer_b(self, b_body: str, b_signal_ip: str) -> str:
        """A party joining on side b with an offer of its own (an INVITE
        that replaces a leg, RFC 3891): point side b at it, in a codec the
        caller's settled one passes or transcodes to, and return our SDP
        answer; SdpNegotiationError when the offer is unusable."""
        relay = self.relay
        assert relay is not None and self.a_codec is not None
        offer = parse_media(b_body, self.codecs)
        chosen = answer_codec(offer, self.a_codec)
        if not self.srtp.take_offer(relay.b, offer.secure, offer.cryptos):
            raise SdpNegotiationError("the offer's SRTP is unusable under rtp.srtp")
        self.b_codec, self.b_dtmf_pt = chosen, offer.dtmf_pt
        relay.b.set_remote(offer.addr, codec_of(chosen), offer.dtmf_pt, b_signal_ip)
        relay.a.hand_over()
        return self._describe(relay.b, (chosen,), offer.dtmf_pt, crypto=self.srtp.crypto(relay.b))

    def reinvite_bridged(self, leg: Leg, from_a: bool, request: SipRequest, txn: ServerTransaction) -> None:
        """A re-INVITE from ``leg``, a bridged party (of side a when ``from_a``),
        answered here: the relay anchors the media, so the far party hears of
        none of it. A hold plays it the call's music instead
        of ``leg`` until ``leg`` resumes (:class:`~pbx.calls.hold.Hold`); a
        new address is followed; the codec stays the one the call settled on."""
        assert self.relay is not None
        self._answer_reinvite(leg, self.relay.a if from_a else self.relay.b, request, txn, bridged=True)

    def reinvite_to_us(self, leg: Leg, request: SipRequest, txn: ServerTransaction) -> None:
        """A re-INVITE from a caller talking to the server itself (the IVR): answer it here."""
        assert self.relay is not None
        self._answer_reinvite(leg, self.relay.a, request, txn, bridged=False)

    def _answer_reinvite(self, leg: Leg, side: RelaySide, request: SipRequest, txn: ServerTransaction, *, bridged: bool) -> None:
        codec, dtmf_pt = (self.a_codec, self.a_media.dtmf_pt) if side.name == "a" else (self.b_codec, self.b_dtmf_pt)
        assert codec is not None
        offered = self._take_offer(request, txn, side, codec, dtmf_pt)
        if offered is None:
            return
        self.hold.offered(side, offered, bridged=bridged, music=self.music, moh_class=self.moh_class)
        crypto = self.srtp.crypto(side)
        leg.answer_reinvite(txn, self._describe(side, (codec,), dtmf_pt, reverse_direction(offered), crypto=crypto))

    @property
    def on_hold(self) -> bool:
        """Whether a party's last offer held the call (sendonly, recvonly, inactive, no address)."""
        return self.hold.on

    def _describe(
        self, side: RelaySide, codecs: tuple[SdpCodec, ...], dtmf_pt: int | None, direction: str = "sendrecv", crypto: str | None = None
    ) -> str:
        """Our SDP towards ``side``'s peer, naming that side's port."""
        return self.origins[side.name].describe(self.media_ip, side.port, codecs, dtmf_pt, direction, crypto)

    def silence(self, sides: Iterable[RelaySide], now: float) -> float:
        """Seconds the quietest of ``sides`` has sent us nothing, as seen from
        one look to the next (so up to one look late)."""
        longest = 0.0
        for side in sides:
            received = side.stats.received
            seen = self.heard.get(side.name)
            if seen is None or seen[0] != received:
                self.heard[side.name] = (received, now)
            else:
                longest = max(longest, now - seen[1])
        return longest

    def _take_offer(
        self, request: SipRequest, txn: ServerTransaction, side: RelaySide, codec: SdpCodec, dtmf_pt: int | None
    ) -> str | None:
        """Point ``side`` at a re-INVITE's offer (and its SRTP key) and return
        the offered direction; None once an unusable offer got 488. The
        call's ``codec`` stays: an offer without it is unusable, as the relay
        does not switch codecs mid-call. Without SDP (the peer asks for our
        offer), nothing changes and we offer what we answered last."""
        if not request.body:
            return self.hold.direction(side)
        try:
            offer = parse_media(request.text, self.codecs)
        except SdpNegotiationError:
            txn.reply(488)
            return None
        if offer.codec(codec.name) is None or not self.srtp.take_offer(side, offer.secure, offer.cryptos):
            txn.reply(488)
            return None
        side.set_remote(offer.addr, codec_of(codec), dtmf_pt)
        return offer.direction

    def close(self, call_id: str, events: EventBus) -> list[dict[str, object]]:
        """Close the relay and count what it relayed; the voice quality of each
        side, for the log: one ``leg_quality`` event per direction with
        figures, ``inbound`` when its peer sent us RTP (our measurement),
        ``outbound`` when its peer's RTCP reported on what we sent it."""
        if self.relay is None:
            return []
        self.hold.end()
        self.relay.close()
        events.emit("rtp_relayed", packets=self.relay.total().relayed)
        reports: list[dict[str, object]] = []
        for side in (self.relay.a, self.relay.b):
            codec = side.codec.name if side.codec is not None else "PCMU"
            inbound, peer = side.stats.report(), side.rtcp.peer
            rtt_ms = peer.rtt * 1000.0 if peer.rtt is not None else None
            figures: dict[str, object] = {"leg": side.name, "codec": codec}
            if inbound.received:
                mos = estimate_mos(codec, inbound.loss_fraction, inbound.jitter_ms, rtt_ms=rtt_ms or 0.0)
                events.emit(
                    "leg_quality", call_id=call_id, leg=side.name, direction="inbound", codec=codec, packets=inbound.received,
                    lost=inbound.lost, jitter_ms=inbound.jitter_ms, rtt_ms=rtt_ms, mos=mos,
                )  # fmt: skip
                figures.update(packets=inbound.received, lost=inbound.lost, jitter_ms=inbound.jitter_ms, mos=f"{mos:.2f}")
            if peer.reports:
                jitter_ms = peer.jitter * 1000.0 / (side.codec.clock_rate if side.codec is not None else 8000)
                mos = estimate_mos(codec, peer.loss_fraction, jitter_ms, rtt_ms=rtt_ms or 0.0)
                events.emit(
                    "leg_quality", call_id=call_id, leg=side.name, direction="outbound", codec=codec, packets=peer.sent,
                    lost=peer.lost, jitter_ms=jitter_ms, rtt_ms=rtt_ms, mos=mos,
                )  # fmt: skip
                figures.update(out_packets=peer.sent, out_lost=peer.lost, out_jitter_ms=jitter_ms, out_mos=f"{mos:.2f}", rtt_ms=rtt_ms)
            if len(figures) > 2:
                reports.append(figures)
        return reports


def codec_of(codec: SdpCodec) -> Codec:
    """The relay's codec for a codec SDP names."""
    return Codec(codec.name, codec.payload_type, codec.clock_rate)
