"""The provisioned Grafana dashboard only asks Prometheus for metrics recloop exports.

A misspelt metric name in a panel does not fail anywhere at run time: Grafana shows an empty
graph. So the metric names are parsed out of every panel's PromQL here and looked up in
``recloop.metrics.exported_names()``; the labels the panels group and name series by must be
labels those metrics have.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop import metrics

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "recloop.json"
)

# PromQL functions and aggregation operators a panel may call (a misspelt function fails too).
FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "count", "count_over_time", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "idelta", "increase", "irate", "label_replace", "last_over_time", "ln", "max",
    "max_over_time", "min", "min_over_time", "quantile", "quantile_over_time", "rate", "resets",
    "round", "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time", "time",
    "timestamp", "topk", "vector",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset"}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# An identifier not glued to a number (1e3, 5m), a field (.x) or a Grafana variable ($x).
IDENTIFIER = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions and keywords left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries, [$__rate_interval]
    text = GROUPING.sub(" ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call:
            if word not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        elif word not in KEYWORDS:
            names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_x clauses."""
    return {
        label.strip()
        for _, inner in GROUPING.findall(expr)
        for label in inner.split(",")
        if label.strip()
    }


def _labels_of(sample_name: str) -> set[str]:
    for metric in metrics.ALL_METRICS:
        for family in metric.describe():
            suffixes = ("", "_total", "_created", "_bucket", "_sum", "_count")
            if sample_name in {family.name + s for s in suffixes}:
                # prometheus-client keeps label names privately; there is no public getter.
                labels = set(metric._labelnames)
                return labels | ({"le"} if sample_name.endswith("_bucket") else set())
    raise KeyError(sample_name)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_parser_finds_metrics_in_hand_written_queries():
    cases = {
        "recloop_sim_ctr": {"recloop_sim_ctr"},
        "time() - recloop_snapshot_created_timestamp_seconds": {
            "recloop_snapshot_created_timestamp_seconds"
        },
        "histogram_quantile(0.99, sum by (le, policy) (rate(recloop_serving_latency_seconds_bucket"
        '{policy=~"slate.*", le!="+Inf"}[$__rate_interval] offset 5m)))': {
            "recloop_serving_latency_seconds_bucket"
        },
        "1e3 * recloop_a / on (policy) group_left (version) recloop_b > bool 0": {
            "recloop_a",
            "recloop_b",
        },
    }
    for expr, expected in cases.items():
        assert metric_names(expr) == expected, expr
    assert grouping_labels("sum by (le, policy) (x) / on(topic) y") == {"le", "policy", "topic"}


def test_a_misspelt_metric_or_function_is_caught():
    exported = metrics.exported_names()
    assert not metric_names("sum(rate(recloop_records_in_totl[5m]))") <= exported
    assert not metric_names("recloop_learner_lag_message") <= exported
    with pytest.raises(ValueError, match="ratee"):
        metric_names("sum(ratee(recloop_records_in_total[5m]))")


def test_every_panel_has_a_title_and_the_prometheus_datasource(dashboard):
    panels = list(_panels(dashboard["panels"]))
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert isinstance(panel.get("title"), str) and panel["title"].strip(), panel.get("id")
        source = panel.get("datasource")
        assert isinstance(source, dict), panel["title"]
        assert source.get("type") == "prometheus" and source.get("uid"), panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource", source) == source, panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_every_query_names_only_exported_metrics(dashboard):
    exported = metrics.exported_names()
    queries = 0
    for panel in _panels(dashboard["panels"]):
        if panel.get("type") == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']!r}: no metric in {target['expr']!r}"
            unknown = names - exported
            assert not unknown, (
                f"{panel['title']!r} queries metrics recloop does not export: {unknown}"
            )
            queries += 1
    assert queries >= 10


def test_panels_group_and_name_series_by_labels_the_metrics_have(dashboard):
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            labels = set().union(*(_labels_of(n) for n in metric_names(expr)))
            assert grouping_labels(expr) <= labels, (panel["title"], expr)
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= labels, (panel["title"], legend - labels)


def test_the_dashboard_shows_what_operators_watch(dashboard):
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    used = set().union(*(metric_names(e) for e in exprs))
    wanted = {
        "recloop_learner_lag_messages",  # learner lag in messages
        "recloop_learner_lag_seconds",  # ... and in seconds
        "recloop_model_freshness_seconds",
        "recloop_snapshot_created_timestamp_seconds",  # snapshot age
        "recloop_records_in_total",  # throughput per topic
        "recloop_records_out_total",
        "recloop_dlq_total",
        "recloop_serving_latency_seconds_bucket",
        "recloop_sim_return",  # per policy version
        "recloop_sim_ctr",
    }
    assert wanted <= used, f"no panel shows {wanted - used}"
    quantiles = {m for e in exprs for m in re.findall(r"histogram_quantile\(\s*([\d.]+)", e)}
    assert {"0.5", "0.99"} <= quantiles
    per_version = [
        t for p in _panels(dashboard["panels"]) for t in p.get("targets", [])
        if metric_names(t["expr"]) & {"recloop_sim_return", "recloop_sim_ctr"}
    ]  # fmt: skip
    assert per_version and all("{{version}}" in t["legendFormat"] for t in per_version)
