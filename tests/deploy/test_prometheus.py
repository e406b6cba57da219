"""deploy/prometheus: promtool checks, alert unit tests, and a real Prometheus scraping a live service."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import ALERTS, PROMETHEUS, Prometheus
from tests.deploy.tools import poll, require, run
from tests.deploy.traffic import exercise
from tests.servers import ServerProcess

P99 = "histogram_quantile(0.99, sum by (le) (rate(cellgate_http_request_duration_seconds_bucket[1m])))"


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_config() -> None:
    result = run([require("promtool", "prometheus"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([require("promtool", "prometheus"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run([require("promtool", "prometheus"), "test", "rules", str(PROMETHEUS / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_runbook_and_fires_and_stays_quiet_in_its_unit_tests() -> None:
    rules = _rules()
    names = {rule["alert"] for rule in rules}
    for topic in ("ErrorRate", "Latency", "Queue", "Overloaded", "Store", "Down"):
        assert any(topic in name for name in names), f"no alert about {topic}"
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in rules:
        annotations = rule["annotations"]
        runbook = annotations["runbook"]
        assert len(runbook) > 60, f"{rule['alert']}: runbook is too short to help"
        assert runbook.rstrip().endswith("."), f"{rule['alert']}: runbook is not a sentence"
        assert annotations["summary"]
        assert annotations["description"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown quiet"


def test_promtool_check_metrics_on_live_output(server: ServerProcess) -> None:
    exercise(server.url)
    exposition = httpx.get(f"{server.url}/metrics").text
    assert "cellgate_http_requests_total" in exposition
    result = run([require("promtool", "prometheus"), "check", "metrics"], input=exposition)
    # promtool prints one line per lint problem; a clean exposition prints nothing.
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.slow
def test_real_prometheus_scrapes_the_live_service(prometheus: Prometheus, server: ServerProcess) -> None:
    assert poll(lambda: prometheus.scalar('up{job="cellgate"}') == 1.0, 60, "up == 1")

    total = 'sum(cellgate_http_requests_total{job="cellgate"})'
    exercise(server.url)
    first = poll(lambda: prometheus.scalar(total), 60, "request counters in Prometheus")
    sent = exercise(server.url)
    # The second batch of traffic must show up as an increase of at least the requests sent.
    poll(lambda: (prometheus.scalar(total) or 0) >= first + sent, 60, f"the counter to grow from {first} by {sent}")

    def p99() -> float | None:
        value = prometheus.scalar(P99)
        return value if value is not None and math.isfinite(value) else None

    assert poll(p99, 60, "a finite p99 from histogram_quantile") > 0

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = rules and all(rule["health"] == "ok" for rule in rules)
        return rules if done else None

    # Every alert rule evaluates without error against the live series.
    assert {rule["name"] for rule in poll(rules_evaluated, 60, "alert rules evaluated")} == {
        rule["alert"] for rule in _rules()
    }
    assert prometheus.query('ALERTS{alertname="CellgateInstanceDown"}') == []
