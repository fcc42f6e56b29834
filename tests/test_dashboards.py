"""The Grafana dashboard and the Prometheus alert rules, read as files: each query parses as
PromQL and names only metrics that llmq's code defines. No Grafana or Prometheus is needed."""

import json
import re
from functools import cache
from pathlib import Path

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "llmq.json"
ALERTS = ROOT / "ops" / "alerts.yml"
DATASOURCES = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# What the dashboard must show, as panel titles.
REQUIRED_PANELS = {
    "Queue depth per model",
    "Jobs per second by status",
    "Tokens per second",
    "End-to-end latency",
    "Time to first token",
    "Batch size",
    "Cache hit rate",
    "Errors by category",
    "Live workers",
}
REQUIRED_ALERTS = {"LlmqQueueGrowing", "LlmqNoWorker", "LlmqHighErrorRate"}
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}
# Grafana fills these in before Prometheus sees the query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$model": ".*"}


@cache
def defined_series() -> frozenset[str]:
    """Every sample name the API's and the workers' metrics can expose."""
    from prometheus_client import REGISTRY

    import api.metrics
    import llmq.metrics  # noqa: F401
    import workers.metrics  # noqa: F401
    import workers.remote.metrics  # noqa: F401

    families = [
        *REGISTRY.collect(),
        *api.metrics.QueueCollector.families(),
        *api.metrics.BatchCollector.families(),
        api.metrics.UpstreamCollector.family(),
    ]
    names = set()
    for family in families:
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        names |= {base + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return frozenset(name for name in names if name.startswith("llmq_"))


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression selects; raises if it does not parse."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_metric_name_check_rejects_unknown_names_and_bad_promql():
    assert metric_names("sum(rate(llmq_jobs_finished_total[5m]))") <= defined_series()
    assert not metric_names("rate(llmq_no_such_metric_total[5m])") <= defined_series()
    with pytest.raises(ValueError):
        metric_names("sum(rate(llmq_jobs_finished_total[5m])")


def test_dashboard_has_the_required_panels():
    titles = {panel["title"] for panel in panels()}
    assert REQUIRED_PANELS <= titles, f"missing panels: {sorted(REQUIRED_PANELS - titles)}"
    assert dashboard()["uid"] and dashboard()["title"]
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"


def test_dashboard_panels_query_the_provisioned_datasource_with_placed_grid():
    uids = {source["uid"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    for panel in panels():
        assert panel["datasource"]["uid"] in uids, panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] in uids, panel["title"]
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"


def test_dashboard_queries_parse_and_name_only_defined_metrics():
    for panel in panels():
        for target in panel["targets"]:
            try:
                names = metric_names(target["expr"])
            except ValueError as exc:
                raise AssertionError(f"{panel['title']}: {target['expr']}: {exc}") from exc
            assert names, f"{panel['title']}: the query selects no metric"
            unknown = names - defined_series()
            assert not unknown, f"{panel['title']} queries metrics no code defines: {unknown}"


def test_dashboard_model_variable_reads_a_defined_metric():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    query = variables["model"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    metric = re.fullmatch(r"label_values\((\w+),\s*model\)", query)
    assert metric and metric.group(1) in defined_series(), query


def test_alert_rules_parse_and_cover_the_required_alerts():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= {rule.get("alert") for rule in rules}
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names and names <= defined_series(), f"{rule['alert']}: {names}"
        assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_queue_growing_alert_waits_five_minutes():
    rule = next(rule for rule in alert_rules() if rule["alert"] == "LlmqQueueGrowing")
    assert promql_parser.parse_duration(rule["for"]).total_seconds() == 300
    assert "llmq_queue_depth" in metric_names(rule["expr"])


def test_error_rate_alert_fires_above_five_percent():
    rule = next(rule for rule in alert_rules() if rule["alert"] == "LlmqHighErrorRate")
    expr = promql_parser.parse(rule["expr"])
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == ">"
    assert isinstance(expr.rhs, promql_parser.NumberLiteral) and expr.rhs.val == 0.05
