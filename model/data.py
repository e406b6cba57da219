"""Token ids into batches: a continuous stream for truncated BPTT, or one sequence per line; a run's data."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from model.corpus import LONGRANGE, load_corpus, longrange_text
from model.recipe import TrainConfig, tokenization
from vocab import Vocabulary, tokenize


def encode_stream(vocab: Vocabulary, text: str) -> Tensor:
    """All of text as one 1-D int64 tensor of ids."""
    return torch.tensor(vocab.encode_tokens(vocab.tokenize(text)), dtype=torch.long)


def encode_lines(vocab: Vocabulary, text: str) -> list[list[int]]:
    """One id list per non-empty line, each ending with `<eos>`."""
    lines = []
    for line in text.splitlines():
        ids = vocab.encode_tokens(vocab.tokenize(line))
        if ids:
            lines.append([*ids, vocab.eos_id])
    return lines


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a stream into batch_size parallel streams: (N,) -> (B, N // B), dropping the remainder."""
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch size {batch_size}")
    return ids[: n * batch_size].view(batch_size, n)


def rare_words_to_unk(ids: Tensor, counts: Tensor, alpha: float, unk_id: int, generator: torch.Generator) -> Tensor:
    """A copy of the stream where each occurrence of a word seen c times becomes `<unk>` with probability α/(α+c).

    Held-out text meets words the training text never showed, all of them `<unk>` (13.7 % of the
    WikiText-2 quality test's tokens, against 5.3 % `<unk>` in its train portion). Rare training words
    stand in for them: replaced now and then, they teach the model where an unknown word is likely
    and what to make of one as input. Frequent words are almost never touched (the 1/(α+c) tail).
    """
    probability = alpha / (alpha + counts[ids].double())
    replace = torch.rand(ids.shape, generator=generator, dtype=torch.float64) < probability
    return torch.where(replace, torch.full_like(ids, unk_id), ids)


def stream_windows(streams: Tensor, bptt: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) windows of at most bptt steps over (B, N) streams, in order."""
    for start in range(0, streams.shape[1] - 1, bptt):
        length = min(bptt, streams.shape[1] - 1 - start)
        yield streams[:, start : start + length], streams[:, start + 1 : start + 1 + length]


def line_batches(
    lines: Sequence[Sequence[int]], batch_size: int, pad_id: int, rng: random.Random | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Padded (inputs, targets) batches, lines of similar length together; targets use pad_id as ignore.

    With rng the batch order is shuffled (training); without it the order is fixed (evaluation).
    """
    order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [lines[i] for i in order[start : start + batch_size]]
        width = max(len(x) for x in chosen) - 1
        inputs = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(chosen):
            seq = torch.tensor(ids, dtype=torch.long)
            inputs[row, : len(ids) - 1] = seq[:-1]
            targets[row, : len(ids) - 1] = seq[1:]
        batches.append((inputs, targets))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def split_valid(text: str, fraction: float) -> tuple[str, str]:
    """The text's lines cut into (train, validation): the last `fraction` of them held out."""
    lines = text.splitlines()
    cut = max(1, int(len(lines) * (1 - fraction)))
    if cut >= len(lines):
        raise ValueError("the corpus has too few lines to hold out a validation slice; pass --valid")
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n"


class TrainingData:
    """A run's training and validation data in its mode, and its config with the tokenization decided.

    With a vocabulary (a resumed run's), text is read with that vocabulary's rules; without one, the
    vocabulary is built from the training text by the config's (model.recipe.tokenization).
    """

    def __init__(self, cfg: TrainConfig, vocab: Vocabulary | None) -> None:
        self.longrange = cfg.corpus == LONGRANGE
        text = load_corpus(cfg.corpus, cfg.seed, cfg.episodes, cfg.gap_min, cfg.gap_max)
        if cfg.valid:
            train_text, valid_text = text, load_corpus(cfg.valid)
        else:
            train_text, valid_text = split_valid(text, cfg.valid_fraction)
        if vocab is None:
            cfg = tokenization(cfg, train_text)
            vocab = Vocabulary.build(
                tokenize(train_text, bool(cfg.lowercase), cfg.split),
                min_freq=cfg.min_freq,
                max_size=cfg.max_vocab,
                lowercase=bool(cfg.lowercase),
                split=cfg.split,
            )
        else:
            cfg = replace(cfg, lowercase=vocab.lowercase, split=vocab.split)
        self.cfg = cfg
        self.vocab = vocab
        if cfg.mode == "lines":
            self.valid_lines = encode_lines(vocab, valid_text)
            self.train_lines = encode_lines(vocab, train_text)
        else:
            self.valid_ids = encode_stream(vocab, valid_text)
            self.train_ids = encode_stream(vocab, train_text)
            self.train_counts = torch.bincount(self.train_ids, minlength=len(vocab))  # (V,), the sampled softmax's q
            self.train_streams = batchify(self.train_ids, cfg.batch_size)

    def train_batches(self, epoch: int, rng: random.Random, gap_max: int) -> list[tuple[Tensor, Tensor]]:
        """The epoch's batches: stream windows (rare words drawn as <unk> afresh), or shuffled line batches."""
        cfg = self.cfg
        if cfg.mode == "stream":
            streams = self.train_streams
            if cfg.rare_word_unk > 0:
                # A fresh draw each epoch, fixed by (seed, epoch) so that --resume replays it.
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
                unk = self.vocab.unk_id
                ids = rare_words_to_unk(self.train_ids, self.train_counts, cfg.rare_word_unk, unk, generator)
                streams = batchify(ids, cfg.batch_size)
            return list(stream_windows(streams, cfg.bptt))
        lines = self.train_lines
        if self.longrange:
            # Fresh episodes every epoch (no memorisation), with the curriculum's largest gap.
            text = longrange_text(cfg.seed * 7919 + epoch, cfg.episodes, cfg.gap_min, gap_max)
            lines = encode_lines(self.vocab, text)
        return line_batches(lines, cfg.batch_size, self.vocab.pad_id, rng)
