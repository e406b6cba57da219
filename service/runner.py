"""The model runner: ONNX Runtime sessions over a verified bundle. Knows only onnxruntime and numpy.

State goes in and comes back out: `run(tokens, h, c, k) -> RunResult(top ids, top log-probs, h', c')`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from export.bundle import (
    CELL_OUT,
    GATE_OUTPUTS,
    HIDDEN_OUT,
    LOG_PROBS,
    TOP_IDS,
    TOP_LOG_PROBS,
    Bundle,
    explain_feed,
    run_graph,
    step_feed,
)
from service.config import Settings

log = logging.getLogger("cellgate.runner")

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# What a step fetches: the top list and the new state; the full (B, V) row only when sampling or completing asks.
STEP_FETCH = (TOP_LOG_PROBS, TOP_IDS, HIDDEN_OUT, CELL_OUT)
STEP_FETCH_ALL = (*STEP_FETCH, LOG_PROBS)


class ProviderUnavailable(RuntimeError):
    """A requested execution provider is not in this onnxruntime build."""


@dataclass(frozen=True)
class RunResult:
    top_ids: np.ndarray  # (B, k) int64, best first, never <pad> or <unk>
    top_log_probs: np.ndarray  # (B, k) float32
    hidden: np.ndarray  # (L, B, H) float32
    cell: np.ndarray  # (L, B, H) float32
    log_probs: np.ndarray | None  # (B, V) when asked for (sampling needs the full distribution)


def resolve_providers(requested: list[str], allow_fallback: bool) -> list[str]:
    """ONNX Runtime provider names for the settings, failing clearly when CUDA is missing."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for name in requested:
        provider = _PROVIDER_NAMES[name]
        if provider in available:
            chosen.append(provider)
        elif not allow_fallback:
            raise ProviderUnavailable(
                f"execution provider {name!r} ({provider}) is not available in this onnxruntime build "
                f"(available: {sorted(available)}); install onnxruntime-gpu on a CUDA machine, or set "
                "CELLGATE_ALLOW_PROVIDER_FALLBACK=true to run on what is available"
            )
        else:
            log.warning("provider %s unavailable, falling back", provider)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class Runner:
    """One InferenceSession per graph, built once from settings."""

    def __init__(self, bundle: Bundle, settings: Settings) -> None:
        self.bundle = bundle
        self.vocab = bundle.vocabulary()
        config = bundle.config
        self.layers = int(config["num_layers"])
        self.hidden_size = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        if len(self.vocab) != self.vocab_size:
            raise ValueError(f"vocab.json has {len(self.vocab)} words, the model {self.vocab_size}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
        providers = resolve_providers(list(settings.providers), settings.allow_provider_fallback)
        self.step_session = ort.InferenceSession(str(bundle.step_graph), options, providers=providers)
        explain = bundle.explain_graph
        self.explain_session = (
            ort.InferenceSession(str(explain), options, providers=providers) if explain is not None else None
        )
        self.providers: list[str] = self.step_session.get_providers()

    def zero_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(
        self,
        sequences: Sequence[Sequence[int]],
        hidden: np.ndarray,
        cell: np.ndarray,
        k: int,
        want_log_probs: bool = False,
    ) -> RunResult:
        """Advance each row's (h, C) through its tokens; rows may differ in length (0 keeps the state)."""
        batch = len(sequences)
        width = max(1, max((len(s) for s in sequences), default=0))
        tokens = np.zeros((batch, width), dtype=np.int64)  # right-padded with <pad> = 0
        lengths = np.zeros(batch, dtype=np.int32)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = seq
            lengths[row] = len(seq)
        k = max(1, min(k, self.vocab_size - 2))
        feed = step_feed(tokens, hidden, cell, k, lengths)
        result = run_graph(self.step_session, feed, STEP_FETCH_ALL if want_log_probs else STEP_FETCH)
        return RunResult(
            top_ids=result[TOP_IDS],
            top_log_probs=result[TOP_LOG_PROBS],
            hidden=result[HIDDEN_OUT],
            cell=result[CELL_OUT],
            log_probs=result.get(LOG_PROBS),
        )

    def explain(self, tokens: Sequence[int], hidden: np.ndarray, cell: np.ndarray) -> dict[str, np.ndarray]:
        """Gate activations per token and layer for one sequence: name -> (T, L, H)."""
        if self.explain_session is None:
            raise RuntimeError("this bundle has no explain graph")
        if not tokens:
            return {name: np.zeros((0, self.layers, self.hidden_size), np.float32) for name in GATE_OUTPUTS}
        gates = run_graph(self.explain_session, explain_feed([tokens], hidden, cell), GATE_OUTPUTS)
        return {name: value[:, :, 0, :] for name, value in gates.items()}  # (T, L, 1, H) -> (T, L, H)

    def warm_up(self) -> None:
        """Run each graph once so the first request does not pay for lazy initialisation."""
        h, c = self.zero_state(2)
        self.run([[self.vocab.eos_id], [self.vocab.eos_id, self.vocab.eos_id]], h, c, k=5, want_log_probs=True)
        if self.explain_session is not None:
            h1, c1 = self.zero_state(1)
            self.explain([self.vocab.eos_id], h1, c1)
