"""Every Prometheus metric of the service, defined once and handed to the parts that count.

Naming: prefix `cellgate_`, base units (`_seconds`, `_bytes`), `_total` on counters, and labels
with bounded values only (route templates, never a session id or a raw path).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

# Why these buckets: one ONNX Runtime step of a small LSTM takes 50 µs to a few ms, a batched step
# 1-20 ms, a 2,048-token prefill or a long generation up to about a second, and anything past 5 s
# is an outage. The buckets resolve the sub-millisecond range a next-word API lives in and still
# catch the tail.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Store operations: in-process dict lookups are microseconds, Redis on a LAN 0.1-2 ms.
STORE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
# Batch sizes: powers of two up to the largest max_batch we expect anyone to configure.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The service's metrics on one registry (a fresh registry per app keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "cellgate_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "cellgate_http_request_duration_seconds",
            "Time from request received to response sent.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("cellgate_http_requests_in_flight", "HTTP requests being handled.", registry=r)
        self.inference_duration = Histogram(
            "cellgate_inference_duration_seconds",
            "Time of one ONNX Runtime call.",
            ["graph"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cellgate_batch_size", "Sequences per ONNX Runtime call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "cellgate_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cellgate_queue_depth", "Requests waiting for inference.", registry=r)
        self.queue_capacity = Gauge("cellgate_queue_capacity", "Most requests that may wait.", registry=r)
        self.overloaded = Counter("cellgate_overloaded", "Requests refused because the queue was full.", registry=r)
        self.tokens = Counter(
            "cellgate_tokens_processed", "Tokens run through the model.", ["kind"], registry=r
        )  # kind: prefill (session creation, /predict), step, generated
        self.active_sessions = Gauge("cellgate_active_sessions", "Sessions held by this process's store.", registry=r)
        self.sessions_created = Counter("cellgate_sessions_created", "Sessions created (including forks).", registry=r)
        self.sessions_ended = Counter(
            "cellgate_sessions_ended", "Sessions that ended, by reason.", ["reason"], registry=r
        )  # reason: deleted, expired, evicted_capacity
        self.step_conflicts = Counter("cellgate_step_conflicts", "Steps refused with step_conflict.", registry=r)
        self.replays = Counter(
            "cellgate_idempotent_replays", "Retried steps answered from the stored response.", registry=r
        )
        self.websocket_connections = Gauge("cellgate_websocket_connections", "Open WebSocket streams.", registry=r)
        self.websocket_messages = Counter(
            "cellgate_websocket_messages", "WebSocket messages answered, by outcome.", ["outcome"], registry=r
        )
        self.store_duration = Histogram(
            "cellgate_store_operation_duration_seconds",
            "Session store operation latency.",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "cellgate_store_errors", "Session store operations that failed.", ["operation"], registry=r
        )
        self.errors = Counter("cellgate_errors", "Error responses by machine code.", ["code"], registry=r)
        self.blocked_words = Gauge(
            "cellgate_blocked_words", "Vocabulary words the blocklists keep out of every answer.", registry=r
        )
        self.blocked_suggestions = Counter(
            "cellgate_blocked_suggestions",
            "Blocked words withheld from an answer they would have been in, by where.",
            ["where"],
            registry=r,
        )  # where: predictions (ranked next words), completion (a prefix's words), generation (the most likely word)
        self.model_info = Gauge(
            "cellgate_model_info",
            "The model being served (value is always 1).",
            ["version", "providers", "quantized"],
            registry=r,
        )
        self.ready = Gauge("cellgate_ready", "1 when the service answers /readyz with 200.", registry=r)
        self.build_info = Info("cellgate_build", "Version of the cellgate package.", registry=r)
