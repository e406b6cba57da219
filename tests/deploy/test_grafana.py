"""deploy/grafana: the provisioned datasource and dashboard, checked against a live /metrics and a real Prometheus."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import ALERTS, Prometheus
from tests.deploy.promql import exposed_names, metric_names
from tests.deploy.tools import DEPLOY, ROOT, poll
from tests.deploy.traffic import exercise
from tests.servers import ServerProcess

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cellgate.json"
# Series Prometheus makes itself rather than scraping them.
SYNTHETIC = {"up"}
# What the issue asks the dashboard to show, as words that must appear in some panel title.
REQUIRED_PANELS = {
    "throughput": ("Throughput", "route", "status"),
    "latency": ("latency", "p50", "p99"),
    "batch size": ("Batch size",),
    "queue wait": ("Queue wait",),
    "active sessions": ("Active sessions",),
    "evictions / ends": ("ended", "reason"),
    "tokens/s": ("Tokens per second",),
    "store latency": ("Store latency",),
}


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def _exprs() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in _panels() for target in panel["targets"]]


def _for_prometheus(expr: str) -> str:
    """A panel query as Grafana would send it, with the dashboard's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_metric_names_reads_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route!~".*/x|b_total"}[5m]))) / on(job) c'
    assert metric_names(expr) == {"a_bucket", "c"}
    assert metric_names('absent(up{job="cellgate"} == 1) or vector(0)') == {"up"}
    assert metric_names("sum(rate(x_total[$__rate_interval])) by (kind) > bool 0.5") == {"x_total"}


def test_dashboard_is_well_formed_and_complete() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    all_panels = dashboard["panels"]
    assert len({panel["id"] for panel in all_panels}) == len(all_panels), "panel ids must be unique"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in _panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        box = panel["gridPos"]
        assert 0 <= box["x"] < box["x"] + box["w"] <= 24, panel["title"]
        assert box["h"] > 0, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["refId"], panel["title"]
    titles = " | ".join(panel["title"] for panel in _panels())
    for need, words in REQUIRED_PANELS.items():
        assert any(all(word in panel["title"] for word in words) for panel in _panels()), f"no {need} panel: {titles}"


def test_provisioning_points_at_the_compose_services() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in compose["services"]
    assert f"--web.listen-address=:{port}" in compose["services"][host]["command"]
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cellgate.yml").read_text())["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_every_panel_and_alert_names_only_metrics_the_live_service_exposes(server: ServerProcess) -> None:
    exercise(server.url)
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    exposed = exposed_names(response.text) | SYNTHETIC
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    queries = _exprs() + [(rule["alert"], rule["expr"]) for rule in rules]
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} not on /metrics"


# Panels that stay empty on a healthy service: a labelled counter has no series until its first increment.
MAY_BE_EMPTY = {"Store errors"}


@pytest.mark.slow
def test_every_panel_query_runs_on_a_real_prometheus(prometheus: Prometheus, server: ServerProcess) -> None:
    exercise(server.url)
    # rate() over 1m needs two scrapes after the traffic; wait for the throughput panel to have data.
    poll(lambda: prometheus.query("sum(rate(cellgate_http_requests_total[1m])) > 0"), 60, "a request rate")
    for title, expr in _exprs():
        result = prometheus.query(_for_prometheus(expr))  # asserts Prometheus accepted the query
        if title not in MAY_BE_EMPTY:
            assert result, f"{title}: {expr!r} returned no series"
