"""Who may dial what: the outbound rules, class of service and ``max_calls``.

Every number the server dials out passes :meth:`DialPolicy.outbound_trunk`:
numbers extensions dial, click-to-call, callbacks (asked for by phone or by
the API), and ``external:`` destinations of flows, queues and ``inbound``. A
number no rule allows is refused where it is asked for, and each refusal is
one security event (``refused_number``, ``call_limit``) for fail2ban and
``pbx_security_events_total``.

Whose rules apply: a number an extension dials itself (or asks for by
click-to-call) is dialed for that extension, so a rule with an ``extensions``
list serves it only when it is listed; everything the server places on its
own (callbacks, flows, queue exits, inbound forwarding) may use only the
rules without such a list (as an Asterisk endpoint's context decides what
it may dial, and the server's own calls run in the default one).
"""

from __future__ import annotations

from collections.abc import Callable

from pbx.config.destinations import parse_destination
from pbx.config.model import Config, Destination, Trunk
from pbx.errors import BadRequest, CallError
from pbx.events import EventBus
from pbx.security import security_event
from pbx.sip.outbound_leg import OutboundLeg


class DialRefused(CallError):
    """A call the server will not place for a party: ``code`` names why
    (``number-not-allowed``: no outbound rule lets the party dial the number,
    422 in the API; ``call-limit``: an extension's or trunk's ``max_calls`` is
    reached, 409), ``sip_status`` is the SIP answer that says it."""

    def __init__(self, code: str, sip_status: int, message: str, *, trunk: str | None = None) -> None:
        super().__init__(message, code=code, status=409 if code == "call-limit" else 422)
        self.sip_status = sip_status
        self.trunk = trunk  # the trunk that is full


class DialPolicy:
    """The outbound rules and ``max_calls`` of the running config, and the
    legs through each trunk that its ``max_calls`` counts."""

    def __init__(self, config: Callable[[], Config], events: EventBus, calls_of: Callable[[str], int]) -> None:
        """``calls_of(extension)``: the calls an extension is in now (ringing included)."""
        self.config = config
        self.events = events
        self.calls_of = calls_of
        self._trunk_legs: dict[str, list[OutboundLeg]] = {}  # by trunk name

    def outbound_trunk(self, destination: Destination, party: str | None, *, src: str = "-", now: bool = True) -> Trunk:
        """The trunk to dial ``destination`` (``external:NUMBER[@TRUNK]``) through
        for ``party``: the extension it is dialed for, None for the server itself.

        The first outbound rule that matches the number and allows the party
        decides; ``external:NUMBER@TRUNK`` (written by the admin) must pass the
        rules too and then takes TRUNK instead of the rule's trunk. DialRefused,
        and a security event from ``src``, when no rule allows it or (``now``:
        it is to be dialed now, not later as a callback) the trunk has
        ``max_calls`` calls up."""
        try:
            return self._trunk(destination, party, now=now)
        except DialRefused as exc:
            kind = "refused_number" if exc.code == "number-not-allowed" else "call_limit"
            security_event(self.events, kind, src, number=destination.target, extension=party, trunk=exc.trunk)
            raise

    def refusal(self, destination: Destination, party: str | None = None, *, now: bool = True) -> DialRefused | None:
        """Why :meth:`outbound_trunk` would refuse ``destination`` (``now``, or
        ever: a full trunk is no reason then), if it would (no event logged:
        nobody asked yet)."""
        try:
            self._trunk(destination, party, now=now)
        except DialRefused as exc:
            return exc
        return None

    def check_calls(self, extension: str, *, src: str = "-") -> None:
        """DialRefused (486, and a security event from ``src``) when ``extension``
        is already in its ``max_calls`` calls and asks to place one more: a
        stolen password cannot run up parallel calls."""
        ext = self.config().extensions.get(extension)
        if ext is None:
            return
        up = self.calls_of(extension)
        if up >= ext.max_calls:
            security_event(self.events, "call_limit", src, extension=extension, max_calls=ext.max_calls)
            raise DialRefused("call-limit", 486, f"extension {extension} is in {up} calls (max_calls {ext.max_calls})")

    def trunk_full(self, trunk: Trunk) -> bool:
        """Whether ``trunk`` has its ``max_calls`` legs up (ringing or answered)."""
        if trunk.max_calls is None:
            return False
        legs = self._trunk_legs.get(trunk.name, [])
        legs[:] = [leg for leg in legs if not leg.ended]  # ended ones are forgotten here
        return len(legs) >= trunk.max_calls

    def add_leg(self, trunk: Trunk, leg: OutboundLeg) -> None:
        """``leg`` goes through ``trunk``: it counts until it ends."""
        self._trunk_legs.setdefault(trunk.name, []).append(leg)

    def _trunk(self, destination: Destination, party: str | None, *, now: bool = True) -> Trunk:
        cfg = self.config()
        number = destination.target
        rule_trunk = cfg.route_outbound(number, party)
        if rule_trunk is None:
            who = f"extension {party}" if party else "the server"
            raise DialRefused("number-not-allowed", 404, f"no outbound rule lets {who} dial {number}")
        trunk = cfg.trunks.get(destination.trunk) if destination.trunk else rule_trunk
        if trunk is None:  # a reload removed the trunk a destination names
            raise DialRefused("number-not-allowed", 404, f"there is no trunk {destination.trunk}")
        if now and self.trunk_full(trunk):
            raise DialRefused("call-limit", 503, f"trunk {trunk.name} has its {trunk.max_calls} calls up", trunk=trunk.name)
        return trunk


def route_dialed(cfg: Config, number: str) -> Destination:
    """Where a number an extension dials leads: an extension, an inbound
    number, a feature code (pickup, the park and its slots included), else
    outside (whether it may go there is the dial policy's to say)."""
    if number in cfg.extensions:
        return Destination("extension", number)
    if number in cfg.inbound:
        return cfg.inbound[number]
    features = cfg.features
    if number in (features.voicemail_main, features.agent_login, features.agent_pause) or features.sets_phone(number):
        return Destination("feature", number)
    if features.picks_up(number) or number == features.park or cfg.park.holds(number):
        return Destination("feature", number)
    return Destination("external", number)


def asked_destination(cfg: Config, text: str) -> Destination:
    """Where ``text`` leads when someone asks for it (click-to-call): a
    destination written ``KIND:TARGET``, or a number as a phone would dial it.
    BadRequest when it names nothing that exists in the config."""
    try:
        destination = parse_destination(text) if ":" in text or text == "hangup" else route_dialed(cfg, text)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if destination.kind == "hangup":
        raise BadRequest("hangup connects to nobody")
    if destination.kind == "extension" and destination.target not in cfg.extensions:
        raise BadRequest(f"there is no extension {destination.target}")
    if destination.kind == "external" and destination.trunk and destination.trunk not in cfg.trunks:
        raise BadRequest(f"there is no trunk {destination.trunk}")
    return destination
