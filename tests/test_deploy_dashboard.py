"""The Grafana dashboard (deploy/grafana) asks only for metrics and labels Detour exports."""

from __future__ import annotations

import json
import re

from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import Metrics
from proxy.webhook import WebhookMetrics
from tests.support import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "detour-dashboard.json"


_SCRAPE_LABELS = {"namespace", "instance", "job", "pod", "node", "le"}


def exported_series() -> dict[str, set[str]]:
    """Every sample name the proxy and the webhook export, with the labels it can carry."""
    series: dict[str, set[str]] = {}
    wrappers = [*vars(Metrics()).values(), *vars(WebhookMetrics()).values()]
    for metric in wrappers:
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind = metric._name, str(metric._type)
        labels = set(metric._labelnames)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "gauge": [""],
        }[kind]
        for suffix in suffixes:
            series[name + suffix] = labels
    return series


def test_dashboard_uses_real_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported_series()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\bdetour_[a-z_]+\b", expr))
        assert names, expr
        unknown = names - set(series)
        assert not unknown, f"{expr}: {sorted(unknown)} not exported"
        used |= names
        allowed = set().union(*(series[n] for n in names)) | _SCRAPE_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= allowed, f"{expr}: labels {sorted(labels - allowed)}"
        for label in re.findall(r'(\w+)=~?"', expr):
            assert label in allowed, f"{expr}: label {label}"
    # The panels the issue asks for are there.
    assert {
        "detour_cache_requests_total",
        "detour_served_bytes_total",
        "detour_upstream_requests_total",
        "detour_upstream_request_duration_seconds_bucket",
        "detour_webhook_images_rewritten_total",
        "detour_webhook_skips_total",
    } <= used
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
