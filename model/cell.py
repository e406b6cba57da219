"""The LSTM cell with its gates written out, and the same layer on torch's fused kernel.

Notation (one layer, one time step; [a, b] is concatenation):

    forget gate       f_t = σ(W_f·[h_{t-1}, x_t] + b_f)    what to erase from the memory cell
    input gate        i_t = σ(W_i·[h_{t-1}, x_t] + b_i)    how much of the candidate to write
    candidate memory  C̃_t = tanh(W_C·[h_{t-1}, x_t] + b_C) what could be written
    memory cell       C_t = f_t ⊙ C_{t-1} + i_t ⊙ C̃_t     long-term memory, the conveyor belt
    output gate       o_t = σ(W_o·[h_{t-1}, x_t] + b_o)    what of the cell to expose
    hidden state      h_t = o_t ⊙ tanh(C_t)               short-term memory, the layer's output

`LSTMLayer.weight` stacks W_i, W_f, W_C, W_o row-wise (torch's gate order, so the fused kernel
reads the very same tensor) and acts on [h_{t-1}, x_t]: its first `hidden_size` columns multiply
h_{t-1}, the rest multiply x_t.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

# Row blocks of LSTMLayer.weight and .bias, in order.
GATE_ORDER = ("input_gate", "forget_gate", "candidate", "output_gate")


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A dropout mask of `shape`: each element 0 with probability p, else 1/(1 - p), so its mean is 1.

    Drawn from the default generator as 15-bit uniform lanes of 64-bit random words, four lanes a
    word: a quarter of the generator calls of `bernoulli_`, and on CPU five times faster for
    DropConnect's (4H, H) masks, which bernoulli_ made a sixth of a 2 x 300 training step. p is
    rounded to a multiple of 1/32768 and the scale uses the rounded value, so the mean stays 1.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = math.prod(shape)
    cut = round(p * 32768)
    # random_() on int64 fills [0, 2**63): 63 uniform bits. Bit 63 is always 0, which only the top lane's
    # 16th bit would see, so every lane keeps its low 15 bits.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    lanes = words.view(torch.int16)[:n] & 0x7FFF  # uniform on [0, 32768)
    keep = (lanes >= cut).view(shape)
    return keep.to(dtype) * (32768 / (32768 - cut))


class GateActivations(NamedTuple):
    """Everything one cell computes in one step; each tensor is (B, H)."""

    forget_gate: Tensor
    input_gate: Tensor
    candidate: Tensor
    output_gate: Tensor
    cell: Tensor
    hidden: Tensor


class LSTMLayer(nn.Module):
    """One LSTM layer: the explicit cell (the reference) and a fused path over the same parameters."""

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(4 * hidden_size, hidden_size + input_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        # The fused kernel wants two bias vectors; the second stays zero so one bias means one thing.
        self.register_buffer("_zero_bias", torch.zeros(4 * hidden_size), persistent=False)
        self.reset_parameters(forget_bias)

    def reset_parameters(self, forget_bias: float = 1.0) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        # A forget gate that starts open lets gradients flow through C from the first update.
        with torch.no_grad():
            self.bias[self.hidden_size : 2 * self.hidden_size].fill_(forget_bias)

    @property
    def recurrent_weight(self) -> Tensor:
        """The columns of W that multiply h_{t-1}: (4H, H)."""
        return self.weight[:, : self.hidden_size]

    @property
    def input_weight(self) -> Tensor:
        """The columns of W that multiply x_t: (4H, I)."""
        return self.weight[:, self.hidden_size :]

    def cell_step(self, x_t: Tensor, hidden: Tensor, cell: Tensor) -> GateActivations:
        """One step of the explicit cell: x_t (B, I), h_{t-1} and C_{t-1} (B, H)."""
        z = torch.addmm(self.bias, torch.cat([hidden, x_t], dim=-1), self.weight.t())  # (B, 4H)
        i, f, g, o = z.chunk(4, dim=-1)
        input_gate = torch.sigmoid(i)
        forget_gate = torch.sigmoid(f)
        candidate = torch.tanh(g)
        output_gate = torch.sigmoid(o)
        new_cell = forget_gate * cell + input_gate * candidate
        new_hidden = output_gate * torch.tanh(new_cell)
        return GateActivations(forget_gate, input_gate, candidate, output_gate, new_cell, new_hidden)

    def forward_explicit(
        self, x: Tensor, hidden: Tensor, cell: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, list[GateActivations]]:
        """Run the explicit cell over x (B, T, I); returns outputs (B, T, H), h_T, C_T and every step."""
        steps: list[GateActivations] = []
        for t in range(x.shape[1]):
            act = self.cell_step(x[:, t], hidden, cell)
            hidden, cell = act.hidden, act.cell
            steps.append(act)
        outputs = torch.stack([s.hidden for s in steps], dim=1)  # (B, T, H)
        return outputs, hidden, cell, steps

    def forward(
        self, x: Tensor, hidden: Tensor, cell: Tensor, recurrent_dropout: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused path over x (B, T, I) from (h, C) each (B, H); returns outputs (B, T, H), h_T, C_T.

        `recurrent_dropout` is DropConnect on the recurrent weights (one mask per call, as in
        AWD-LSTM); it is applied only in training mode.
        """
        w_hh = self.recurrent_weight
        if recurrent_dropout > 0.0 and self.training:
            w_hh = w_hh * dropout_mask(tuple(w_hh.shape), recurrent_dropout, w_hh.dtype)
        zero_bias: Tensor = self._zero_bias  # type: ignore[assignment]
        params = [self.input_weight.contiguous(), w_hh.contiguous(), self.bias, zero_bias]
        outputs, h_n, c_n = torch.lstm(
            x, (hidden.unsqueeze(0), cell.unsqueeze(0)), params, True, 1, 0.0, self.training, False, True
        )
        return outputs, h_n.squeeze(0), c_n.squeeze(0)
