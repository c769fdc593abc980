"""Outbound legs: ringing every registered contact of an extension, or a
number through the trunk the outbound rules give the party it is dialed for.

:meth:`Dialer.make_legs` builds the legs a call forks to (the call service
starts them and hears how they fare); :meth:`Dialer.dial` rings a set of
targets on its own and hands back the first leg that answers, for queues and
callbacks; :meth:`Dialer.ring_first` rings the first phone of a call the
server places (click-to-call, callbacks) and gives it a bridge.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from aiosipua import SdpNegotiationError, SipResponse

from pbx.calls.bridge import Bridge, codec_of
from pbx.calls.extension_states import ExtensionStates
from pbx.calls.unclaimed import UnclaimedLegs
from pbx.calls.model import Answered, Unreachable, outcome
from pbx.calls.routing import DialPolicy, DialRefused
from pbx.config.model import Config, Destination, Trunk
from pbx.events import EventBus
from pbx.media.clock import MediaClock
from pbx.media.moh import MusicOnHold
from pbx.media.ports import RtpPortPool
from pbx.media.relay import RtpRelay
from pbx.media.srtp import SrtpSides
from pbx.sip.credentials import Credentials
from pbx.sip.dialog import Leg, LegEvents
from pbx.sip.outbound_leg import OutboundLeg
from pbx.sip.registrar import Registrar
from pbx.sip.sdp import DTMF_PT, SdpCodec, SdpOrigin, parse_media, plain_offer
from pbx.sip.stack import SipStack
from pbx.sip.transport import Flow

logger = logging.getLogger(__name__)


class Dialer:
    def __init__(
        self,
        config: Callable[[], Config],
        stack: SipStack,
        registrar: Registrar,
        dialing: DialPolicy,
        *,
        ports: RtpPortPool,
        clock: MediaClock,
        events: EventBus,
        media_ip: str,
    ) -> None:
        self.config = config
        self.stack = stack
        self.registrar = registrar
        self.dialing = dialing
        self.ports = ports
        self.clock = clock
        self.events = events
        self.media_ip = media_ip
        self.ringing: Counter[str] = Counter()  # extensions :meth:`dial` rings now (outside any call's forks)
        # What a party of a call hears while the other holds, for every call's
        # bridge (set by app.py); None: silence.
        self.music: MusicOnHold | None = None
        self.states = ExtensionStates(events)  # what each extension's phones do, for busy lamps
        self.unclaimed = UnclaimedLegs()  # legs :meth:`dial` got answered that no call has taken yet

    async def make_legs(
        self, caller: str, destination: Destination, offer: str, events: LegEvents, party: str | None = None
    ) -> list[OutboundLeg]:
        """Unstarted legs that ring ``destination`` (every contact of an
        extension, or the trunk the outbound rules give ``party``); Unreachable
        when there is none or the number may not be dialed."""
        cfg = self.config()
        if destination.kind == "extension":
            return self._extension_legs(cfg, caller, destination.target, offer, events)
        if destination.kind == "external":
            try:
                trunk = self.dialing.outbound_trunk(destination, party)
            except DialRefused as exc:
                logger.warning("not dialing %s: %s", destination, exc)
                raise Unreachable(exc.sip_status, "failed") from exc
            return [await self._trunk_leg(cfg, trunk, caller, destination.target, offer, events)]
        logger.warning("cannot dial %s", destination)
        raise Unreachable(503, "failed")

    async def dial(self, targets: Sequence[Destination], *, caller: str, offer: str, timeout: float) -> Answered | Unreachable:
        """Ring every target at once for ``timeout`` seconds, on behalf of
        ``caller``; the first leg to answer wins and the others are cancelled.
        The answered leg is the caller's to connect or hang up; otherwise
        Unreachable says why nobody answered."""
        won: asyncio.Future[Answered] = asyncio.get_running_loop().create_future()
        pending: set[OutboundLeg] = set()
        codes: list[int] = []

        def answered(leg: Leg, resp: SipResponse) -> None:
            assert isinstance(leg, OutboundLeg)
            if won.done():
                leg.bye()
            else:
                won.set_result((leg, resp))

        def failed(leg: Leg, code: int, resp: SipResponse | None) -> None:
            pending.discard(leg)  # type: ignore[arg-type]
            codes.append(code)
            if not pending and not won.done():
                won.set_exception(Unreachable(*outcome(codes)))

        events = LegEvents(answered=answered, failed=failed)
        legs: list[OutboundLeg] = []
        rung = [t.target for t in targets if t.kind == "extension"]
        self.ringing.update(rung)
        try:
            for target in targets:
                try:
                    legs += await self.make_legs(caller, target, offer, events)
                except Unreachable as exc:
                    codes.append(exc.status)
            if not legs:
                return Unreachable(*outcome(codes))
            pending.update(legs)
            for leg in legs:
                self.unclaimed.add(leg)
                leg.start()
            return await asyncio.wait_for(won, timeout)
        except TimeoutError:
            return Unreachable(480, "no-answer")
        except Unreachable as exc:
            return exc
        finally:
            self.ringing.subtract(rung)
            winner = won.result()[0] if won.done() and not won.cancelled() and won.exception() is None else None
            for leg in legs:
                if leg is not winner:
                    leg.cancel()

    async def ring_first(self, extension: str, *, caller_id: str, timeout: float) -> tuple[OutboundLeg, Bridge] | Unreachable:
        """Ring ``extension`` for a call the server places (showing
        ``caller_id``): its answered leg and the call's bridge, with the relay's
        side a facing that phone; else Unreachable. OSError when there is no
        RTP port; cancelled while it rings, the legs are cancelled and the
        relay closed."""
        cfg = self.config()
        codecs = tuple(SdpCodec(name, pt) for name, pt in (("PCMU", 0), ("PCMA", 8)) if name in cfg.rtp.codecs)
        srtp = SrtpSides(cfg.rtp.srtp)
        relay = await RtpRelay.create(self.ports, self.clock, self.events)
        origin = SdpOrigin()  # the phone's: the bridge's side a keeps it for the rest of the call
        offer = origin.describe(self.media_ip, relay.a.port, codecs, DTMF_PT, crypto=srtp.offer(relay.a))
        try:
            result = await self.dial([Destination("extension", extension)], caller=caller_id, offer=offer, timeout=timeout)
        except asyncio.CancelledError:
            relay.close()
            raise
        if isinstance(result, Unreachable):
            relay.close()
            return result
        leg, resp = result
        try:
            media = parse_media(resp.text, cfg.rtp.codecs)
            if not media.codecs:
                raise SdpNegotiationError("no audio")
            if not srtp.take_answer(relay.a, media.secure, media.cryptos):
                raise SdpNegotiationError("no usable SRTP answer")
        except SdpNegotiationError as exc:
            logger.warning("%s answered with unusable media: %s", extension, exc)
            leg.bye()
            relay.close()
            return Unreachable(488, "failed", sip_call_id=leg.dialog.call_id)
        relay.a.set_remote(media.addr, codec_of(media.codecs[0]), media.dtmf_pt, leg.flow.addr[0])
        relay.a.start_filling()  # the server has answered this phone: silence until someone joins
        bridge = Bridge(media, srtp, self.media_ip, cfg.rtp.codecs, relay=relay, a_codec=media.codecs[0], music=self.music)
        bridge.origins["a"] = origin
        return leg, bridge

    def _leg_offer(self, flow: Flow, offer: str) -> tuple[str, str | None]:
        """``offer`` as sent over ``flow``, and what to offer instead on a 488.
        With rtp.srtp optional, SDES keys go only to legs over TLS (over UDP or
        TCP anyone on the path would read them), so other legs are offered
        plain RTP; a TLS leg that refuses SRTP is offered plain RTP next."""
        if self.config().rtp.srtp != "optional" or " RTP/SAVP " not in offer:
            return offer, None
        plain = plain_offer(offer)
        return (offer, plain) if flow.name == "tls" else (plain, None)

    def _extension_legs(self, cfg: Config, caller: str, number: str, offer: str, events: LegEvents) -> list[OutboundLeg]:
        bindings = self.registrar.contacts(number)
        if not bindings:
            logger.info("extension %s has no registered contact that answers", number)
            raise Unreachable(480, "unavailable")
        caller_ext = cfg.extensions.get(caller)
        from_name = caller_ext.name if caller_ext else None
        legs = []
        for binding in bindings:
            try:
                transport = self.stack.transport(binding.transport)
            except LookupError:
                continue
            flow = Flow(transport, binding.source)
            body, fallback = self._leg_offer(flow, offer)
            legs.append(
                OutboundLeg(
                    self.stack,
                    flow,
                    request_uri=binding.contact,
                    from_uri=f"sip:{caller}@{cfg.sip.domain}",
                    to_uri=f"sip:{number}@{cfg.sip.domain}",
                    from_name=from_name,
                    body=body,
                    events=events,
                    fallback_offer=fallback,
                    session_expires=cfg.sip.session_expires,
                )
            )
        for leg in legs:
            self.states.track(leg, number, "recipient", caller)
        return legs

    async def _trunk_leg(self, cfg: Config, trunk: Trunk, caller: str, number: str, offer: str, events: LegEvents) -> OutboundLeg:
        try:
            flow = await self.stack.flow_to(trunk.host, trunk.port, trunk.transport)
        except (OSError, LookupError, TimeoutError) as exc:
            logger.warning("trunk %s at %s:%d over %s is unreachable: %s", trunk.name, trunk.host, trunk.port, trunk.transport, exc)
            raise Unreachable(503, "failed") from exc
        if self.dialing.trunk_full(trunk):
            # Checked again after the await: calls started meanwhile may have filled it.
            logger.warning("trunk %s has its %d calls up; not dialing %s", trunk.name, trunk.max_calls, number)
            raise Unreachable(503, "failed")
        auth = Credentials(trunk.register.username, trunk.register.password, trunk.auth_algorithms) if trunk.register else None
        caller_id = trunk.caller_id or caller
        params = f";transport={trunk.transport}" if trunk.transport != "udp" else ""
        body, fallback = self._leg_offer(flow, offer)
        leg = OutboundLeg(
            self.stack,
            flow,
            request_uri=f"sip:{number}@{trunk.host}:{trunk.port}{params}",
            from_uri=f"sip:{caller_id}@{cfg.sip.domain}",
            to_uri=f"sip:{number}@{trunk.host}",
            from_name=None,
            body=body,
            events=events,
            auth=auth,
            fallback_offer=fallback,
            session_expires=cfg.sip.session_expires,
        )
        self.dialing.add_leg(trunk, leg)
        return leg
