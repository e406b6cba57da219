"""Choosing the next word from a distribution (temperature, top-k and nucleus sampling), and what a run of
sampled words is (the loop is SessionManager._sample, behind /generate and OpenAI-style completions)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.scheduler import StepOutput


@dataclass(frozen=True)
class GenerateOptions:
    max_words: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = ()  # end once the sampled text contains one of these; the text is cut before it
    logprobs: int = 0  # how many of the most likely words to report beside each sampled word


@dataclass(frozen=True, slots=True)
class SampledWord:
    word: str
    text: str  # what the word adds to the text, its leading space included
    log_prob: float  # the model's log-probability of the word, before temperature, top-k and top-p
    top: tuple[tuple[str, float], ...]  # the options.logprobs most likely words, best first, as text like `text`


@dataclass(frozen=True)
class Sampled:
    ids: list[int]  # every sampled word, the one that completed a stop sequence included (the state holds it)
    text: str  # the sampled text, cut before the first stop sequence
    finish_reason: str  # "stop" (a stop sequence) or "length" (max_words)
    last: StepOutput  # the model's output after the last word: its hidden and cell are the new state


OnWord = Callable[[SampledWord, int], Awaitable[None]]  # a word, and the step (tokens consumed) after it


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


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop sequence begins in text, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
