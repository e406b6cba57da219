"""Keystroke savings: a simulated typist on held-out text, with the completions a keyboard would show.

The measure the keyboard literature reports (Gboard's CIFG-LSTM papers, SwiftKey): a typist enters the
text one character at a time; before the first character of each word and after every character, the
keyboard shows the k most probable words that start with what has been typed of it (k = 3, the strip
above a phone keyboard). As soon as the word shows, the typist takes it with one keystroke, which also
inserts the space; otherwise they type the whole word and a space. Keystroke savings rate (KSR) is the
share of keystrokes saved against typing every character and space:

    KSR = 1 - keystrokes with suggestions / (characters + spaces)

Top-1 and top-3 next-word recall are the share of words that show first, or among the three, before
any character of them is typed. Conventions: every token of the text is a word to type except line
breaks and the text's own special tokens (WikiText's `<unk>` placeholders: the word they stand for is
unknown); they are still read by the model. A word the vocabulary lacks is typed in full. A line
break costs the same with or without suggestions, so it is left out of both counts.

The ranking is the service's own (service/completion.py's Completer, handed in by the caller, so this
module stays on the training side of the pipeline): the suggestions are exactly what a client would get
from `prefix` on /v1/predict, /steps or the WebSocket for the same state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from model.lm import LSTMLanguageModel, LSTMState
from vocab import SPECIALS, Vocabulary

WINDOW = 256  # tokens per forward pass; the state is carried across windows


class Suggested(Protocol):
    @property
    def ids(self) -> np.ndarray: ...  # (n,) best first


class Completes(Protocol):
    """The keyboard's ranking: the k most probable words starting with a prefix, from one next-word row."""

    def complete(self, log_probs: np.ndarray, prefix: str, k: int) -> Suggested: ...


@dataclass
class KeystrokeReport:
    words: int  # words typed (line breaks and special tokens left out)
    characters: int  # their characters
    keystrokes: int  # keystrokes with suggestions: characters typed plus one per word (accept or space)
    baseline: int  # characters + one space per word: keystrokes without suggestions
    ksr: float  # 1 - keystrokes / baseline
    accepted: float  # share of words taken from a suggestion
    top1_recall: float  # share of words shown first before any character of them was typed
    topk_recall: float  # ... among the k shown
    k: int
    oov_rate: float  # share of words the vocabulary lacks (never suggested, always typed in full)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Tally:
    """Running counts of the typist; `report()` turns them into rates."""

    k: int = 3
    words: int = 0
    characters: int = 0
    keystrokes: int = 0
    accepted: int = 0
    top1: int = 0
    topk: int = 0
    oov: int = 0

    def type_word(self, word: str, word_id: int | None, log_probs: np.ndarray, completer: Completes) -> None:
        """Type one word with the keyboard showing completions from log_probs (V,); word_id None when unknown."""
        self.words += 1
        self.characters += len(word)
        cost = len(word) + 1  # every character, then a space
        if word_id is None:
            self.oov += 1
        else:
            for typed in range(len(word)):  # accepting once the whole word is typed would save nothing
                shown = completer.complete(log_probs, word[:typed], self.k).ids.tolist()
                if typed == 0:
                    self.top1 += int(shown[:1] == [word_id])
                    self.topk += int(word_id in shown)
                if word_id in shown:
                    cost = typed + 1  # what was typed, then one keystroke to accept (it adds the space)
                    self.accepted += 1
                    break
        self.keystrokes += cost

    def report(self) -> KeystrokeReport:
        words = max(self.words, 1)
        baseline = self.characters + self.words
        return KeystrokeReport(
            words=self.words,
            characters=self.characters,
            keystrokes=self.keystrokes,
            baseline=baseline,
            ksr=1 - self.keystrokes / baseline if baseline else 0.0,
            accepted=self.accepted / words,
            top1_recall=self.top1 / words,
            topk_recall=self.topk / words,
            k=self.k,
            oov_rate=self.oov / words,
        )


@torch.no_grad()
def next_word_rows(model: LSTMLanguageModel, ids: Sequence[int], state: LSTMState) -> Iterator[np.ndarray]:
    """For each position i of ids, the log-probabilities (V,) of the word there given the words before it."""
    top = state.hidden[-1]  # (1, H): what the service ranks from before the first word
    for start in range(0, len(ids), WINDOW):
        window = torch.tensor([ids[start : start + WINDOW]], dtype=torch.long)  # (1, T)
        outputs, state = model.hidden_states(window, state)  # (1, T, H)
        before = torch.cat([top[:, None], outputs[:, :-1]], dim=1)  # (1, T, H): the output before each token
        log_probs: Tensor = torch.log_softmax(model.decode(before)[0], dim=-1)  # (T, V)
        yield from log_probs.float().numpy()
        top = outputs[:, -1]


def simulate_typing(
    model: LSTMLanguageModel, vocab: Vocabulary, text: str, completer: Completes, k: int = 3, per_line: bool = False
) -> KeystrokeReport:
    """The typist on text (rules in the module docstring). per_line: each line from a zero state, for a model
    trained that way (mode "lines"); otherwise the state is carried through the whole text, as in a session."""
    model.eval()
    tally = Tally(k=k)
    eos = vocab.words[vocab.eos_id]
    segments: list[list[str]] = [[]]  # the whole text, or one per line
    for token in vocab.tokenize(text):
        segments[-1].append(token)
        if per_line and token == eos:
            segments.append([])
    for segment in segments:
        ids = vocab.encode_tokens(segment)
        rows = next_word_rows(model, ids, model.zero_state(1))
        for token, word_id, row in zip(segment, ids, rows, strict=True):
            if token not in SPECIALS:
                tally.type_word(token, None if word_id == vocab.unk_id else word_id, row, completer)
    return tally.report()
