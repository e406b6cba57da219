"""Keyboard completion over the whole vocabulary, and the words never suggested: masks built once at load.

Completion is a view of one distribution: the log-probabilities the Runner returns for the next word.
A typed prefix selects the vocabulary words that start with it, and the k most probable of them are the
answer, their probabilities renormalised over the words that matched. No second model call and no
per-request scan of the vocabulary: the suggestable words are sorted once, so the words starting with a
prefix are one contiguous range of that order, found with two binary searches (O(log V)); the ranking
then touches only that range (numpy, O(range)).

Blocked words (a blocklist) are never suggested and never sampled: they are left out of the prefix index,
filtered out of the graph's top-k (which is asked for as many extra words as there are blocked ones, so k
always survive), and banned in sampling.

Blocklists come from a bundle's `blocklist.txt` and the file CELLGATE_BLOCKLIST names (both apply); their
format is export/bundle.py's `read_blocklist`: one word per line, `#` comments. An entry blocks every
vocabulary word equal to it after NFKC normalisation and case folding ("Darn" blocks "darn" and "DARN" in a
case-sensitive vocabulary). Entries the vocabulary does not hold are ignored: a word the model cannot
produce is never suggested anyway.
"""

from __future__ import annotations

import bisect
import logging
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import read_blocklist

log = logging.getLogger("cellgate.completion")

_LAST_CHAR = chr(0x10FFFF)


@dataclass(frozen=True)
class Ranked:
    """Suggestions in rank order, and how many blocked words were withheld from them."""

    ids: np.ndarray  # (n,) int64, best first
    log_probs: np.ndarray  # (n,) log-probabilities (renormalised over the matches for a completion)
    withheld: int

    def body(self, words: Sequence[str]) -> dict[str, Any]:
        """The answer's JSON fields: {"predictions": [{"word", "prob"}, ...]}."""
        probs = np.exp(self.log_probs.astype(np.float64)).tolist()
        return {"predictions": [{"word": words[i], "prob": p} for i, p in zip(self.ids.tolist(), probs, strict=True)]}


@dataclass(frozen=True)
class Completion(Ranked):
    """The k most probable words that start with a prefix, renormalised over every word that does."""

    prefix: str  # as matched: normalised the way tokenisation normalises text
    matches: int  # suggestable words starting with the prefix
    mass: float  # their total probability under the model (what the probabilities were divided by)

    def body(self, words: Sequence[str]) -> dict[str, Any]:
        """The predictions and a "completion" object saying what they were renormalised over."""
        info = {"prefix": self.prefix, "matches": self.matches, "mass": self.mass, "renormalised": True}
        return {**super().body(words), "completion": info}


def blocklist_entries(paths: Iterable[Path | None]) -> list[str]:
    """The entries of every blocklist named (a bundle's and the settings'), in order; None is skipped."""
    return [entry for path in paths if path is not None for entry in read_blocklist(path)]


def _fold(word: str) -> str:
    return unicodedata.normalize("NFKC", word).casefold()


def _successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with prefix (None: there is none)."""
    stripped = prefix.rstrip(_LAST_CHAR)
    if not stripped:
        return None
    return stripped[:-1] + chr(ord(stripped[-1]) + 1)


class _SortedWords:
    """Word ids in the code-point order of their words: a prefix's words are one slice of it."""

    def __init__(self, words: Sequence[str], ids: Iterable[int]) -> None:
        order = sorted(ids, key=words.__getitem__)
        self.words = [words[i] for i in order]
        self.ids = np.array(order, dtype=np.int64)

    def matching(self, prefix: str) -> np.ndarray:
        """The ids of the words starting with prefix: two binary searches, a view, no copy."""
        lo = bisect.bisect_left(self.words, prefix)
        successor = _successor(prefix)
        hi = len(self.words) if successor is None else bisect.bisect_left(self.words, successor, lo)
        return self.ids[lo:hi]


class Completer:
    """The vocabulary's prefix index and blocked-word masks, built once per loaded model."""

    def __init__(
        self,
        words: Sequence[str],
        normalize: Callable[[str], str],
        excluded: Iterable[int],
        blocked: Iterable[str] = (),
    ) -> None:
        """words: the vocabulary by id; normalize: the tokeniser's text normalisation; excluded: ids that are
        never a completion (the special tokens); blocked: blocklist entries."""
        self.vocab_size = len(words)
        self.normalize = normalize
        folded = set(map(_fold, blocked))
        blocked_ids = [i for i, word in enumerate(words) if folded and _fold(word) in folded]
        self.blocked = np.zeros(self.vocab_size, dtype=bool)  # (V,)
        self.blocked[blocked_ids] = True
        self.blocked_ids = np.array(blocked_ids, dtype=np.int64)
        skipped = set(excluded)
        suggestable = (i for i in range(self.vocab_size) if i not in skipped and not self.blocked[i])
        self._suggestable = _SortedWords(words, suggestable)
        self._blocked = _SortedWords(words, (i for i in blocked_ids if i not in skipped))
        if folded:
            log.info("blocklist: %d entries block %d vocabulary words", len(folded), len(blocked_ids))

    @property
    def blocked_count(self) -> int:
        return int(self.blocked_ids.size)

    def fetch_k(self, k: int) -> int:
        """How many top words to ask the graph for so that k remain once blocked words are dropped."""
        return k + self.blocked_count

    def banned(self, always: Sequence[int]) -> np.ndarray:
        """Ids sampling must never emit: `always` (e.g. <pad>, <unk>) and every blocked word."""
        return np.concatenate([np.asarray(always, dtype=np.int64), self.blocked_ids])

    def rank(
        self, top_ids: np.ndarray, top_log_probs: np.ndarray, log_probs: np.ndarray | None, k: int, prefix: str | None
    ) -> Ranked:
        """The answer for one output: the graph's top list, or with a prefix a completion from the full row."""
        if prefix is None:
            return self.top(top_ids, top_log_probs, k)
        if log_probs is None:
            raise ValueError("a completion needs the full next-word row (want_log_probs)")
        return self.complete(log_probs, prefix, k)

    def top(self, top_ids: np.ndarray, top_log_probs: np.ndarray, k: int) -> Ranked:
        """The graph's top list (fetched with fetch_k) without blocked words, cut to k."""
        if not self.blocked_count:
            return Ranked(top_ids[:k], top_log_probs[:k], 0)
        blocked = self.blocked[top_ids]  # (fetched,)
        kept = np.flatnonzero(~blocked)[:k]
        cut = int(kept[-1]) + 1 if kept.size == k else top_ids.size  # ranks up to the k-th kept word
        return Ranked(top_ids[kept], top_log_probs[kept], int(blocked[:cut].sum()))

    def complete(self, log_probs: np.ndarray, prefix: str, k: int) -> Completion:
        """The k most probable suggestable words starting with prefix, from one next-word row (V,)."""
        normalized = self.normalize(prefix)
        ids = self._suggestable.matching(normalized)  # (n,)
        scores = log_probs[ids].astype(np.float64)  # (n,)
        if ids.size == 0:
            return Completion(ids, scores, self._withheld(log_probs, normalized, -math.inf), normalized, 0, 0.0)
        best = float(scores.max())
        log_mass = best + math.log(float(np.exp(scores - best).sum()))
        # Past k: the k-th best score, then every word at least that good (ties at the cut included).
        cut = -np.partition(-scores, k - 1)[k - 1] if ids.size > k else -math.inf
        chosen = np.flatnonzero(scores >= cut)
        # Most probable first, ties by id as the graph's TopK breaks them.
        chosen = chosen[np.lexsort((ids[chosen], -scores[chosen]))][:k]
        floor = float(scores[chosen[-1]]) if chosen.size == k else -math.inf
        return Completion(
            ids[chosen],
            scores[chosen] - log_mass,
            self._withheld(log_probs, normalized, floor),
            normalized,
            int(ids.size),
            math.exp(log_mass),
        )

    def _withheld(self, log_probs: np.ndarray, prefix: str, floor: float) -> int:
        """Blocked words starting with prefix that would have ranked among the shown ones."""
        if not self.blocked_count:
            return 0
        return int((log_probs[self._blocked.matching(prefix)] >= floor).sum())
