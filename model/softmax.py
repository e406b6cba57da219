"""Training losses over the decoder: the full softmax, and a sampled softmax that is cheaper per token.

The decoder (V x H, tied to the embedding) dominates the cost of a training step when V is large:
three (N x H) x (H x V) matmuls plus a log-softmax over N x V. The sampled softmax (Jean et al.,
2015) scores each target against `samples` negatives shared by the whole batch, drawn from the
training text's unigram distribution (word2vec's count^0.75 was no better: docs/experiments.md,
g10-g12). Each sampled logit is corrected by log(samples · q(word)), which makes the sampled sum an
unbiased estimate of the partition function over the other words; the target's own logit is exact.
The loss therefore tends to the full cross-entropy as `samples` grows, and its gradient to the full
softmax's. It only ever changes training: evaluation, export and serving keep the full softmax over
the same decoder weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SampledSoftmax:
    """Sampled-softmax loss with a fixed proposal q(w) ∝ count(w) over the vocabulary."""

    def __init__(self, counts: Tensor, samples: int) -> None:
        if samples < 1:
            raise ValueError(f"samples must be positive, got {samples}")
        # Every word gets drawn now and then, even one the stream never shows (<pad>): the full softmax
        # at evaluation sums over all of them, so training must push them all down.
        weights = counts.double().clamp(min=1)
        self.probs = (weights / weights.sum()).float()  # (V,)
        self.samples = samples
        self.log_expected = torch.log(self.probs * samples)  # (V,)

    def loss(self, outputs: Tensor, targets: Tensor, weight: Tensor, bias: Tensor, sparse_grad: bool = False) -> Tensor:
        """Mean loss of outputs (N, H) for targets (N,) against decoder weight (V, H) and bias (V,).

        With sparse_grad the weight's gradient is row-sparse: only the N + S gathered rows.
        """
        negatives = torch.multinomial(self.probs, self.samples, replacement=True)  # (S,)
        # One gather for targets and negatives: its backward builds one gradient (dense (V, H), or the gathered
        # rows when sparse), where two gathers would each zero-fill and accumulate a (V, H) buffer.
        n = targets.shape[0]
        words = torch.cat([targets, negatives])  # (N + S,)
        rows = nn.functional.embedding(words, weight, sparse=sparse_grad)  # (N + S, H)
        row_bias = bias[words]  # (N + S,)
        true_logit = (outputs * rows[:n]).sum(-1) + row_bias[:n]  # (N,)
        sampled_logits = outputs @ rows[n:].t() + row_bias[n:]  # (N, S)
        sampled_logits = sampled_logits - self.log_expected[negatives]
        # The target is counted exactly by true_logit; its draws among the negatives would count it twice.
        hits = negatives.unsqueeze(0) == targets.unsqueeze(1)  # (N, S)
        sampled_logits = sampled_logits.masked_fill(hits, float("-inf"))
        logits = torch.cat([true_logit.unsqueeze(1), sampled_logits], dim=1).float()  # (N, 1 + S)
        return nn.functional.cross_entropy(logits, targets.new_zeros(targets.shape[0]))
