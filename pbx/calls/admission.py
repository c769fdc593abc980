"""Who may start a call, and to what: a trunk by its source network (to a
number in ``inbound``), an extension by digest auth (to what it dials, within
its outbound rules and ``max_calls``). Every INVITE turned away is answered
and logged as ``event=refused`` here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from aiosipua import SipRequest

from pbx.calls.model import Call, call_event
from pbx.calls.routing import DialPolicy, DialRefused, route_dialed
from pbx.config.model import Config, Destination, Trunk
from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, DigestAuthenticator, authenticate_request
from pbx.sip.dialog import InboundLeg, invite_key
from pbx.sip.messages import address_user, uri_user
from pbx.sip.registrar import Registrar
from pbx.sip.transactions import ServerTransaction


class Admitted(NamedTuple):
    caller: str
    called: str
    destination: Destination
    direction: str  # inbound (from a trunk) | outbound (an extension dials out) | internal
    trunk: Trunk | None  # the trunk it came from


class Admission:
    def __init__(
        self,
        config: Callable[[], Config],
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        registrar: Registrar,
        events: EventBus,
        dialing: DialPolicy,
    ) -> None:
        self.config = config
        self.authenticator = authenticator
        self.guard = guard
        self.registrar = registrar
        self.events = events
        self.dialing = dialing

    def admit(self, request: SipRequest, ip: str, txn: ServerTransaction, calls: Iterable[Call]) -> Admitted | None:
        """Who calls what with this INVITE from ``ip``; None once it was
        answered with a refusal (or a digest challenge)."""
        cfg = self.config()
        called = uri_user(request.uri) or ""
        trunk = cfg.trunk_for_source(ip)
        if trunk is not None:
            inbound = cfg.inbound.get(called)
            if inbound is None:
                call_event(request.call_id or "", "refused", status=404, reason="not in inbound", trunk=trunk.name, to=called)
                txn.reply(404)
                return None
            admitted = Admitted(address_user(request.headers.get_first("from")) or "anonymous", called, inbound, "inbound", trunk)
        else:
            caller = authenticate_request(
                request,
                ip,
                txn,
                authenticator=self.authenticator,
                guard=self.guard,
                events=self.events,
                passwords=self.registrar.passwords,
            )
            if caller is None:
                return None
            destination = route_dialed(cfg, called)
            try:
                if destination.kind == "external":
                    self.dialing.outbound_trunk(destination, caller, src=ip)
                self.dialing.check_calls(caller, src=ip)
            except DialRefused as exc:
                call_event(request.call_id or "", "refused", status=exc.sip_status, reason=str(exc), **{"from": caller, "to": called})
                txn.reply(exc.sip_status)
                return None
            admitted = Admitted(caller, called, destination, "outbound" if destination.kind == "external" else "internal", None)
        merged = merged_with(request, calls)
        if merged is not None:
            # RFC 3261 §8.2.2.2: the same INVITE (Call-ID, From tag, CSeq) by another path.
            call_event(request.call_id or "", "refused", status=482, reason=f"merged with call {merged.id}")
            txn.reply(482, "Loop Detected")
            return None
        return admitted


def merged_with(request: SipRequest, calls: Iterable[Call]) -> Call | None:
    """The call in progress whose INVITE had this request's Call-ID, From
    tag and CSeq: the same request again on another path (a loop or a
    forking proxy), not a new call. A reused Call-ID alone (another From tag,
    another CSeq) is a new call with an id of its own."""
    key = invite_key(request)
    return next((call for call in calls if isinstance(call.a, InboundLeg) and call.a.invite_key == key), None)
