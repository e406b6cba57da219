"""The prefix index and the blocked-word masks against brute force, on random vocabularies and rows."""

from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from export.bundle import BlocklistError, read_blocklist
from service.completion import Completer, Completion, _successor, blocklist_entries
from service.sampling import sample
from vocab import SPECIALS, Vocabulary, tokenize

# Letters that sort in interesting ways: ASCII, accented, a combining mark, CJK, an astral one and the last code point.
ALPHABET = "abcAB\u00e9\u0301\u4e2d\U0001f600\U0010ffff"
words_strategy = st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=40, unique=True)


def brute_force(words: list[str], row: np.ndarray, prefix: str, k: int, skip: set[int]) -> tuple[list[int], int, float]:
    """The answer by scanning every word: top ids (most probable first, ties by id), matches, mass."""
    matching = [i for i, w in enumerate(words) if i not in skip and w.startswith(prefix)]
    ranked = sorted(matching, key=lambda i: (-float(row[i]), i))
    mass = sum(math.exp(float(row[i])) for i in matching)
    return ranked[:k], len(matching), mass


@settings(max_examples=300, deadline=None)
@given(
    words=words_strategy,
    prefix=st.text(ALPHABET, max_size=3),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_completion_equals_a_scan_of_the_whole_vocabulary(
    words: list[str], prefix: str, k: int, seed: int, ties: bool
) -> None:
    vocab = [*SPECIALS, *words]
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 3, len(vocab)).astype(np.float64) if ties else rng.normal(size=len(vocab))
    row = (logits - np.log(np.exp(logits).sum())).astype(np.float32)  # a log-softmax row, as the graph returns
    completer = Completer(vocab, lambda text: text, excluded=[0, 1, 2])
    got = completer.complete(row, prefix, k)
    expected_ids, matches, mass = brute_force(vocab, row, prefix, k, {0, 1, 2})
    assert got.ids.tolist() == expected_ids
    assert got.matches == matches
    assert got.mass == pytest.approx(mass, rel=1e-5)
    if matches:
        renormalised = [math.exp(float(row[i])) / mass for i in expected_ids]
        assert np.exp(got.log_probs).tolist() == pytest.approx(renormalised, rel=1e-5)
    if matches <= k:  # every matching word is shown: they carry all the renormalised mass
        assert float(np.exp(got.log_probs).sum()) == pytest.approx(1.0 if matches else 0.0, abs=1e-6)


@given(st.text(ALPHABET, min_size=0, max_size=4), st.text(ALPHABET, min_size=0, max_size=4))
def test_successor_bounds_exactly_the_strings_with_the_prefix(prefix: str, other: str) -> None:
    successor = _successor(prefix)
    inside = prefix <= other and (successor is None or other < successor)
    assert inside == other.startswith(prefix)


def test_matching_is_normalised_as_tokenisation_normalises() -> None:
    vocab = Vocabulary.build(tokenize("hindi hello hi fish ﬁne café"))
    completer = Completer(vocab.words, vocab.normalize, excluded=[0, 1, 2])
    row = np.log(np.full(len(vocab), 1 / len(vocab), dtype=np.float32))
    for typed, matched in [("HI", "hi"), ("ＨＩ", "hi"), ("ﬁ", "fi"), ("Cafe\u0301", "café")]:
        completion = completer.complete(row, typed, 10)
        assert completion.prefix == matched == tokenize(typed)[0]
        words = {vocab.words[i] for i in completion.ids}
        assert words == {w for w in vocab.words[3:] if w.startswith(matched)}
        assert words  # each typed form finds its words
    assert completer.complete(row, "hix", 5).matches == 0


def test_an_empty_prefix_ranks_every_suggestable_word_and_never_a_special() -> None:
    vocab = ["<pad>", "<unk>", "<eos>", "a", "b"]
    row = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], dtype=np.float32))
    completion = Completer(vocab, str.lower, excluded=[0, 1, 2]).complete(row, "", 5)
    assert completion.ids.tolist() == [3, 4]
    assert completion.mass == pytest.approx(0.1)
    assert np.exp(completion.log_probs).tolist() == pytest.approx([0.6, 0.4])
    empty = Completer(vocab, str.lower, excluded=[0, 1, 2]).complete(row, "<", 5)
    assert (empty.ids.size, empty.matches, empty.mass) == (0, 0, 0.0)


BLOCK_VOCAB = ["<pad>", "<unk>", "<eos>", "darn", "Darn", "dart", "dare", "ok"]
BLOCK_ROW = np.log(np.array([0.01, 0.01, 0.02, 0.4, 0.2, 0.15, 0.1, 0.11], dtype=np.float32))


def test_blocked_words_are_never_completions_and_are_counted_when_withheld() -> None:
    completer = Completer(BLOCK_VOCAB, str.lower, excluded=[0, 1, 2], blocked=["DARN"])
    assert completer.blocked_ids.tolist() == [3, 4]  # case folded: both spellings
    completion = completer.complete(BLOCK_ROW, "da", 2)
    assert isinstance(completion, Completion)
    assert [BLOCK_VOCAB[i] for i in completion.ids] == ["dart", "dare"]
    assert completion.withheld == 1  # "darn" would have ranked first ("Darn" does not start with "da")
    assert completion.matches == 2  # renormalised over the suggestable matches only
    assert np.exp(completion.log_probs).sum() == pytest.approx(1.0)
    assert completer.complete(BLOCK_ROW, "dart", 2).withheld == 0


def test_blocked_words_are_dropped_from_the_graphs_top_list_and_k_survive() -> None:
    completer = Completer(BLOCK_VOCAB, str.lower, excluded=[0, 1, 2], blocked=["darn"])
    order = np.argsort(-BLOCK_ROW)
    fetched = completer.fetch_k(3)
    assert fetched == 5
    ranked = completer.top(order[:fetched], BLOCK_ROW[order[:fetched]], 3)
    assert [BLOCK_VOCAB[i] for i in ranked.ids] == ["dart", "ok", "dare"]
    assert ranked.withheld == 2
    unblocked = Completer(BLOCK_VOCAB, str.lower, excluded=[0, 1, 2])
    assert unblocked.fetch_k(3) == 3
    assert unblocked.top(order[:3], BLOCK_ROW[order[:3]], 3).ids.tolist() == order[:3].tolist()


def test_sampling_never_emits_a_blocked_word() -> None:
    completer = Completer(BLOCK_VOCAB, str.lower, excluded=[0, 1, 2], blocked=["darn"])
    banned = completer.banned([0, 1])
    assert sorted(banned.tolist()) == [0, 1, 3, 4]
    rng = np.random.default_rng(0)
    drawn = {
        sample(BLOCK_ROW, rng, temperature, top_k, 1.0, banned)
        for temperature in (0.0, 1.0, 5.0)
        for top_k in (0, 2)
        for _ in range(200)
    }
    assert drawn
    assert not drawn & {0, 1, 3, 4}
    assert sample(BLOCK_ROW, rng, 0.0, 0, 1.0, banned) == 5  # greedy: the best word that is not blocked


def test_a_blocklist_file_has_one_word_per_line_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# offensive words\n\n  darn  \nDRAT\n", encoding="utf-8")
    assert read_blocklist(path) == ["darn", "DRAT"]
    assert blocklist_entries([None, path, path]) == ["darn", "DRAT", "darn", "DRAT"]
    path.write_text("darn\nnot one\n", encoding="utf-8")
    with pytest.raises(BlocklistError, match=r"blocklist.txt:2: 'not one' is not one word"):
        read_blocklist(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(BlocklistError, match="UTF-8"):
        read_blocklist(path)
    with pytest.raises(BlocklistError, match="cannot be read"):
        read_blocklist(tmp_path / "missing.txt")


def test_a_blocklist_entry_matches_every_normalised_spelling() -> None:
    vocab = ["<pad>", "<unk>", "<eos>", "ｄａｒｎ", "darn", "Straße", "strasse"]
    completer = Completer(vocab, str.lower, excluded=[0, 1, 2], blocked=["DARN", "STRASSE"])
    assert [vocab[i] for i in completer.blocked_ids] == ["ｄａｒｎ", "darn", "Straße", "strasse"]
    assert unicodedata.normalize("NFKC", "ｄａｒｎ") == "darn"
