"""Perplexity, top-1/top-5 accuracy, and the long-range memory probe."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from model.corpus import Episode, longrange_episode
from model.data import batchify, stream_windows
from model.lm import LSTMLanguageModel
from model.vocab import Vocabulary


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


class Calibration(NamedTuple):
    """softmax(z / temperature + prior_weight · log q): the model's logits z, sharpened or softened, times a prior."""

    temperature: float
    prior_weight: float  # γ: how much of the unigram prior q to multiply in (0 without one)
    nll: float  # the mean NLL it reaches on the text it was fitted on


Statistics = Callable[[Tensor], tuple[float, Tensor, Tensor]]


def newton_minimise(statistics: Statistics, theta: Tensor, tolerance: float = 1e-7) -> tuple[Tensor, float]:
    """Minimise a convex function from theta by Newton's method; returns the minimiser and the minimum.

    statistics(θ) gives the value, gradient and Hessian. A step that does not lower the value is halved (Newton
    overshoots only far from the optimum); θ[0], a fit's inverse temperature, stays in [0.05, 20]. `tolerance` is
    the value's rounding floor: the calibration's NLL is a sum of float32 terms, so changes below ~1e-7 nats per
    token are rounding, not progress. It stops when Newton's decrement (what is left to gain on the local
    quadratic) or the last step's gain falls below it. Asking for 1e-9 had one WikiText fit chase rounding near
    an ill-conditioned optimum, halving every step a dozen times: 226 s instead of 8.
    """
    k = theta.numel()
    value, gradient, hessian = statistics(theta)
    for _ in range(30):
        step = torch.linalg.solve(hessian + 1e-9 * torch.eye(k, dtype=torch.float64), gradient)
        if float(gradient @ step) / 2 < tolerance:
            break
        for _ in range(20):
            candidate = theta - step
            candidate[0] = candidate[0].clamp(0.05, 20.0)
            found = statistics(candidate)
            if found[0] <= value:
                break
            step = step / 2
        else:
            break
        gained = value - found[0]
        theta, (value, gradient, hessian) = candidate, found
        if gained < tolerance:
            break
    return theta, value


@torch.no_grad()
def fit_calibration(
    model: LSTMLanguageModel,
    ids: Tensor,
    log_prior: Tensor | None = None,
    batch_size: int = 10,
    bptt: int = 70,
    chunk: int = 1024,
) -> Calibration:
    """The temperature (and, with log_prior (V,), the prior's weight) with the lowest perplexity on a token stream.

    The stream is read as evaluate_stream reads it. With z the logits before any temperature, θ = (β, γ) and
    features f = (z, log q), the mean NLL(θ) = mean(logsumexp(θ·f) − θ·f_target) is convex in θ: its gradient
    is E_p[f] − f_target and its Hessian Cov_p[f] under p = softmax(θ·f). Newton's method from θ = (1, 0),
    halving a step that does not lower the NLL, over the top-layer outputs kept from one pass (H floats
    per token, not V). β = 1 / temperature.
    """
    model.eval()
    streams = evaluation_streams(ids, batch_size)
    state = model.zero_state(streams.shape[0])
    outputs, targets = [], []
    for inputs, window_targets in stream_windows(streams, bptt):
        hidden, state = model.hidden_states(inputs, state)
        outputs.append(hidden.reshape(-1, hidden.shape[-1]))
        targets.append(window_targets.reshape(-1))
    hidden, target = torch.cat(outputs), torch.cat(targets)
    prior = None if log_prior is None else log_prior.float()
    k = 1 if prior is None else 2

    def statistics(theta: Tensor) -> tuple[float, Tensor, Tensor]:
        """Mean NLL at theta, its gradient and its Hessian.

        Per token in float32, summed in float64. The terms in the prior, which does not vary by token, are
        matrix-vector products; only those in z take elementwise passes over the (N, V) chunk.
        """
        beta, gamma = theta.tolist() + [0.0] * (2 - k)
        nll = 0.0
        sums = torch.zeros(5, dtype=torch.float64)  # over tokens: E[z] − z_y, E[q] − q_y, E[z²], E[zq], E[q²]
        products = torch.zeros(3, dtype=torch.float64)  # over tokens: E[z]², E[z]E[q], E[q]²
        for start in range(0, target.numel(), chunk):
            z = nn.functional.linear(hidden[start : start + chunk], model.decoder_weight, model.decoder_bias)
            y = target[start : start + chunk, None]
            scores = beta * z if prior is None else torch.add(beta * z, prior, alpha=gamma)
            log_p = torch.log_softmax(scores, dim=-1)
            nll -= float(log_p.gather(1, y).double().sum())
            p = log_p.exp_()
            pz = p * z
            mean_z = pz.sum(-1)  # E_p[z], (N,)
            sums[0] += float((mean_z - z.gather(1, y).squeeze(1)).double().sum())
            sums[2] += float((pz * z).sum(-1).double().sum())
            products[0] += float((mean_z.double() ** 2).sum())
            if prior is not None:
                mean_q = p @ prior  # E_p[log q], (N,)
                sums[1] += float((mean_q - prior[y.squeeze(1)]).double().sum())
                sums[3] += float((pz @ prior).double().sum())
                sums[4] += float((p @ (prior * prior)).double().sum())
                products[1] += float((mean_z.double() * mean_q.double()).sum())
                products[2] += float((mean_q.double() ** 2).sum())
        n = target.numel()
        gradient = sums[:k] / n
        zz, zq, qq = (sums[2:] - products).tolist()  # the covariances Cov_p[f], summed over tokens
        hessian = torch.tensor([[zz, zq], [zq, qq]], dtype=torch.float64)[:k, :k] / n
        return nll / n, gradient, hessian

    theta, nll = newton_minimise(statistics, torch.tensor([1.0, 0.0][:k], dtype=torch.float64))
    beta, gamma = float(theta[0]), float(theta[1]) if k == 2 else 0.0
    return Calibration(temperature=1.0 / beta, prior_weight=gamma, nll=nll)


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
