"""OpenAI-style completions: request and response bodies and streamed chunks (the error shape is
service/errors.py's openai_shape). Knows no FastAPI: routes/openai.py is the HTTP side.

Words are the model's tokens: a completion's `tokens` are the pieces of text each word adds (its leading
space included), so that joined up they are the completion's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from service.sampling import SampledWord, first_stop
from service.schemas import TEXT_PATTERN, JsonInt, Seed, check_text, json_number

PromptText = Annotated[str, AfterValidator(check_text), Field(json_schema_extra={"pattern": TEXT_PATTERN})]
StopText = Annotated[str, Field(min_length=1, max_length=64)]
# Bounds inside the types, so that `X | None` keeps them in the JSON schema (as in service/schemas.py).
Zero = Annotated[float, Field(ge=0, le=0), BeforeValidator(json_number)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0), BeforeValidator(json_number)]
TopP = Annotated[float, Field(gt=0.0, le=1.0), BeforeValidator(json_number)]
Positive = Annotated[int, Field(ge=1), BeforeValidator(json_number)]
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(json_number)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True, description="Send a last chunk with the token usage.")


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request, as far as a word-level LSTM can honour it; other values are refused."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="A model id from GET /v1/models (name, or name@version).")
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=16)] = Field(
        "", description="Text to continue; a list gives one choice per text."
    )
    max_tokens: Positive | None = Field(16, description="Words to generate (capped by CELLGATE_MAX_GENERATE_WORDS).")
    temperature: Temperature | None = Field(1.0, description="0 = greedy.")
    top_p: TopP | None = Field(1.0, description="Nucleus sampling mass.")
    top_k: JsonInt = Field(0, ge=0, description="Sample among the k most likely words (0 = all); an extension.")
    seed: Seed | None = Field(None, description="Same seed and state, same words.")
    logprobs: NonNegative | None = Field(
        None, description="Report this many alternatives per word (capped by CELLGATE_MAX_K)."
    )
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="End before any of these texts (the text is cut before it)."
    )
    stream: bool | None = Field(False, strict=True, description="Stream chunks as Server-Sent Events.")
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = Field(1, description="Only 1: one choice per prompt.")
    best_of: Literal[1] | None = Field(None, description="Only 1.")
    echo: Literal[False] | None = Field(False, description="Not supported: only false.")
    suffix: None = Field(None, description="Not supported.")
    presence_penalty: Zero | None = Field(0.0, description="Not supported: only 0.")
    frequency_penalty: Zero | None = Field(0.0, description="Not supported: only 0.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: only empty.")
    user: str | None = Field(None, description="An end-user tag, accepted and not used.")
    session_id: str | None = Field(
        None,
        min_length=16,
        max_length=64,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="cellgate extension: continue this session (POST /v1/sessions); it advances through the "
        "prompt and the generated words",
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    session_id: str | None = Field(None, description="With session_id: the session continued.")
    step: int | None = Field(None, description="With session_id: the session's step afterwards.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text could still begin a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class ChoiceText:
    """One choice's words as they arrive: which of them may be sent yet (none that a stop sequence could still
    swallow), and its logprobs; joined up, the words sent are the choice's text."""

    stops: tuple[str, ...]
    words: list[SampledWord] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each word's text begins
    text: str = ""
    sent: int = 0  # words handed out so far
    released: list[tuple[SampledWord, str, int]] = field(default_factory=list)  # all of them, in order

    def add(self, word: SampledWord) -> list[tuple[SampledWord, str, int]]:
        """Words now safe to send: (word, its text, its offset)."""
        self.offsets.append(len(self.text))
        self.words.append(word)
        self.text += word.text
        cut = first_stop(self.text, self.stops)
        return self._release(cut if cut is not None else len(self.text) - _held_back(self.text, self.stops), True)

    def finish(self, final_text: str) -> list[tuple[SampledWord, str, int]]:
        """The remaining words, the last of them cut where the final (stop-trimmed) text ends."""
        return self._release(len(final_text), False)

    def _release(self, limit: int, whole: bool) -> list[tuple[SampledWord, str, int]]:
        ready = []
        while self.sent < len(self.words):
            word, offset = self.words[self.sent], self.offsets[self.sent]
            if offset + len(word.text) <= limit:
                ready.append((word, word.text, offset))
            elif not whole and offset < limit:
                ready.append((word, word.text[: limit - offset], offset))
            else:
                break
            self.sent += 1
        self.released += ready
        return ready


def logprobs_of(released: list[tuple[SampledWord, str, int]]) -> Logprobs:
    return Logprobs(
        tokens=[text for _, text, _ in released],
        token_logprobs=[word.log_prob for word, _, _ in released],
        top_logprobs=[dict(word.top) for word, _, _ in released],
        text_offset=[offset for _, _, offset in released],
    )
