"""Every Prometheus metric of the service, defined once and handed to the parts that count.

Naming: prefix `cellgate_`, base units (`_seconds`, `_bytes`), `_total` on counters, and labels
with bounded values only (route templates, never a session id or a raw path).

With `--workers N` (PROMETHEUS_MULTIPROC_DIR set by the supervisor) every worker writes its values to
files in that directory and a scrape of any worker reads all of them (prometheus_client's multiprocess
mode): counters and histograms are summed over the workers, each gauge is combined as its
`multiprocess_mode` below says, and `process_*` carry one series per live worker (label `pid`). One
scrape of the port is the whole service; Prometheus' own `instance` still tells replicas apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

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


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


class WorkerProcessCollector(Collector):
    """process_resident_memory_bytes and process_cpu_seconds_total of every live worker, labelled by pid.

    A worker's live gauges have files named after its pid in the multiprocess directory until the
    supervisor marks it dead, so the directory is the list of live workers; their figures come from /proc.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        memory = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of each worker.", labels=["pid"])
        cpu = CounterMetricFamily("process_cpu_seconds_total", "CPU time of each worker.", labels=["pid"])
        pids = {m.group(1) for f in os.listdir(self.directory) if (m := _LIVE_FILE.match(f))}
        for pid in sorted(pids):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited since its files were read
                continue
            cpu.add_metric([pid], (int(stat[11]) + int(stat[12])) / self.ticks)
            memory.add_metric([pid], int(stat[21]) * self.page)
        yield memory
        yield cpu


class Metrics:
    """The service's metrics on one registry (a fresh registry per app keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        directory = os.environ.get(MULTIPROCESS_DIR)
        self.multiprocess = registry is None and bool(directory)
        r: CollectorRegistry | None = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        elif directory:
            # Values go to the shared files whatever registry a metric names; the scrape reads the files, so
            # the metrics themselves are registered nowhere (else this worker's would be exposed twice).
            MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
            self.registry.register(WorkerProcessCollector(directory))
            r = None
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
        self.in_flight = Gauge(
            "cellgate_http_requests_in_flight", "HTTP requests being handled.", registry=r, multiprocess_mode="livesum"
        )
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
        self.queue_depth = Gauge(
            "cellgate_queue_depth", "Requests waiting for inference.", registry=r, multiprocess_mode="livesum"
        )
        self.queue_capacity = Gauge(
            "cellgate_queue_capacity", "Most requests that may wait.", registry=r, multiprocess_mode="livesum"
        )
        self.overloaded = Counter("cellgate_overloaded", "Requests refused because the queue was full.", registry=r)
        self.tokens = Counter(
            "cellgate_tokens_processed", "Tokens run through the model.", ["kind"], registry=r
        )  # kind: prefill (session creation, /predict), step, generated
        # Sampled from the store at scrape time; with workers the store is shared, so the latest sample is the count.
        self.active_sessions = Gauge(
            "cellgate_active_sessions", "Sessions held by the store.", registry=r, multiprocess_mode="livemostrecent"
        )
        self.sessions_created = Counter("cellgate_sessions_created", "Sessions created (including forks).", registry=r)
        self.sessions_ended = Counter(
            "cellgate_sessions_ended", "Sessions that ended, by reason.", ["reason"], registry=r
        )  # reason: deleted, expired, evicted_capacity
        self.step_conflicts = Counter("cellgate_step_conflicts", "Steps refused with step_conflict.", registry=r)
        self.replays = Counter(
            "cellgate_idempotent_replays", "Retried steps answered from the stored response.", registry=r
        )
        self.websocket_connections = Gauge(
            "cellgate_websocket_connections", "Open WebSocket streams.", registry=r, multiprocess_mode="livesum"
        )
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
            multiprocess_mode="livemax",
        )
        # livemin: with workers, 0 while any live worker is not ready.
        self.ready = Gauge(
            "cellgate_ready", "1 when the service answers /readyz with 200.", registry=r, multiprocess_mode="livemin"
        )
        # A gauge rather than an Info, which multiprocess mode cannot hold; the exposition is the same sample,
        # cellgate_build_info{version="..."} 1.
        self.build_info = Gauge(
            "cellgate_build_info",
            "Version of the cellgate package.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
