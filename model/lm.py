"""The word-level language model: embedding → stacked LSTM layers → decoder.

State is passed in and returned, never stored: `forward(tokens, state) -> (logits, state)` with
state = (h, C), each (layers, batch, hidden).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.cell import GateActivations, LSTMLayer, dropout_mask
from model.config import LSTMConfig


class LSTMState(NamedTuple):
    hidden: Tensor  # h, (L, B, H): short-term memory
    cell: Tensor  # C, (L, B, H): long-term memory


class GateTrace(NamedTuple):
    """Per token and layer activations from the explicit cell; each tensor is (L, B, T, H)."""

    forget_gate: Tensor
    input_gate: Tensor
    candidate: Tensor
    output_gate: Tensor
    cell: Tensor
    hidden: Tensor


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout: one mask per sequence, shared across time steps. x is (B, T, D)."""
    if not training or p == 0.0:
        return x
    return x * dropout_mask((x.shape[0], 1, x.shape[2]), p, x.dtype)


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: LSTMConfig, recurrent_dropout: float = 0.0, sparse_grad: bool = False) -> None:
        super().__init__()
        self.config = config
        self.recurrent_dropout = recurrent_dropout  # training-time regulariser, not part of the model
        # Training-time too: the embedding lookup's gradient is row-sparse (only the batch's words), which
        # pays off when nothing else gives the (V, E) matrix a dense gradient (a sampled softmax, SGD).
        self.sparse_grad = sparse_grad
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        sizes = [config.embed_size] + [config.hidden_size] * config.num_layers
        self.layers: nn.ModuleList = nn.ModuleList(LSTMLayer(sizes[i], sizes[i + 1]) for i in range(config.num_layers))
        if config.tie_weights:
            self.decoder_weight = self.embedding.weight
        else:
            self.decoder_weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
            nn.init.uniform_(self.decoder_weight, -0.1, 0.1)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def zero_state(self, batch_size: int) -> LSTMState:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        weight = self.embedding.weight
        return LSTMState(weight.new_zeros(shape), weight.new_zeros(shape))

    def _embed(self, tokens: Tensor) -> Tensor:
        weight = self.embedding.weight
        embedded = nn.functional.embedding(tokens, weight, sparse=self.sparse_grad)  # (B, T, E)
        if self.training and self.config.embed_dropout > 0:
            # Drop whole word types (Gal & Ghahramani), rescaling the survivors. One keep factor per
            # type, applied to the looked-up rows: the same as scaling the (V, E) matrix before the
            # lookup, without touching all V rows forward and backward every batch.
            p = self.config.embed_dropout
            keep = dropout_mask((weight.shape[0],), p, weight.dtype)
            embedded = embedded * keep[tokens].unsqueeze(-1)
        return embedded

    def decode(self, outputs: Tensor) -> Tensor:
        """Logits from top-layer outputs (..., H) -> (..., V), divided by the calibrated temperature."""
        logits = nn.functional.linear(outputs, self.decoder_weight, self.decoder_bias)
        return logits if self.config.temperature == 1.0 else logits / self.config.temperature

    def hidden_states(
        self, tokens: Tensor, state: LSTMState | None = None, explicit: bool = False
    ) -> tuple[Tensor, LSTMState]:
        """Top-layer outputs (B, T, H) and the carried state, on the fused or the explicit path."""
        if state is None:
            state = self.zero_state(tokens.shape[0])
        config = self.config
        x = locked_dropout(self._embed(tokens), config.dropout, self.training)
        new_h, new_c = [], []
        layers: list[LSTMLayer] = list(self.layers)  # type: ignore[arg-type]
        for index, layer in enumerate(layers):
            h, c = state.hidden[index], state.cell[index]
            if explicit:
                x, h, c, _ = layer.forward_explicit(x, h, c)
            else:
                x, h, c = layer(x, h, c, recurrent_dropout=self.recurrent_dropout)
            x = locked_dropout(x, config.dropout, self.training)
            new_h.append(h)
            new_c.append(c)
        return x, LSTMState(torch.stack(new_h), torch.stack(new_c))

    def forward(
        self, tokens: Tensor, state: LSTMState | None = None, explicit: bool = False
    ) -> tuple[Tensor, LSTMState]:
        """tokens (B, T) int64 -> logits (B, T, V) and the state after the last token."""
        outputs, new_state = self.hidden_states(tokens, state, explicit)
        return self.decode(outputs), new_state

    @torch.no_grad()
    def explain(self, tokens: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState, GateTrace]:
        """Explicit-cell run that also returns every gate, per layer and token (eval mode only)."""
        if self.training:
            raise RuntimeError("explain() runs in eval mode; call model.eval() first")
        if state is None:
            state = self.zero_state(tokens.shape[0])
        x = self.embedding(tokens)
        per_layer: list[list[GateActivations]] = []
        new_h, new_c = [], []
        layers: list[LSTMLayer] = list(self.layers)  # type: ignore[arg-type]
        for index, layer in enumerate(layers):
            x, h, c, steps = layer.forward_explicit(x, state.hidden[index], state.cell[index])
            per_layer.append(steps)
            new_h.append(h)
            new_c.append(c)

        def stack(field: int) -> Tensor:
            # (L, B, T, H)
            return torch.stack([torch.stack([s[field] for s in steps], dim=1) for steps in per_layer])

        trace = GateTrace(*(stack(i) for i in range(len(GateActivations._fields))))
        return self.decode(x), LSTMState(torch.stack(new_h), torch.stack(new_c)), trace
