"""deploy/grafana: the dashboard and the alert rules parse, are well formed, and their PromQL names
only metrics and labels the services define (collected from the code's own metric objects).

PromQL syntax itself is not parsed here (no PromQL parser on PyPI); run `promtool check rules
deploy/grafana/alerts.yaml` where Prometheus is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase
from rahatback_api.metrics import ApiMetrics
from rahatback_notifier import metrics as notifier_metrics
from rahatback_scheduler.metrics import Metrics as SchedulerMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/rahatback-overview.json"
ALERTS = ROOT / "deploy/grafana/alerts.yaml"

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
_METRIC = re.compile(r"\brahatback_[a-z0-9_]+")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TEMPLATE_LABEL = re.compile(r"\{\{\s*\$?(?:labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def defined_metrics() -> dict[str, set[str]]:
    """Every sample name the services can expose → its label names."""
    samples: dict[str, set[str]] = {}

    def add(name: str, kind: str, labels: tuple[str, ...]) -> None:
        for suffix in SUFFIXES[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            samples[f"{name}{suffix}"] = set(labels) | extra

    api = ApiMetrics(offline_after_seconds=30)
    for family in api.state.describe():
        add(family.name, family.type, tuple(family._labelnames))  # type: ignore[attr-defined]
    wrappers: list[MetricWrapperBase] = [api.http]
    scheduler = SchedulerMetrics()
    wrappers += [v for v in vars(scheduler).values() if isinstance(v, MetricWrapperBase)]
    wrappers += [v for v in vars(notifier_metrics).values() if isinstance(v, MetricWrapperBase)]
    assert len(wrappers) >= 1 + 6 + 5
    for wrapper in wrappers:
        for family in wrapper.describe():
            add(family.name, family.type, tuple(wrapper._labelnames))
    return samples


DEFINED = defined_metrics()


def problems(expr: str, templates: str = "") -> list[str]:
    """Unknown metric names, and label names none of the expression's metrics carry."""
    query = expr.replace("$__rate_interval", "5m")
    names = set(_METRIC.findall(query))
    found = [f"unknown metric {n}" for n in sorted(names) if n not in DEFINED]
    known_labels = set().union(*(DEFINED.get(n, set()) for n in names)) if names else set()
    selectors = _SELECTOR.findall(re.sub(r'"[^"]*"', '""', query))
    used = {label for selector in selectors for label in _MATCHER_LABEL.findall(selector)}
    for grouping in _GROUPING.findall(query):
        used |= {label.strip() for label in grouping.split(",") if label.strip()}
    used |= set(_TEMPLATE_LABEL.findall(templates))
    found += [f"label {label} is on none of {sorted(names)}" for label in sorted(used - known_labels)]
    return found


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t) for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_the_name_check_catches_typos() -> None:
    assert problems("rahatback_backup_last_succes_timestamp_seconds") == [
        "unknown metric rahatback_backup_last_succes_timestamp_seconds"
    ]
    # `job` is the scrape job's label; ours is job_name
    assert problems('max by (job) (rahatback_backup_overdue{job="x"})') == [
        "label job is on none of ['rahatback_backup_overdue']"
    ]
    assert problems("sum by (le) (rate(rahatback_http_request_duration_seconds_bucket[5m]))") == []
    assert problems("rahatback_notifier_notifications_sent_total", "{{kind}} {{ $labels.nope }}") == [
        "label nope is on none of ['rahatback_notifier_notifications_sent_total']"
    ]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "rahatback-overview" and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job_name"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
    titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "by status",
        "since last successful",
        "throughput",
        "sizes",
        "agents online",
        "lag",
        "notification",
    ):
        assert topic in titles, f"the dashboard shows no {topic!r} panel"


def test_dashboard_queries_name_only_defined_metrics_and_labels() -> None:
    targets = dashboard_targets()
    assert len(targets) >= 15
    for title, target in targets:
        assert _METRIC.search(target["expr"]), f"{title}: no rahatback metric"
        found = problems(target["expr"].replace("$job_name", ".*"), target.get("legendFormat", ""))
        assert not found, f"{title}: {found}"
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]["definition"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()  # type: ignore[union-attr]
    assert label in DEFINED[metric]


def test_alert_rules_are_well_formed_and_name_defined_metrics() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    for wanted in (
        "RahatBackBackupFailed",
        "RahatBackBackupOverdue",
        "RahatBackAgentOffline",
        "RahatBackConsumerLagGrowing",
    ):
        assert wanted in names
    assert len(names) == len(rules), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert {"summary", "description"} <= rule["annotations"].keys()
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        annotations = " ".join(rule["annotations"].values())
        found = problems(rule["expr"], annotations.replace("$value", ""))
        assert not found, f"{rule['alert']}: {found}"
