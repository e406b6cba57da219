"""Metrics: Prometheus naming conventions on a fresh registry, live values after real traffic, and the
structured JSON access log with its X-Request-ID."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, STORE_BUCKETS, Metrics
from tests.deploy.traffic import exercise
from tests.servers import ServerProcess, running_server

RUNTIME_PREFIXES = ("process_", "python_")  # prometheus_client's own collectors
UNBOUNDED_LABELS = {"session_id", "path", "id", "request_id", "text", "word", "client", "key", "api_key"}


def test_every_metric_follows_the_naming_conventions() -> None:
    metrics = Metrics()
    families = list(metrics.registry.collect())
    ours = [f for f in families if not f.name.startswith(RUNTIME_PREFIXES)]
    assert len(ours) >= 20
    for family in ours:
        assert family.name.startswith("cellgate_"), family.name
        assert family.documentation, f"{family.name} has no help text"
        if family.type == "counter":
            assert not family.name.endswith("_total"), "prometheus_client appends _total itself"
        if family.type == "histogram" and family.name != "cellgate_batch_size":
            assert family.name.endswith("_seconds"), f"{family.name}: base unit seconds"
    # Every metric the class defines (found by type, so a new one is covered without touching this test).
    defined = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    assert len(defined) == len(ours)
    labels = {name for metric in defined for name in metric._labelnames}
    assert not labels & UNBOUNDED_LABELS, labels & UNBOUNDED_LABELS


def test_buckets_cover_sub_millisecond_to_seconds() -> None:
    for buckets in (LATENCY_BUCKETS, STORE_BUCKETS, BATCH_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    assert LATENCY_BUCKETS[0] <= 0.0001
    assert LATENCY_BUCKETS[-1] >= 5.0
    assert sum(1 for b in LATENCY_BUCKETS if b < 0.001) >= 3  # a next-word step lives below a millisecond
    assert STORE_BUCKETS[0] <= 0.0001
    assert STORE_BUCKETS[-1] >= 0.5
    assert BATCH_BUCKETS[0] == 1


def test_each_app_gets_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("/v1/predict", "POST", "200").inc(3)
    labels = {"route": "/v1/predict", "method": "POST", "status": "200"}
    assert first.registry.get_sample_value("cellgate_http_requests_total", labels) == 3.0
    assert second.registry.get_sample_value("cellgate_http_requests_total", labels) is None


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(exposition: str) -> Samples:
    """Every sample of a /metrics text by sample name (e.g. cellgate_http_requests_total)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples called name whose labels include the given ones (0 when there are none)."""
    return sum(value for have, value in samples.get(name, []) if all(have.get(k) == v for k, v in labels.items()))


def test_live_metrics_count_real_traffic_with_bounded_labels(server: ServerProcess) -> None:
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    exercise(server.url)
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    after = _samples(text)

    def grew(name: str, **labels: str) -> bool:
        return _value(after, name, **labels) > _value(before, name, **labels)

    steps = "/v1/sessions/{session_id}/steps"
    assert grew("cellgate_http_requests_total", route=steps, method="POST", status="200")
    assert grew("cellgate_http_requests_total", route=steps, method="POST", status="409")
    assert grew("cellgate_http_requests_total", route="unmatched", method="GET", status="404")
    assert grew("cellgate_http_request_duration_seconds_count", route=steps, method="POST")
    for kind in ("prefill", "step", "generated"):
        assert grew("cellgate_tokens_processed_total", kind=kind), kind
    assert grew("cellgate_sessions_created_total")
    assert grew("cellgate_sessions_ended_total", reason="deleted")
    assert grew("cellgate_step_conflicts_total")
    assert grew("cellgate_idempotent_replays_total")
    assert grew("cellgate_websocket_messages_total", outcome="ok")
    assert grew("cellgate_errors_total", code="step_conflict")
    assert grew("cellgate_errors_total", code="validation_error")
    assert grew("cellgate_inference_duration_seconds_count")
    assert grew("cellgate_batch_size_count")
    assert grew("cellgate_queue_wait_seconds_count")
    assert grew("cellgate_store_operation_duration_seconds_count", operation="get")
    assert _value(after, "cellgate_queue_capacity") > 0
    assert _value(after, "cellgate_active_sessions") >= 1
    assert _value(after, "cellgate_ready") == 1.0  # exercise() asked /readyz
    [(model_labels, model_value)] = after["cellgate_model_info"]
    assert model_value == 1.0
    assert set(model_labels) == {"version", "providers", "quantized"}
    assert "CPU" in model_labels["providers"]
    [(build_labels, _)] = after["cellgate_build_info"]
    assert build_labels["version"]
    assert "process_resident_memory_bytes" in after
    # Never a raw path or a session id as a label value: every route label is a template.
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert routes
    assert all(not re.search(r"/[A-Za-z0-9_\-]{16,}", r) for r in routes), routes


def _log_lines(server: ServerProcess, request_id: str, deadline: float) -> list[dict[str, object]]:
    """The server's JSON log records that carry this request id (polled: the log is written after the response)."""
    while True:
        found = []
        for line in list(server.log):
            if request_id in line:
                found.append(json.loads(line))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_access_log_is_json_with_the_request_id_echoed(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, {"CELLGATE_ACCESS_LOG": "true"}) as server:
        given = "trace-4f2a.9_b"
        response = httpx.post(
            f"{server.url}/v1/predict", json={"text": "i stay in", "k": 2}, headers={"X-Request-ID": given}
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == given
        [record] = _log_lines(server, given, time.monotonic() + 10)
        assert record["name"] == "cellgate.access"
        assert record["request_id"] == given
        assert record["method"] == "POST"
        assert record["route"] == "/v1/predict"
        assert record["status"] == 200
        assert isinstance(record["duration_ms"], float | int)
        assert record["duration_ms"] >= 0

        # No id, or one that is not a safe token: the service makes one up and logs that one.
        for headers in ({}, {"X-Request-ID": "bad id\twith spaces"}, {"X-Request-ID": "x" * 200}):
            missing = httpx.get(f"{server.url}/v1/sessions/{'Q' * 32}", headers=headers)
            assert missing.status_code == 404
            made_up = missing.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{16}", made_up), made_up
            [record] = _log_lines(server, made_up, time.monotonic() + 10)
            assert record["status"] == 404
            assert record["route"] == "/v1/sessions/{session_id}"


def test_every_error_answer_is_counted_once_by_its_code(server: ServerProcess) -> None:
    """Errors answered by the middleware, the raw step path, the app's handlers and the WebSocket all reach
    cellgate_errors_total, each exactly once."""
    sid = httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay"}).json()["session_id"]
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    too_large = b'{"text": "' + b"a " * (1 << 20) + b'"}'
    answers = [
        # the middleware: refused from Content-Length, and a chunked body read up to the limit
        httpx.post(f"{server.url}/v1/predict", content=too_large, headers={"content-type": "application/json"}),
        httpx.post(f"{server.url}/v1/predict", content=iter([too_large]), headers={"content-type": "text/plain"}),
        # the raw step path, and the FastAPI route behind it
        httpx.post(f"{server.url}/v1/sessions/{'Z' * 32}/steps", json={"text": "a"}),
        httpx.post(f"{server.url}/v1/sessions/{sid}/steps", json={"text": "a", "k": 0}),
        # the framework's own errors, as errors of the hierarchy
        httpx.get(f"{server.url}/v1/nothing"),
        httpx.put(f"{server.url}/v1/predict"),
    ]
    assert [a.status_code for a in answers] == [413, 413, 404, 422, 404, 405]
    with ws_connect(f"{server.url.replace('http', 'ws')}/v1/sessions/{'Z' * 32}/stream") as ws:
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "session_not_found"
    with ws_connect(f"{server.url.replace('http', 'ws')}/v1/sessions/{sid}/stream") as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "validation_error"
    after = _samples(httpx.get(f"{server.url}/metrics").text)
    expected = {"payload_too_large": 2, "session_not_found": 2, "validation_error": 2, "not_found": 1}
    expected["method_not_allowed"] = 1
    for code, count in expected.items():
        grown = _value(after, "cellgate_errors_total", code=code) - _value(before, "cellgate_errors_total", code=code)
        assert grown == count, code
    assert [a.json()["error"]["code"] for a in answers] == [
        "payload_too_large",
        "payload_too_large",
        "session_not_found",
        "validation_error",
        "not_found",
        "method_not_allowed",
    ]
