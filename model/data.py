"""Token ids into batches: a continuous stream for truncated BPTT, or one sequence per line."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from model.vocab import Vocabulary


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
