"""Request and response bodies: the contract clients code against (also the OpenAPI schema)."""

from __future__ import annotations

import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ALLOWED_CONTROLS = {"\n", "\r", "\t"}


def _check_text(value: str) -> str:
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") and ch not in _ALLOWED_CONTROLS:
            raise ValueError(f"text contains the control character U+{ord(ch):04X}; only \\n, \\r and \\t are allowed")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextIn(Strict):
    text: str = Field(description="Words to feed, tokenized by the model's rules (unknown words become <unk>).")
    k: int = Field(5, ge=1, description="How many next-word suggestions to return (capped by CELLGATE_MAX_K).")

    @field_validator("text")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return _check_text(value)


class PredictRequest(TextIn):
    pass


class CreateSessionRequest(TextIn):
    text: str = Field("", description="Optional text to prime the session with.")


class StepRequest(TextIn):
    if_step: int | None = Field(
        None, ge=0, description="Apply only if the session is at this step (exactly-once retries)."
    )
    explain: bool = Field(False, description="Also return gate activations per token and layer.")


class RewindRequest(Strict):
    to_step: int = Field(ge=0, description="The step to go back to (tokens consumed).")
    k: int = Field(5, ge=1)
    if_step: int | None = Field(None, ge=0)


class GenerateRequest(Strict):
    max_words: int = Field(20, ge=1, description="Words to generate (capped by CELLGATE_MAX_GENERATE_WORDS).")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely words (0 = all).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed and state, same words.")
    stream: bool = Field(False, description="Stream words as Server-Sent Events.")


class Prediction(BaseModel):
    word: str
    prob: float


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    tokens: int
    unknown: list[str]


class SessionResponse(BaseModel):
    session_id: str
    step: int
    predictions: list[Prediction]
    expires_at: float = Field(description="Unix time at which the session expires if left idle.")
    unknown: list[str] = Field(default_factory=list)
    explain: dict[str, Any] | None = None


class SessionInfo(BaseModel):
    session_id: str
    step: int
    created_at: float
    last_used_at: float
    expires_at: float
    model_version: str
    oldest_step: int = Field(description="The earliest step a rewind can reach.")


class GenerateResponse(BaseModel):
    session_id: str
    words: list[str]
    text: str
    step: int


class ModelInfo(BaseModel):
    version: str
    vocab_size: int
    layers: int
    hidden_size: int
    providers: list[str]
    quantized: str | None
    metrics: dict[str, Any]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str
