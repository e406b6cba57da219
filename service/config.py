"""All service settings: one pydantic-settings class, environment prefix CELLGATE_, built once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Provider = Literal["cpu", "cuda"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service; each one is documented in the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="CELLGATE_", extra="ignore")

    # Model and runtime
    bundle: Path = Field(Path("bundles/demo"), description="Model bundle directory to serve.")
    providers: Annotated[list[Provider], NoDecode] = Field(
        default_factory=lambda: list[Provider](["cpu"]),
        description="ONNX Runtime execution providers in priority order, e.g. cuda,cpu.",
    )
    allow_provider_fallback: bool = Field(False, description="Start on CPU when CUDA is requested but unavailable.")
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads (0 = one per core).")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads.")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level."
    )
    blocklist: Path | None = Field(
        None,
        description="A blocklist file (one word per line, service/completion.py): words never suggested or "
        "sampled, on top of the bundle's own blocklist.txt.",
    )

    # HTTP
    host: str = Field("127.0.0.1", description="Bind address; 127.0.0.1 unless you mean to expose it.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger is refused with 413.")
    max_ws_message_bytes: int = Field(64 << 10, ge=1024, description="Largest WebSocket message.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty = CORS closed."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API keys (comma-separated); empty = no authentication."
    )
    rate_limit_per_second: float = Field(0.0, ge=0, description="Per-key request rate limit (0 = off).")
    rate_limit_burst: int = Field(50, ge=1, description="Requests a key may burst above its rate.")
    drain_timeout_seconds: float = Field(10.0, gt=0, description="Graceful shutdown: time given to in-flight work.")
    # Processes: 1 by default, because one process needs nothing beside it (sessions stay in its memory),
    # and because the deployments that scale — replicas behind a load balancer, Kubernetes pods — scale by
    # processes already. N > 1 shares sessions through a store (a private LMDB environment on /dev/shm
    # unless session_store names one); docs/deploy.md says when each is the better choice.
    workers: int = Field(1, ge=0, le=64, description="Serving processes on one port (0 = one per core).")
    max_auto_workers: int = Field(8, ge=1, description="Cap on workers=0's one-per-core.")
    lmdb_map_size_bytes: int = Field(
        8 << 30,
        ge=1 << 20,
        description="Largest size of an lmdb:// session store (address space; only what sessions use is memory).",
    )

    # Requests
    max_tokens_per_request: int = Field(2048, ge=1, description="Token limit per request text (413 above).")
    max_k: int = Field(50, ge=1, description="Largest k (number of suggestions) a request may ask for.")
    max_generate_words: int = Field(256, ge=1, description="Largest max_words for /generate.")

    # Sessions
    session_store: str = Field(
        "memory",
        description="'memory', a redis:// URL (shared by replicas), or lmdb:///dir (shared by processes on one host).",
    )
    session_ttl_seconds: float = Field(1800.0, gt=0, description="Idle time after which a session expires.")
    max_sessions: int = Field(100_000, ge=1, description="In-memory store capacity; least recently used is evicted.")
    session_history: int = Field(32, ge=0, description="States kept per session for rewind (0 = rewind off).")
    redis_connect_timeout_seconds: float = Field(0.5, gt=0, description="Redis connect timeout.")
    redis_socket_timeout_seconds: float = Field(0.5, gt=0, description="Redis per-operation timeout.")
    redis_max_connections: int = Field(64, ge=1, description="Redis connection pool size.")

    # Batching
    max_batch: int = Field(64, ge=1, description="Most sequences in one ONNX Runtime call.")
    max_wait_us: int = Field(500, ge=0, description="How long the first request of a batch waits for company (µs).")
    queue_size: int = Field(1024, ge=1, description="Requests waiting for inference; more get 503 overloaded.")
    queue_timeout_seconds: float = Field(2.0, gt=0, description="Longest a request may wait in the queue.")

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # Off by default, as in vLLM: at full load one JSON line per request cost ~30 % of throughput on the
    # 2x256 model (7.5k -> 5.4k req/s, docs/benchmarks.md); metrics carry the aggregate view.
    access_log: bool = Field(False, description="Structured JSON access log, one line per request.")

    @field_validator("providers", "cors_origins", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("providers")
    @classmethod
    def _providers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one provider is required")
        return value
