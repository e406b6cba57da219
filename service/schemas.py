"""Request and response bodies: the contract clients code against (also the OpenAPI schema)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_ALLOWED_CONTROLS = {"\n", "\r", "\t"}
# The same rule as check_text, stated in the OpenAPI schema so that clients (and fuzzers) know it.
# (Lone surrogates are refused too, but a pattern cannot name them: they are not Unicode scalar values.)
TEXT_PATTERN = "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$"
# A prefix is part of one word: no whitespace (Python's \s, which is str.isspace) and no control character.
PREFIX_PATTERN = "^[^\\s\\u0000-\\u001F\\u007F-\\u009F]*$"
MAX_PREFIX_CHARS = 64


def json_number(value: object) -> object:
    # pydantic's lax mode would read true as 1 and "5" as 5; JSON says neither is a number.
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


JsonInt = Annotated[int, BeforeValidator(json_number)]
JsonFloat = Annotated[float, BeforeValidator(json_number)]
# Bounds inside the type, before the validator, so that `X | None` keeps them in the JSON schema as minimum/maximum.
NonNegativeJsonInt = Annotated[int, Field(ge=0), BeforeValidator(json_number)]
StepNumber = NonNegativeJsonInt
# 2**53: the largest integer every JSON reader (JavaScript, or a validator working in doubles) holds exactly.
Seed = Annotated[int, Field(ge=0, le=2**53), BeforeValidator(json_number)]


def check_text(value: str) -> str:
    """value, if it has no control characters but \\n, \\r and \\t; raises ValueError."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") and ch not in _ALLOWED_CONTROLS:
            raise ValueError(f"text contains the control character U+{ord(ch):04X}; only \\n, \\r and \\t are allowed")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_prefix(value: str | None) -> str | None:
    if value is not None:
        check_text(value)  # lone surrogates, which no pattern can name
        if any(ch.isspace() for ch in value):
            raise ValueError("prefix is the word being typed and must not contain whitespace; send words as text")
    return value


class TextIn(Strict):
    text: str = Field(
        "",
        description="Words to feed, tokenized by the model's rules (unknown words become <unk>).",
        json_schema_extra={"pattern": TEXT_PATTERN},
    )
    k: JsonInt = Field(5, ge=1, description="How many next-word suggestions to return (capped by CELLGATE_MAX_K).")
    prefix: str | None = Field(
        None,
        max_length=MAX_PREFIX_CHARS,
        description="The word being typed: predictions become the k most probable vocabulary words starting with "
        "it (case and Unicode normalised as text is), their probabilities renormalised over every matching word "
        "(see `completion` in the response). It never advances the state: with no text the request changes nothing.",
        json_schema_extra={"pattern": PREFIX_PATTERN},
    )

    @field_validator("text")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return check_text(value)

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str | None) -> str | None:
        return _check_prefix(value)


# What TextOrPrefix's validator enforces, stated in the schema: a text, or a prefix alone (a string, not null).
_TEXT_OR_PREFIX: dict[str, Any] = {
    "anyOf": [{"required": ["text"]}, {"required": ["prefix"], "properties": {"prefix": {"type": "string"}}}]
}


class TextOrPrefix(TextIn):
    """A body that feeds text, or only completes the word being typed (a prefix alone)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_TEXT_OR_PREFIX)

    @model_validator(mode="after")
    def _text_or_prefix(self) -> TextOrPrefix:
        if "text" not in self.model_fields_set and self.prefix is None:
            raise ValueError("text is required (or a prefix alone, to complete the word being typed)")
        return self


class PredictRequest(TextOrPrefix):
    pass


class CreateSessionRequest(TextIn):
    text: str = Field(
        "", description="Optional text to prime the session with.", json_schema_extra={"pattern": TEXT_PATTERN}
    )


class StepRequest(TextOrPrefix):
    if_step: StepNumber | None = Field(
        None, description="Apply only if the session is at this step (exactly-once retries)."
    )
    explain: bool = Field(False, strict=True, description="Also return gate activations per token and layer.")


class RewindRequest(Strict):
    to_step: JsonInt = Field(ge=0, description="The step to go back to (tokens consumed).")
    k: JsonInt = Field(5, ge=1)
    if_step: StepNumber | None = None


class GenerateRequest(Strict):
    max_words: JsonInt = Field(20, ge=1, description="Words to generate (capped by CELLGATE_MAX_GENERATE_WORDS).")
    temperature: JsonFloat = Field(1.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_k: JsonInt = Field(0, ge=0, description="Sample among the k most likely words (0 = all).")
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: Seed | None = Field(None, description="Same seed and state, same words.")
    stream: bool = Field(False, strict=True, description="Stream words as Server-Sent Events.")


class Prediction(BaseModel):
    word: str
    prob: float


class CompletionInfo(BaseModel):
    """Present when the request gave a prefix: what the predictions were chosen from and renormalised over."""

    prefix: str = Field(description="The prefix as matched: normalised the way text is tokenized.")
    matches: int = Field(description="Suggestable vocabulary words starting with it (0: an empty answer).")
    mass: float = Field(description="Their total probability under the model; each prob is p(word) / mass.")
    renormalised: bool = Field(description="Always true: probs sum to 1 over the matching words.")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    tokens: int
    unknown: list[str]
    completion: CompletionInfo | None = None


class SessionResponse(BaseModel):
    session_id: str
    step: int
    predictions: list[Prediction]
    completion: CompletionInfo | None = None
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
