"""Verified parity between the PyTorch model and its ONNX graphs (shared by `cellgate export` and tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.bundle import (
    CELL,
    CELL_OUT,
    EXPLAIN_OUTPUTS,
    GATE_OUTPUTS,
    HIDDEN,
    HIDDEN_OUT,
    LOG_PROBS,
    STEP_OUTPUTS,
    explain_feed,
    run_graph,
    step_feed,
)
from model.lm import LSTMLanguageModel, LSTMState

LOGIT_TOLERANCE = 1e-4
# h is bounded by 1, so 1e-5 is absolute for it. The memory cell C is not bounded: in a trained
# model over 50 steps it reaches |C| ≈ 50, where one float32 ulp is 4e-6 and even PyTorch differs
# from a float64 reference by 2e-5. So every state difference is measured relative to
# max(1, |reference|): absolute below magnitude 1, relative above it.
STATE_TOLERANCE = 1e-5
BATCHES = (1, 7, 32)
TIMES = (1, 5, 50)
STREAM_TOKENS = 200


@dataclass
class ParityReport:
    """Largest absolute difference seen per check; `ok` is False if any exceeds its tolerance."""

    max_diff: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    cases: int = 0

    def record(self, name: str, diff: float, tolerance: float) -> None:
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), float(diff))
        self.tolerance[name] = tolerance
        self.cases += 1

    @property
    def failures(self) -> list[str]:
        return [
            f"{name}: max |diff| {value:.3g} > {self.tolerance[name]:.0e}"
            for name, value in self.max_diff.items()
            if value > self.tolerance[name]
        ]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "cases": self.cases, "max_diff": self.max_diff, "tolerance": self.tolerance}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max(a: np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Largest |a - b| / max(1, |b|): absolute for values within ±1, relative beyond."""
    ref = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float((np.abs(a - ref) / np.maximum(1.0, np.abs(ref))).max())


def _random_state(model: LSTMLanguageModel, batch: int, gen: torch.Generator) -> LSTMState:
    cfg = model.config
    shape = (cfg.num_layers, batch, cfg.hidden_size)
    # Realistic magnitudes: |h| < 1 and C of a few units.
    return LSTMState(torch.rand(shape, generator=gen) * 2 - 1, torch.randn(shape, generator=gen) * 2)


def _feed(tokens: np.ndarray, lengths: np.ndarray, state: LSTMState) -> dict[str, np.ndarray]:
    return step_feed(tokens, state.hidden.numpy(), state.cell.numpy(), lengths=lengths)


@torch.no_grad()
def check_parity(model: LSTMLanguageModel, step_graph: Path, explain_graph: Path | None, seed: int = 0) -> ParityReport:
    """Compare ONNX Runtime with PyTorch on shapes other than any export example."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    step = _session(step_graph)
    report = ParityReport()

    for batch in BATCHES:
        for time in TIMES:
            tokens = torch.randint(0, vocab, (batch, time), generator=gen)
            state = _random_state(model, batch, gen)
            logits, expected = model(tokens, state)
            out = run_graph(step, _feed(tokens.numpy(), np.full(batch, time), state), STEP_OUTPUTS)
            report.record("log_probs", _max(out[LOG_PROBS], logits[:, -1].log_softmax(-1)), LOGIT_TOLERANCE)
            report.record("h", _max(out[HIDDEN_OUT], expected.hidden), STATE_TOLERANCE)
            report.record("c", _max(out[CELL_OUT], expected.cell), STATE_TOLERANCE)

    # Rows of different lengths in one padded batch must equal each row run alone.
    batch, time = 7, 9
    tokens = torch.randint(0, vocab, (batch, time), generator=gen)
    lengths = torch.randint(1, time + 1, (batch,), generator=gen)
    tokens[torch.arange(time)[None, :] >= lengths[:, None]] = 0
    state = _random_state(model, batch, gen)
    out = run_graph(step, _feed(tokens.numpy(), lengths.numpy(), state), STEP_OUTPUTS)
    log_probs, h_out, c_out = out[LOG_PROBS], out[HIDDEN_OUT], out[CELL_OUT]
    for row in range(batch):
        n = int(lengths[row])
        row_state = LSTMState(state.hidden[:, row : row + 1], state.cell[:, row : row + 1])
        logits, expected = model(tokens[row : row + 1, :n], row_state)
        report.record(
            "padded_log_probs", _max(log_probs[row : row + 1], logits[:, -1].log_softmax(-1)), LOGIT_TOLERANCE
        )
        report.record("padded_state", _max(h_out[:, row : row + 1], expected.hidden), STATE_TOLERANCE)
        report.record("padded_state", _max(c_out[:, row : row + 1], expected.cell), STATE_TOLERANCE)

    # Streaming: one token at a time, carrying state, equals one long call.
    tokens = torch.randint(0, vocab, (1, STREAM_TOKENS), generator=gen)
    state = _random_state(model, 1, gen)
    whole = run_graph(step, _feed(tokens.numpy(), np.array([STREAM_TOKENS]), state), STEP_OUTPUTS)
    carried = {HIDDEN_OUT: state.hidden.numpy(), CELL_OUT: state.cell.numpy()}
    for t in range(STREAM_TOKENS):
        feed = _feed(tokens[:, t : t + 1].numpy(), np.array([1]), state)
        feed[HIDDEN], feed[CELL] = carried[HIDDEN_OUT], carried[CELL_OUT]
        carried = run_graph(step, feed, STEP_OUTPUTS)
    report.record("stream_log_probs", _max(carried[LOG_PROBS], whole[LOG_PROBS]), STATE_TOLERANCE)
    report.record("stream_state", _max(carried[HIDDEN_OUT], whole[HIDDEN_OUT]), STATE_TOLERANCE)
    report.record("stream_state", _max(carried[CELL_OUT], whole[CELL_OUT]), STATE_TOLERANCE)

    if explain_graph is not None:
        explain = _session(explain_graph)
        tokens = torch.randint(0, vocab, (3, 11), generator=gen)
        state = _random_state(model, 3, gen)
        logits, expected, trace = model.explain(tokens, state)
        feed = explain_feed(tokens.numpy(), state.hidden.numpy(), state.cell.numpy())
        outputs = run_graph(explain, feed, EXPLAIN_OUTPUTS)
        report.record("explain_log_probs", _max(outputs[LOG_PROBS], logits[:, -1].log_softmax(-1)), LOGIT_TOLERANCE)
        for gate in GATE_OUTPUTS:
            # ONNX gives (T, L, B, H); the trace is (L, B, T, H).
            got = outputs[gate].transpose(1, 2, 0, 3)
            report.record(f"explain_{gate}", _max(got, getattr(trace, gate)), STATE_TOLERANCE)
        report.record("explain_state", _max(outputs[HIDDEN_OUT], expected.hidden), STATE_TOLERANCE)
    return report
