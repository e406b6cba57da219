"""Model hyper-parameters, saved inside every checkpoint and bundle manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of the word-level LSTM language model."""

    vocab_size: int  # rows of the embedding and of the decoder
    embed_size: int = 200  # width of x_t; must equal hidden_size when weights are tied
    hidden_size: int = 200  # width of h_t and C_t in every layer
    num_layers: int = 2  # stacked cells; layer l+1 reads h_t of layer l as its x_t
    dropout: float = 0.2  # locked dropout on the embedded input, between layers and before the decoder (training only)
    embed_dropout: float = 0.0  # drops whole word types from the embedding (training only)
    tie_weights: bool = True  # decoder reuses the embedding matrix: fewer parameters, better perplexity
    # The decoder's logits are divided by it. 1 as trained; `cellgate train` fits it on the validation text
    # afterwards (temperature scaling): a model that has begun to over-fit is over-confident, T > 1.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.tie_weights and self.embed_size != self.hidden_size:
            raise ValueError(
                f"tied weights need embed_size == hidden_size, got {self.embed_size} and {self.hidden_size}"
            )
        if self.vocab_size < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("vocab_size, hidden_size and num_layers must be positive")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSTMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
