"""The client's typed answers. Import them from cellgate.client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prediction:
    word: str
    prob: float


def _predictions(items: list[dict[str, Any]]) -> list[Prediction]:
    return [Prediction(str(p["word"]), float(p["prob"])) for p in items]


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    tokens: int
    unknown: list[str]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PredictResult:
        return cls(_predictions(body["predictions"]), int(body["tokens"]), list(body.get("unknown", [])))


@dataclass(frozen=True)
class StepResult:
    """A session's step after a request, and the suggestions its state gives."""

    session_id: str
    step: int
    predictions: list[Prediction]
    expires_at: float
    unknown: list[str] = field(default_factory=list)
    explain: dict[str, Any] | None = None  # gates per token and layer; absent from a replayed answer

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StepResult:
        return cls(
            str(body["session_id"]),
            int(body["step"]),
            _predictions(body["predictions"]),
            float(body["expires_at"]),
            list(body.get("unknown") or []),
            body.get("explain"),
        )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    step: int
    created_at: float
    last_used_at: float
    expires_at: float
    model_version: str
    oldest_step: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelInfo:
    version: str
    vocab_size: int
    layers: int
    hidden_size: int
    providers: list[str]
    quantized: str | None
    metrics: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Generated:
    session_id: str
    words: list[str]
    text: str
    step: int
