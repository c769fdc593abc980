"""Prometheus metrics (CONTRACT §5), fed only by domain events (STYLE §8)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pbx.events import EventBus

SIP_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "INFO", "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE"})


class Metrics:
    """Owns the registry and turns events into counters and gauges."""

    def __init__(self, events: EventBus) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("pbx_calls", "Calls that ended, by direction and disposition", ["direction", "disposition"], registry=r)
        self.active_calls = Gauge("pbx_active_calls", "Calls in progress", registry=r)
        self.registrations = Gauge("pbx_registrations", "Registered contacts", registry=r)
        self.sip_requests = Counter("pbx_sip_requests", "SIP requests received, by method", ["method"], registry=r)
        self.sip_responses = Counter("pbx_sip_responses", "SIP responses sent, by status code", ["code"], registry=r)
        self.auth_failures = Counter("pbx_auth_failures", "Failed digest authentications", registry=r)
        self.reload_errors = Counter("pbx_config_reload_errors", "Reloads refused because the new config was invalid", registry=r)
        self.ivr_visits = Counter("pbx_ivr_node_visits", "IVR nodes entered, by flow and node", ["flow", "node"], registry=r)
        self.rtp_relayed = Counter("pbx_rtp_packets_relayed", "RTP packets relayed between call legs", registry=r)
        events.subscribe("call_started", lambda **_: self.active_calls.inc())
        events.subscribe("call_ended", self._call_ended)
        events.subscribe("registrations_changed", lambda count, **_: self.registrations.set(count))
        events.subscribe("sip_request", self._sip_request)
        events.subscribe("sip_response", lambda code, **_: self.sip_responses.labels(str(code)).inc())
        events.subscribe("auth_failure", lambda **_: self.auth_failures.inc())
        events.subscribe("config_reload_failed", lambda **_: self.reload_errors.inc())
        events.subscribe("ivr_node_visit", lambda flow, node, **_: self.ivr_visits.labels(flow, node).inc())
        events.subscribe("rtp_relayed", lambda packets, **_: self.rtp_relayed.inc(packets))

    def _call_ended(self, direction: str, disposition: str, **_: object) -> None:
        self.active_calls.dec()
        self.calls.labels(direction, disposition).inc()

    def _sip_request(self, method: str, **_: object) -> None:
        # Methods come off the wire: unknown ones share a label so an attacker cannot grow the series.
        self.sip_requests.labels(method if method in SIP_METHODS else "other").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
