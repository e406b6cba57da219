"""Corpora (files, directories, builtin:longrange), the batching helpers, and the evaluation arithmetic."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from model.corpus import (
    COUNTRY_LANGUAGE,
    LONGRANGE,
    CorpusError,
    Episode,
    load_corpus,
    longrange_episodes,
    longrange_text,
)
from model.data import batchify, encode_lines, encode_stream, line_batches, stream_windows
from model.evaluate import BUCKET_WIDTH, Tally, detach_state, evaluate_batches, evaluate_stream, long_range_accuracy
from model.lm import LSTMState
from vocab import EOS, Vocabulary, tokenize

PROPERTY = settings(max_examples=30, deadline=None)
COUNTRIES = {c for c, _ in COUNTRY_LANGUAGE}
LANGUAGES = {lang for _, lang in COUNTRY_LANGUAGE}
LONGEST_FILLER_SENTENCE = 10  # "my friend cooked the old table in the morning ." is the longest template fill


def parse(line: str) -> tuple[str, list[str], str]:
    """Country, filler words and language of one episode line, checking its frame."""
    words = line.split()
    assert words[:3] == ["i", "stay", "in"], line
    assert words[4] == ".", line
    assert words[-4:-2] == ["i", "speak"], line
    assert words[-1] == ".", line
    return words[3], words[5:-4], words[-2]


class TestFiles:
    def test_a_file_is_read_as_is(self, tmp_path: Path) -> None:
        path = tmp_path / "c.txt"
        path.write_text("Hello, wörld!\nsecond line\n", encoding="utf-8")
        assert load_corpus(str(path)) == "Hello, wörld!\nsecond line\n"

    def test_a_byte_order_mark_is_dropped(self, tmp_path: Path) -> None:
        path = tmp_path / "bom.txt"
        path.write_bytes("\ufeffhello".encode())
        assert load_corpus(str(path)) == "hello"

    def test_a_directory_joins_its_txt_files_in_sorted_order(self, tmp_path: Path) -> None:
        (tmp_path / "b.txt").write_text("second", encoding="utf-8")
        (tmp_path / "a.txt").write_text("first", encoding="utf-8")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "c.txt").write_text("nested", encoding="utf-8")
        (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
        (tmp_path / "data.bin").write_bytes(b"\x00\xff")
        assert load_corpus(str(tmp_path)) == "first\nsecond\nnested"

    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(CorpusError, match=r"corpus '.*nope\.txt' does not exist"):
            load_corpus(str(tmp_path / "nope.txt"))

    @pytest.mark.parametrize("content", ["", "   \n\t\n", "\ufeff"])
    def test_empty(self, tmp_path: Path, content: str) -> None:
        path = tmp_path / "empty.txt"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(CorpusError, match="is empty"):
            load_corpus(str(path))

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.txt"
        path.write_bytes("caf\xe9 au lait".encode("latin-1"))
        with pytest.raises(CorpusError, match=r"latin1\.txt is not valid UTF-8 \(byte 3\)"):
            load_corpus(str(path))

    @pytest.mark.parametrize("data", [b"abc\x00def", "utf-16 text".encode("utf-16")])
    def test_binary(self, tmp_path: Path, data: bytes) -> None:
        path = tmp_path / "blob.txt"
        path.write_bytes(data)
        with pytest.raises(CorpusError, match=r"looks binary .*NUL bytes"):
            load_corpus(str(path))

    def test_directory_without_txt_files(self, tmp_path: Path) -> None:
        (tmp_path / "readme.md").write_text("not a corpus", encoding="utf-8")
        with pytest.raises(CorpusError, match=r"holds no \.txt files"):
            load_corpus(str(tmp_path))

    def test_directory_of_empty_files(self, tmp_path: Path) -> None:
        (tmp_path / "a.txt").write_text("", encoding="utf-8")
        (tmp_path / "b.txt").write_text("  ", encoding="utf-8")
        with pytest.raises(CorpusError, match="is empty"):
            load_corpus(str(tmp_path))

    def test_a_bad_file_in_a_directory_is_named(self, tmp_path: Path) -> None:
        (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
        (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfd")
        with pytest.raises(CorpusError, match=r"bad\.txt is not valid UTF-8"):
            load_corpus(str(tmp_path))

    def test_corpus_error_is_a_value_error(self) -> None:
        assert issubclass(CorpusError, ValueError)


class TestLongRange:
    def test_deterministic_under_a_seed(self) -> None:
        text = load_corpus(LONGRANGE, seed=5, episodes=60, gap_max=30)
        assert text == load_corpus(LONGRANGE, seed=5, episodes=60, gap_max=30)
        assert text == longrange_text(seed=5, episodes=60, gap_max=30)
        assert text != load_corpus(LONGRANGE, seed=6, episodes=60, gap_max=30)
        assert text.endswith("\n")
        assert len(text.splitlines()) == 60

    def test_pairs(self) -> None:
        assert len(COUNTRY_LANGUAGE) >= 12
        assert len(COUNTRIES) == len(LANGUAGES) == len(COUNTRY_LANGUAGE)
        assert not COUNTRIES & LANGUAGES
        assert all(" " not in w and w == w.lower() for w in COUNTRIES | LANGUAGES)

    def test_episode_structure_and_every_pair_appears(self) -> None:
        pairs = dict(COUNTRY_LANGUAGE)
        seen = set()
        for line in load_corpus(LONGRANGE, seed=2, episodes=400, gap_max=20).splitlines():
            country, _, language = parse(line)
            assert pairs[country] == language
            seen.add(country)
        assert seen == COUNTRIES

    def test_filler_never_names_a_country_or_language(self) -> None:
        banned = COUNTRIES | LANGUAGES | {"i", "stay", "speak"}
        filler_words: set[str] = set()
        for line in load_corpus(LONGRANGE, seed=9, episodes=300, gap_min=20, gap_max=60).splitlines():
            _, filler, _ = parse(line)
            filler_words.update(filler)
        assert len(filler_words) > 40  # the grammar was actually exercised
        assert not filler_words & banned
        # the tokenizer agrees with the whitespace split, so a vocabulary sees the same words
        line = load_corpus(LONGRANGE, seed=9, episodes=1, gap_min=20, gap_max=20).splitlines()[0]
        assert tokenize(line) == line.split()

    def test_episode_gap_counts_the_filler_words(self) -> None:
        for episode in longrange_episodes(seed=4, count=100, gap_min=5, gap_max=40):
            assert isinstance(episode, Episode)
            country, filler, language = parse(episode.text)
            assert (country, language) == (episode.country, episode.language)
            assert episode.gap == len(filler)
            assert "\n" not in episode.text

    def test_zero_gap_means_no_filler(self) -> None:
        for line in load_corpus(LONGRANGE, seed=1, episodes=30, gap_min=0, gap_max=0).splitlines():
            country, filler, language = parse(line)
            assert filler == []
            assert line == f"i stay in {country} . i speak {language} ."

    @pytest.mark.parametrize(("gap_min", "gap_max"), [(0, 10), (25, 25), (30, 50), (90, 100)])
    def test_gap_arguments_bound_the_gap(self, gap_min: int, gap_max: int) -> None:
        text = load_corpus(LONGRANGE, seed=gap_min, episodes=80, gap_min=gap_min, gap_max=gap_max)
        gaps = [len(parse(line)[1]) for line in text.splitlines()]
        assert min(gaps) >= gap_min
        # filler comes in whole sentences: at most one sentence past the drawn target
        assert max(gaps) < gap_max + LONGEST_FILLER_SENTENCE
        if gap_max - gap_min >= 20:
            assert max(gaps) - min(gaps) >= (gap_max - gap_min) // 2  # the range is actually used

    @pytest.mark.parametrize(("gap_min", "gap_max"), [(10, 5), (-1, 5), (-5, -1)])
    def test_bad_gap_arguments(self, gap_min: int, gap_max: int) -> None:
        message = rf"need 0 <= gap_min <= gap_max, got {gap_min} and {gap_max}"
        with pytest.raises(CorpusError, match=message):
            load_corpus(LONGRANGE, episodes=5, gap_min=gap_min, gap_max=gap_max)
        with pytest.raises(CorpusError, match=message):
            list(longrange_episodes(0, 5, gap_min, gap_max))

    @pytest.mark.parametrize("spec", ["builtin:", "builtin:wikitext", "builtin:longrange2", "builtin:LONGRANGE"])
    def test_unknown_builtin(self, spec: str) -> None:
        with pytest.raises(CorpusError, match=rf"unknown built-in corpus '{spec}'; available: builtin:longrange"):
            load_corpus(spec)

    @pytest.mark.parametrize("episodes", [0, -3])
    def test_no_episodes_is_an_empty_corpus(self, episodes: int) -> None:
        with pytest.raises(CorpusError):
            load_corpus(LONGRANGE, episodes=episodes)


# --- model/data.py ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(tokenize(longrange_text(seed=0, episodes=200, gap_max=30)))


def test_encode_stream_and_lines(vocab: Vocabulary) -> None:
    text = "i stay in france .\n\ni speak klingon .\n"
    stream = encode_stream(vocab, text)
    assert stream.dtype == torch.long
    assert stream.dim() == 1
    words = ["i", "stay", "in", "france", ".", EOS, EOS, "i", "speak", "<unk>", ".", EOS]  # the blank line is an <eos>
    assert vocab.decode(stream.tolist()) == words
    lines = encode_lines(vocab, text)
    assert [vocab.decode(ids) for ids in lines] == [
        ["i", "stay", "in", "france", ".", EOS],
        ["i", "speak", "<unk>", ".", EOS],
    ]  # the blank line is skipped, each line ends with <eos>


@PROPERTY
@given(length=st.integers(2, 60), batch_size=st.integers(1, 8))
def test_batchify_cuts_contiguous_streams(length: int, batch_size: int) -> None:
    ids = torch.arange(length)
    if length // batch_size < 2:
        with pytest.raises(ValueError, match=rf"{length} tokens are too few for batch size {batch_size}"):
            batchify(ids, batch_size)
        return
    streams = batchify(ids, batch_size)
    n = length // batch_size
    assert streams.shape == (batch_size, n)
    assert torch.equal(streams.reshape(-1), ids[: batch_size * n])  # row r is ids[r*n : (r+1)*n], remainder dropped


@PROPERTY
@given(batch=st.integers(1, 4), width=st.integers(1, 40), bptt=st.integers(1, 12))
def test_stream_windows_cover_the_stream_with_shifted_targets(batch: int, width: int, bptt: int) -> None:
    streams = torch.arange(batch * width).view(batch, width)
    windows = list(stream_windows(streams, bptt))
    assert len(windows) == math.ceil((width - 1) / bptt)
    if not windows:
        return
    for k, (inputs, targets) in enumerate(windows):
        assert inputs.shape == targets.shape
        assert inputs.shape[0] == batch
        assert 1 <= inputs.shape[1] <= bptt
        if k < len(windows) - 1:
            assert inputs.shape[1] == bptt
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(torch.cat([i for i, _ in windows], dim=1), streams[:, :-1])
    assert torch.equal(torch.cat([t for _, t in windows], dim=1), streams[:, 1:])


def test_line_batches_pad_and_shift() -> None:
    lines = [[5, 6, 7, 2], [8, 2], [9, 10, 2], [11, 12, 13, 14, 2]]
    batches = line_batches(lines, batch_size=2, pad_id=0)
    inputs, targets = batches[0]  # shortest lines first, padded to the longer of the two
    assert inputs.tolist() == [[8, 0], [9, 10]]
    assert targets.tolist() == [[2, 0], [10, 2]]
    inputs, targets = batches[1]
    assert inputs.tolist() == [[5, 6, 7, 0], [11, 12, 13, 14]]
    assert targets.tolist() == [[6, 7, 2, 0], [12, 13, 14, 2]]
    shuffled = line_batches(lines, batch_size=1, pad_id=0, rng=random.Random(3))
    fixed = line_batches(lines, batch_size=1, pad_id=0)
    assert sorted(b[0].tolist() for b in shuffled) == sorted(b[0].tolist() for b in fixed)
    assert [b[0].tolist() for b in fixed] == [[[8]], [[9, 10]], [[5, 6, 7]], [[11, 12, 13, 14]]]


# --- model/evaluate.py --------------------------------------------------------------------------------------------


class Uniform:
    """A language model that gives every word the same probability."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.calls = 0

    def __call__(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        self.calls += 1
        return torch.zeros(*tokens.shape, self.vocab_size), state

    def zero_state(self, batch_size: int) -> Any:
        return None

    def eval(self) -> Any:
        return self

    def train(self, mode: bool = True) -> Any:
        return self


def test_uniform_model_perplexity_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 37, (203,), generator=torch.Generator().manual_seed(0))
    model = Uniform(37)
    metrics = evaluate_stream(model, ids, batch_size=4, bptt=9)
    assert metrics["perplexity"] == pytest.approx(37.0, rel=1e-5)
    assert metrics["loss"] == pytest.approx(math.log(37), rel=1e-6)
    assert metrics["tokens"] == 4 * (203 // 4 - 1)
    assert model.calls == math.ceil((203 // 4 - 1) / 9)

    lines = [[3, 4, 5, 2], [6, 2], [7, 8, 9, 10, 11, 2]]
    metrics = evaluate_batches(Uniform(37), line_batches(lines, 2, pad_id=0), pad_id=0)
    assert metrics["perplexity"] == pytest.approx(37.0, rel=1e-5)
    assert metrics["tokens"] == 3 + 1 + 5  # padding is not counted


def test_tally_arithmetic() -> None:
    tally = Tally()
    assert tally.metrics() == {"loss": 0.0, "perplexity": 1.0, "top1": 0.0, "top5": 0.0, "tokens": 0}
    # 7 words; each row ranks word j at logit -j (word 0 best), so the target's rank is its id.
    logits = -torch.arange(7.0).expand(2, 3, 7)
    targets = torch.tensor([[0, 1, 4], [5, 6, 0]])
    tally.add(logits, targets)
    log_z = math.log(sum(math.exp(-j) for j in range(7)))
    expected_nll = sum(t + log_z for t in targets.flatten().tolist())
    assert tally.tokens == 6
    assert tally.top1 == 2  # the two 0s
    assert tally.top5 == 4  # 0, 1, 4, 0
    assert tally.nll == pytest.approx(expected_nll, rel=1e-6)
    tally.add(logits[:1], torch.tensor([[3, 0, 0]]), ignore_id=0)  # only the 3 counts
    tally.add(logits[:1], torch.zeros(1, 3, dtype=torch.long), ignore_id=0)  # nothing counts
    metrics = tally.metrics()
    assert metrics["tokens"] == 7
    assert metrics["top1"] == pytest.approx(2 / 7)
    assert metrics["top5"] == pytest.approx(5 / 7)
    assert metrics["loss"] == pytest.approx((expected_nll + 3 + log_z) / 7, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_tally_splits_the_loss_on_unk_targets() -> None:
    """With unk_id, the <unk> targets' share of tokens and of the loss, and the perplexity of the rest."""
    logits = -torch.arange(7.0).expand(1, 4, 7)  # word j costs j + log Z
    log_z = math.log(sum(math.exp(-j) for j in range(7)))
    tally = Tally(unk_id=1)
    tally.add(logits, torch.tensor([[1, 1, 3, 6]]))
    metrics = tally.metrics()
    unk_nll, known_nll = 2 * (1 + log_z), (3 + log_z) + (6 + log_z)
    assert metrics["unk_targets"] == pytest.approx(0.5)
    assert metrics["unk_loss_share"] == pytest.approx(unk_nll / (unk_nll + known_nll), rel=1e-6)
    assert metrics["perplexity_known"] == pytest.approx(math.exp(known_nll / 2), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp((unk_nll + known_nll) / 4), rel=1e-6)
    assert "unk_targets" not in Tally().metrics()  # without unk_id the metrics are the plain ones


def test_tally_top5_with_fewer_than_five_words_and_perplexity_cap() -> None:
    tally = Tally()
    tally.add(torch.tensor([[[0.0, 1000.0, 0.0]]]), torch.tensor([[0]]))
    metrics = tally.metrics()
    assert (metrics["top1"], metrics["top5"]) == (0.0, 1.0)  # 3 words: all are in the top 5
    assert metrics["loss"] == pytest.approx(1000.0)
    assert metrics["perplexity"] == math.exp(50.0)  # capped, not inf


def test_detach_state_keeps_type_and_values() -> None:
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    state = LSTMState(hidden * 2, hidden + 1)
    detached = detach_state(state)
    assert isinstance(detached, LSTMState)
    assert not detached.hidden.requires_grad
    assert not detached.cell.requires_grad
    assert torch.equal(detached.hidden, state.hidden)
    assert torch.equal(detached.cell, state.cell)


class Oracle(Uniform):
    """Reads the country four tokens in and names its language, or always names one fixed language."""

    def __init__(self, vocab: Vocabulary, fixed: str | None = None) -> None:
        super().__init__(len(vocab))
        self.answer = {vocab.index[c]: vocab.index[lang] for c, lang in COUNTRY_LANGUAGE}
        self.fixed = None if fixed is None else vocab.index[fixed]

    def __call__(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        logits, state = super().__call__(tokens, state)
        for row in range(tokens.shape[0]):
            word = self.fixed if self.fixed is not None else self.answer[int(tokens[row, 3])]
            logits[row, -1, word] = 1.0
        return logits, state


class Copycat(Uniform):
    """Predicts that the last word repeats: it can only score if the prompt leaks the answer."""

    def __call__(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        logits, state = super().__call__(tokens, state)
        logits[torch.arange(tokens.shape[0]), -1, tokens[:, -1]] = 1.0
        return logits, state


def test_long_range_accuracy_buckets(vocab: Vocabulary) -> None:
    perfect = long_range_accuracy(Oracle(vocab), vocab, seed=1, per_bucket=6, max_gap=30)
    assert list(perfect) == ["0-10", "10-20", "20-30"]
    for name, bucket in perfect.items():
        low = int(name.split("-")[0])
        assert bucket["accuracy"] == 1.0
        assert bucket["episodes"] == 6
        assert low <= bucket["mean_gap"] < low + BUCKET_WIDTH

    stubborn = long_range_accuracy(Oracle(vocab, fixed="hindi"), vocab, seed=1, per_bucket=6, max_gap=30)
    assert all(b["accuracy"] < 1.0 for b in stubborn.values())  # every bucket holds some non-India episode
    assert all(b["mean_gap"] == perfect[k]["mean_gap"] for k, b in stubborn.items())  # same episodes for a seed
    uniform = long_range_accuracy(Uniform(len(vocab)), vocab, seed=1, per_bucket=6, max_gap=30)
    assert all(b["accuracy"] == 0.0 for b in uniform.values())  # argmax of a tie is word 0, <pad>
    copycat = long_range_accuracy(Copycat(len(vocab)), vocab, seed=1, per_bucket=6, max_gap=30)
    assert all(b["accuracy"] == 0.0 for b in copycat.values())  # the prompt ends at "speak"
