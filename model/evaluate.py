"""Perplexity, top-1/top-5 accuracy, and the long-range memory probe (calibration: model/calibration.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from model.corpus import Episode, longrange_episode
from model.data import batchify, stream_windows
from vocab import Vocabulary


class LanguageModel(Protocol):
    """What training and evaluation need: state in, state out."""

    def __call__(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    def zero_state(self, batch_size: int) -> Any: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def detach_state(state: Any) -> Any:
    """Cut the autograd history of a (named) tuple of tensors, keeping its values."""
    return type(state)(*(s.detach() for s in state))


class Tally:
    """Running sums for loss, top-1 and top-5 over non-padding targets.

    With unk_id, also how much of the loss falls on `<unk>` targets: held-out text is often rich in
    words the vocabulary lacks, and this separates "the model is bad at words" from "the text is
    full of unknown ones".
    """

    def __init__(self, unk_id: int | None = None) -> None:
        self.nll = 0.0
        self.top1 = 0
        self.top5 = 0
        self.tokens = 0
        self.unk_id = unk_id
        self.unk_nll = 0.0
        self.unk_tokens = 0

    def add(self, logits: Tensor, targets: Tensor, ignore_id: int | None = None) -> None:
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
        flat_targets = targets.reshape(-1)
        if ignore_id is not None:
            keep = flat_targets != ignore_id
            flat_logits, flat_targets = flat_logits[keep], flat_targets[keep]
        if flat_targets.numel() == 0:
            return
        nll = nn.functional.cross_entropy(flat_logits, flat_targets, reduction="none")  # (N,)
        self.nll += nll.sum().item()
        if self.unk_id is not None:
            unk = flat_targets == self.unk_id
            self.unk_nll += nll[unk].sum().item()
            self.unk_tokens += int(unk.sum())
        top5 = flat_logits.topk(min(5, flat_logits.shape[-1]), dim=-1).indices
        hits = top5 == flat_targets.unsqueeze(-1)
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=-1).sum())
        self.tokens += flat_targets.numel()

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        loss = self.nll / n
        metrics = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "top1": self.top1 / n,
            "top5": self.top5 / n,
            "tokens": self.tokens,
        }
        if self.unk_id is not None:
            known = self.tokens - self.unk_tokens
            metrics["unk_targets"] = self.unk_tokens / n  # share of scored targets that are <unk>
            metrics["unk_loss_share"] = self.unk_nll / self.nll if self.nll > 0 else 0.0
            metrics["perplexity_known"] = math.exp(min((self.nll - self.unk_nll) / max(known, 1), 50.0))
        return metrics


def evaluation_streams(ids: Tensor, batch_size: int) -> Tensor:
    """The parallel streams a held-out text is read as: batch_size of them, fewer for a very short text.

    evaluate_stream and fit_calibration both read text this way, so a fit sees the tokens an evaluation scores.
    """
    return batchify(ids, min(batch_size, max(1, ids.numel() // 2)))


@torch.no_grad()
def evaluate_stream(
    model: LanguageModel, ids: Tensor, batch_size: int = 10, bptt: int = 70, unk_id: int | None = None
) -> dict[str, float]:
    """Metrics over a token stream, carrying state across windows as the service would.

    With unk_id the metrics add `unk_targets`, `unk_loss_share` and `perplexity_known` (see Tally).
    """
    model.eval()
    streams = evaluation_streams(ids, batch_size)
    state = model.zero_state(streams.shape[0])
    tally = Tally(unk_id)
    for inputs, targets in stream_windows(streams, bptt):
        logits, state = model(inputs, state)
        tally.add(logits, targets)
    return tally.metrics()


@torch.no_grad()
def evaluate_batches(model: LanguageModel, batches: Iterable[tuple[Tensor, Tensor]], pad_id: int) -> dict[str, float]:
    """Metrics over padded line batches, each line from a zero state."""
    model.eval()
    tally = Tally()
    for inputs, targets in batches:
        logits, _ = model(inputs, model.zero_state(inputs.shape[0]))
        tally.add(logits, targets, ignore_id=pad_id)
    return tally.metrics()


BUCKET_WIDTH = 10


def bucket_episodes(seed: int, low: int, count: int) -> list[Episode]:
    """`count` episodes whose actual filler gap lies in [low, low + BUCKET_WIDTH)."""
    rng = random.Random(seed * 1000 + low)
    chosen: list[Episode] = []
    while len(chosen) < count:
        # Filler comes in whole sentences, so aim a little low and keep only exact fits.
        episode = longrange_episode(rng, max(0, low - 8), low + BUCKET_WIDTH - 1)
        if low <= episode.gap < low + BUCKET_WIDTH:
            chosen.append(episode)
    return chosen


@torch.no_grad()
def long_range_accuracy(
    model: LanguageModel, vocab: Vocabulary, seed: int = 12345, per_bucket: int = 100, max_gap: int = 100
) -> dict[str, dict[str, float]]:
    """Accuracy of the word after "i speak" by filler-gap bucket, on fresh episodes.

    For each bucket [lo, lo+10) we draw `per_bucket` episodes whose gap lies in it, feed each up to
    and including "speak" from a zero state, and check the arg-max next word against the language.
    """
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for low in range(0, max_gap, BUCKET_WIDTH):
        episodes = bucket_episodes(seed, low, per_bucket)
        prompts = []
        answers = []
        for episode in episodes:
            words = episode.text.split()
            cut = len(words) - 2  # drop "<language> ."
            prompts.append(vocab.encode_tokens(words[:cut]))
            answers.append(vocab.index.get(episode.language, vocab.unk_id))
        correct = 0
        # Prompts differ in length; run them one length-group at a time so no padding is needed.
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for indices in by_length.values():
            tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long)
            logits, _ = model(tokens, model.zero_state(len(indices)))
            predicted = logits[:, -1].argmax(dim=-1)
            for row, i in enumerate(indices):
                correct += int(predicted[row].item() == answers[i])
        gaps = [e.gap for e in episodes]
        results[f"{low}-{low + BUCKET_WIDTH}"] = {
            "accuracy": correct / len(episodes),
            "episodes": len(episodes),
            "mean_gap": sum(gaps) / len(gaps),
        }
    return results
