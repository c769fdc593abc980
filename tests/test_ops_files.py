"""The operations files in config/: the Grafana dashboard uses only metrics
of CONTRACT §5 that the server exposes, and covers the call and queue ones;
the systemd unit example stops the server gracefully and runs it confined."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path
from typing import Any

from pbx.config.model import SipConfig
from pbx.events import EventBus
from pbx.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "config" / "grafana" / "pbx.json"
UNIT = REPO / "config" / "pbx.service"

# CONTRACT §5, by kind: dashboards are written against these names.
CONTRACT_COUNTERS = {
    "pbx_calls_total", "pbx_sip_requests_total", "pbx_sip_responses_total", "pbx_auth_failures_total",
    "pbx_ivr_node_visits_total", "pbx_queue_calls_total", "pbx_callbacks_total", "pbx_recordings_total",
    "pbx_rtp_packets_lost_total", "pbx_config_reload_errors_total",
}  # fmt: skip
CONTRACT_GAUGES = {
    "pbx_active_calls", "pbx_registrations", "pbx_queue_callers", "pbx_queue_longest_wait_seconds",
    "pbx_queue_service_level_ratio", "pbx_queue_agents", "pbx_callbacks_pending", "pbx_voicemail_messages",
}  # fmt: skip
CONTRACT_HISTOGRAMS = {"pbx_queue_wait_seconds", "pbx_call_mos"}
# What the dashboard must show: the queue and call metrics.
WANTED = {
    "pbx_active_calls", "pbx_calls_total", "pbx_queue_callers", "pbx_queue_longest_wait_seconds",
    "pbx_queue_service_level_ratio", "pbx_queue_wait_seconds", "pbx_queue_agents", "pbx_callbacks_pending",
    "pbx_callbacks_total", "pbx_registrations", "pbx_auth_failures_total", "pbx_voicemail_messages", "pbx_call_mos",
}  # fmt: skip
_METRIC = re.compile(r"\bpbx_[a-z0-9_]+")


def series(name: str) -> str:
    """The metric a sample name belongs to: a histogram's _bucket/_sum/_count go to the histogram."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in CONTRACT_HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def used_metrics(dashboard: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {series(name) for expr in exprs for name in _METRIC.findall(expr)}


def exposed_metrics() -> set[str]:
    """Every metric name the server's /metrics can show, from its registry."""
    metrics = Metrics(EventBus())
    metrics.watch_queues(lambda: [])
    metrics.watch_voicemail(lambda: {})
    names = set()
    for family in metrics.registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_the_dashboard_uses_contract_metrics_the_server_exposes_and_covers_calls_and_queues() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = used_metrics(dashboard)
    assert used <= CONTRACT_COUNTERS | CONTRACT_GAUGES | CONTRACT_HISTOGRAMS, used - (CONTRACT_COUNTERS | CONTRACT_GAUGES | CONTRACT_HISTOGRAMS)
    assert used <= exposed_metrics(), used - exposed_metrics()
    assert WANTED <= used, WANTED - used
    # Counters are only ever read as rates or increases, histograms through their buckets or sums.
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for name in _METRIC.findall(target["expr"]):
                if name in CONTRACT_COUNTERS:
                    assert re.search(rf"(rate|increase)\({name}\b", target["expr"]), (panel["title"], target["expr"])
                assert name not in CONTRACT_HISTOGRAMS, (panel["title"], target["expr"])


def test_the_dashboard_imports_with_a_prometheus_datasource_variable_and_a_tidy_grid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["queue"]["includeAll"] and variables["queue"]["multi"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_the_systemd_unit_stops_gracefully_within_its_timeout_and_is_confined() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/pbx/.venv/bin/pbx serve --config /etc/pbx/pbx.yaml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    # systemd must not SIGKILL a server that is still draining (sip.drain_timeout) and flushing.
    assert int(service["TimeoutStopSec"]) >= SipConfig.drain_timeout + 15
    assert service["User"] not in ("root", "0") and service["EnvironmentFile"].startswith("/etc/pbx/")
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == service["WorkingDirectory"] == "/var/lib/pbx"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
