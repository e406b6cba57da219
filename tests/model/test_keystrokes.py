"""The simulated typist: its keystroke arithmetic on a scripted keyboard, its rows against a plain forward
pass, and `cellgate eval --keystrokes` on the tiny trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from model import keystrokes
from model.checkpoint import load_checkpoint
from model.keystrokes import Tally, next_word_rows, simulate_typing
from model.lm import LSTMLanguageModel
from service.completion import Completer
from vocab import Vocabulary

ROW = np.zeros(1, dtype=np.float32)  # the scripted keyboard below ignores the row


@dataclass(frozen=True)
class Shown:
    ids: np.ndarray


class Scripted:
    """A keyboard that shows word 7 once `reveal_after` characters are typed, and words 1-3 before."""

    def __init__(self, reveal_after: int | None, first: bool = False) -> None:
        self.reveal_after = reveal_after
        self.first = first
        self.asked: list[str] = []

    def complete(self, log_probs: np.ndarray, prefix: str, k: int) -> Shown:
        self.asked.append(prefix)
        if self.reveal_after is not None and len(prefix) >= self.reveal_after:
            return Shown(np.array([7, 1, 2] if self.first else [1, 2, 7]))
        return Shown(np.array([1, 2, 3]))


@pytest.mark.parametrize(
    ("reveal_after", "first", "cost", "top1", "top3"),
    [
        (0, True, 1, 1, 1),  # shown first before any letter: one keystroke to take it
        (0, False, 1, 0, 1),  # shown third: still one keystroke, a top-3 hit only
        (2, False, 3, 0, 0),  # two letters, then accept
        (None, False, 6, 0, 0),  # never shown: five letters and a space
    ],
)
def test_a_word_costs_the_letters_typed_before_it_shows_plus_one(
    reveal_after: int | None, first: bool, cost: int, top1: int, top3: int
) -> None:
    keyboard = Scripted(reveal_after, first)
    tally = Tally(k=3)
    tally.type_word("hindi", 7, ROW, keyboard)
    assert (tally.keystrokes, tally.top1, tally.topk) == (cost, top1, top3)
    assert tally.accepted == int(reveal_after is not None)
    # The typist looks after each letter and stops at the first sight of the word; never with it all typed.
    assert keyboard.asked == ["", "h", "hi", "hin", "hind"][: (4 if reveal_after is None else reveal_after) + 1]
    report = tally.report()
    assert report.baseline == 6
    assert report.ksr == pytest.approx(1 - cost / 6)


def test_an_unknown_word_is_typed_in_full_and_the_rates_add_up() -> None:
    tally = Tally(k=3)
    keyboard = Scripted(0, first=True)
    tally.type_word("zyx", None, ROW, keyboard)  # not in the vocabulary: never offered
    tally.type_word("hindi", 7, ROW, keyboard)
    assert keyboard.asked == [""]  # only for the known word
    report = tally.report()
    assert (report.words, report.characters, report.keystrokes, report.baseline) == (2, 8, 5, 10)
    assert report.ksr == pytest.approx(0.5)
    assert (report.oov_rate, report.accepted, report.top1_recall, report.topk_recall) == (0.5, 0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tiny(tiny_run: Path) -> tuple[LSTMLanguageModel, Vocabulary]:
    ckpt = load_checkpoint(tiny_run)
    return ckpt.build_model(), ckpt.vocab


def test_rows_are_the_next_word_distributions_of_one_forward_pass(
    tiny: tuple[LSTMLanguageModel, Vocabulary], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, vocab = tiny
    ids = vocab.encode_tokens("i stay in india . we cooked a song . i speak hindi .".split())
    monkeypatch.setattr(keystrokes, "WINDOW", 5)  # several windows: the state must carry across them
    rows = np.stack(list(next_word_rows(model, ids, model.zero_state(1))))  # (T, V)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), model.zero_state(1))  # (1, T, V): row t predicts token t + 1
        first = model.decode(torch.zeros(1, model.config.hidden_size))  # before any word: from the zero state
    expected = torch.log_softmax(torch.cat([first, logits[0, :-1]]), dim=-1).numpy()
    assert rows.shape == (len(ids), len(vocab))
    np.testing.assert_allclose(rows, expected, atol=1e-5)


def test_the_typist_on_the_tiny_model_saves_keystrokes(tiny: tuple[LSTMLanguageModel, Vocabulary]) -> None:
    model, vocab = tiny
    completer = Completer(vocab.words, vocab.normalize, (vocab.pad_id, vocab.unk_id, vocab.eos_id))
    text = "i stay in india . i speak hindi .\ni stay in japan . we found a book . i speak japanese .\n"
    report = simulate_typing(model, vocab, text, completer, k=3, per_line=True)
    assert report.words == len(text.split())  # line breaks are not words
    assert report.characters == len(text.replace(" ", "").replace("\n", ""))
    assert report.oov_rate == 0
    assert 0.3 < report.ksr < 1  # the grammar is very predictable
    assert report.top1_recall <= report.topk_recall
    carried = simulate_typing(model, vocab, text, completer, k=3, per_line=False)
    assert carried.words == report.words
    assert carried.keystrokes != report.keystrokes or carried.top1_recall != report.top1_recall  # state differs


def test_cellgate_eval_keystrokes(tiny_run: Path) -> None:
    command = [sys.executable, "-m", "cellgate.cli", "eval", str(tiny_run), "--corpus", "builtin:longrange"]
    command += ["--seed", "99", "--episodes", "5", "--keystrokes", "--k", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["perplexity"] > 1
    strokes = report["keystrokes"]
    assert strokes["k"] == 2
    assert strokes["per_line"] is True  # the tiny model trains on lines, as the demo does
    assert 0 < strokes["ksr"] < 1
    assert strokes["keystrokes"] < strokes["baseline"] == strokes["characters"] + strokes["words"]
