"""Choosing the next word from a distribution: temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np


def sample(
    log_probs: np.ndarray,
    rng: np.random.Generator,
    temperature: float,
    top_k: int,
    top_p: float,
    banned: np.ndarray,
) -> int:
    """One word id from log-probabilities (V,), never a banned id; temperature 0 is greedy. Deterministic for an
    rng state."""
    scores = log_probs.astype(np.float64).copy()
    scores[banned] = -np.inf
    if temperature <= 0:
        return int(np.argmax(scores))
    # Shift before dividing: the best word stays at 0 however small the temperature (5e-324 made the max
    # -inf, and exp(-inf - -inf) NaN); the others go to -inf, which is the greedy limit.
    with np.errstate(over="ignore"):  # overflow to -inf is the intended result
        scores = (scores - scores.max()) / temperature
    if 0 < top_k < scores.size:
        cutoff = np.partition(scores, -top_k)[-top_k]
        scores[scores < cutoff] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # smallest set reaching top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
