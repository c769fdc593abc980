"""Prometheus metrics (CONTRACT §5), fed only by domain events (STYLE §8)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pbx.events import EventBus
from pbx.security import SECURITY_EVENTS

# Seconds callers wait in a queue: from instant pick-ups to the default 15 min max_wait.
WAIT_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)
# Estimated MOS of a call leg (1..4.5, pbx.media.quality): finer where good calls sit.
MOS_BUCKETS = (1, 2, 2.5, 3, 3.5, 4, 4.2, 4.4, 4.5)
# Survey scores (a rate node's keys): one bucket per score of the default 1-5.
CSAT_BUCKETS = (1, 2, 3, 4, 5)


class QueueView(Protocol):
    """What the queue gauges read at scrape time (a pbx.queues.stats.QueueSnapshot)."""

    @property
    def name(self) -> str: ...
    @property
    def callers(self) -> int: ...
    @property
    def longest_wait(self) -> float: ...
    @property
    def agents(self) -> dict[str, int]: ...
    @property
    def callbacks_pending(self) -> int: ...
    @property
    def service_level(self) -> float | None: ...

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
        self.security_events = Counter("pbx_security_events", "Refusals an attack causes, by kind (pbx.security)", ["event"], registry=r)
        for kind in SECURITY_EVENTS:
            self.security_events.labels(kind)
        self.reload_errors = Counter("pbx_config_reload_errors", "Reloads refused because the new config was invalid", registry=r)
        self.ivr_visits = Counter("pbx_ivr_node_visits", "IVR nodes entered, by flow and node", ["flow", "node"], registry=r)
        self.rtp_relayed = Counter("pbx_rtp_packets_relayed", "RTP packets relayed between call legs", registry=r)
        self.rtp_lost = Counter("pbx_rtp_packets_lost", "RTP packets the phones sent that never reached us, over finished call legs", registry=r)
        self.call_mos = Histogram(
            "pbx_call_mos",
            "Estimated MOS of each finished call leg from its packet loss and jitter (E-model), by direction: "
            "inbound as we received the phone's RTP, outbound as the phone's RTCP reports say it received ours",
            ["direction"],
            buckets=MOS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "pbx_queue_wait_seconds", "Time callers waited in a queue, by how the wait ended", ["queue", "outcome"], buckets=WAIT_BUCKETS, registry=r
        )
        self.queue_calls = Counter("pbx_queue_calls", "Callers who left a queue, by how", ["queue", "outcome"], registry=r)
        self.csat = Histogram(
            "pbx_csat_score", "Scores callers gave in their queue's post-call survey", ["queue"], buckets=CSAT_BUCKETS, registry=r
        )
        self.callbacks = Counter(
            "pbx_callbacks", "Callbacks requested, dialed (each attempt), completed, failed and cancelled", ["queue", "outcome"], registry=r
        )
        self.recordings = Counter("pbx_recordings", "Call recordings saved", registry=r)
        self.recording_failures = Counter("pbx_recording_failures", "Call recordings lost to a write error", registry=r)
        self.webhook_failures = Counter(
            "pbx_webhook_failures", "Webhook delivery attempts that failed, and events dropped undelivered (pbx.live.webhooks)", registry=r
        )
        events.subscribe("webhook_failed", lambda **_: self.webhook_failures.inc())
        events.subscribe("queue_caller_left", self._queue_caller_left)
        events.subscribe("callback", lambda queue, outcome, **_: self.callbacks.labels(queue, outcome).inc())
        events.subscribe("survey_answered", self._survey_answered)
        events.subscribe("call_started", lambda **_: self.active_calls.inc())
        events.subscribe("call_ended", self._call_ended)
        events.subscribe("call_interrupted", lambda direction, **_: self.calls.labels(direction, "interrupted").inc())
        events.subscribe("registrations_changed", lambda count, **_: self.registrations.set(count))
        events.subscribe("sip_request", self._sip_request)
        events.subscribe("sip_response", lambda code, **_: self.sip_responses.labels(str(code)).inc())
        events.subscribe("auth_failure", lambda **_: self.auth_failures.inc())
        events.subscribe("security", lambda kind, **_: self.security_events.labels(kind).inc())
        events.subscribe("config_reload_failed", lambda **_: self.reload_errors.inc())
        events.subscribe("ivr_node_visit", lambda flow, node, **_: self.ivr_visits.labels(flow, node).inc())
        events.subscribe("rtp_relayed", lambda packets, **_: self.rtp_relayed.inc(packets))
        events.subscribe("leg_quality", self._leg_quality)
        events.subscribe("recording_saved", lambda **_: self.recordings.inc())
        events.subscribe("recording_failed", lambda **_: self.recording_failures.inc())

    def _call_ended(self, direction: str, disposition: str, **_: object) -> None:
        self.active_calls.dec()
        self.calls.labels(direction, disposition).inc()

    def _survey_answered(self, queue: str | None, score: int, **_: object) -> None:
        if queue is not None:  # a rate node in a call that met no queue is stored, but is no queue's figure
            self.csat.labels(queue).observe(score)

    def _leg_quality(self, direction: str, lost: int, mos: float, **_: object) -> None:
        self.call_mos.labels(direction).observe(mos)
        if direction == "inbound":  # pbx_rtp_packets_lost counts what the phones sent us
            self.rtp_lost.inc(lost)

    def _sip_request(self, method: str, **_: object) -> None:
        # Methods come off the wire: unknown ones share a label so an attacker cannot grow the series.
        self.sip_requests.labels(method if method in SIP_METHODS else "other").inc()

    def _queue_caller_left(self, queue: str, outcome: str, wait: float, **_: object) -> None:
        self.queue_wait.labels(queue, outcome).observe(wait)
        self.queue_calls.labels(queue, outcome).inc()

    def watch_queues(self, snapshot: Callable[[], Sequence[QueueView]]) -> None:
        """Gauges read from the queues at each scrape: callers, longest wait,
        agents by state, pending callbacks, today's service level."""
        self.registry.register(_QueueGauges(snapshot))

    def watch_voicemail(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """``pbx_voicemail_messages{mailbox,folder}`` read at each scrape from (new, old) per mailbox."""
        self.registry.register(_VoicemailGauge(counts))

    def watch_voicemail_overdue(self, overdue: Callable[[], Mapping[str, int]]) -> None:
        """``pbx_voicemail_overdue{mailbox}`` read at each scrape: messages of a
        queue's mailbox still not handled past its ``respond_within``."""
        self.registry.register(_OverdueGauge(overdue))

    def watch_trunks(self, up: Callable[[], Mapping[str, bool]]) -> None:
        """``pbx_trunk_up{trunk}`` read at each scrape: 1 while the trunk
        answers its OPTIONS (pbx.sip.qualify), 0 once one went unanswered."""
        self.registry.register(_TrunkGauge(up))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueGauges(Collector):
    def __init__(self, snapshot: Callable[[], Sequence[QueueView]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        callers = GaugeMetricFamily("pbx_queue_callers", "Callers waiting in the queue", labels=["queue"])
        longest = GaugeMetricFamily("pbx_queue_longest_wait_seconds", "How long the longest-waiting caller has waited", labels=["queue"])
        agents = GaugeMetricFamily("pbx_queue_agents", "Queue agents by state", labels=["queue", "state"])
        pending = GaugeMetricFamily("pbx_callbacks_pending", "Callbacks waiting to be placed", labels=["queue"])
        level = GaugeMetricFamily(
            "pbx_queue_service_level_ratio", "Today's calls answered within the service level, of those answered", labels=["queue"]
        )
        for queue in self.snapshot():
            callers.add_metric([queue.name], queue.callers)
            longest.add_metric([queue.name], queue.longest_wait)
            for state, count in queue.agents.items():
                agents.add_metric([queue.name, state], count)
            pending.add_metric([queue.name], queue.callbacks_pending)
            if queue.service_level is not None:
                level.add_metric([queue.name], queue.service_level)
        yield from (callers, longest, agents, pending, level)


class _VoicemailGauge(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        messages = GaugeMetricFamily("pbx_voicemail_messages", "Voicemail messages by mailbox and folder", labels=["mailbox", "folder"])
        for mailbox, (new, old) in sorted(self.counts().items()):
            messages.add_metric([mailbox, "new"], new)
            messages.add_metric([mailbox, "old"], old)
        yield messages


class _OverdueGauge(Collector):
    def __init__(self, overdue: Callable[[], Mapping[str, int]]) -> None:
        self.overdue = overdue

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "pbx_voicemail_overdue", "Messages of a queue's mailbox not handled within its respond_within", labels=["mailbox"]
        )
        for mailbox, count in sorted(self.overdue().items()):
            gauge.add_metric([mailbox], count)
        yield gauge


class _TrunkGauge(Collector):
    def __init__(self, up: Callable[[], Mapping[str, bool]]) -> None:
        self.up = up

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("pbx_trunk_up", "1 while the trunk answers OPTIONS, 0 once one went unanswered", labels=["trunk"])
        for trunk, up in sorted(self.up().items()):
            gauge.add_metric([trunk], 1 if up else 0)
        yield gauge
