"""Calibration: a trained model's temperature and the weight of a unigram prior, fitted on validation text.

A model short of training is over-confident and leans too little on word frequency. Two numbers fitted
once training ends correct both: the model becomes softmax(z / T + γ log q), q the training text's unigram
distribution. The prior folds into the decoder bias, so a calibrated checkpoint is the same network with
another bias and a temperature: export and serving need nothing new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from model.checkpoint import Checkpoint, save_checkpoint
from model.data import stream_windows
from model.evaluate import evaluate_stream, evaluation_streams
from model.lm import LSTMLanguageModel


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


def unigram_log_prior(counts: Tensor) -> Tensor:
    """log q(w) of the training text's unigram distribution, add-one (a word it never shows is not impossible)."""
    smoothed = counts.double().clamp(min=1.0)
    return (smoothed / smoothed.sum()).log()


def with_calibration(ckpt: Checkpoint, temperature: float, prior_weight: float, log_prior: Tensor | None) -> Checkpoint:
    """ckpt's network as softmax(z / temperature + prior_weight · log q), the prior folded into the decoder bias.

    (W h + b) / T + γ log q = (W h + b + γ T log q) / T: another bias and a temperature, nothing else.
    """
    if prior_weight != 0.0 and log_prior is None:
        raise ValueError("a prior weight without the prior's log-probabilities (the training text's unigram counts)")
    state_dict = dict(ckpt.state_dict)
    if log_prior is not None and prior_weight != 0.0:
        bias = state_dict["decoder_bias"]
        state_dict["decoder_bias"] = bias + (prior_weight * temperature * log_prior).to(bias.dtype)
    return replace(ckpt, config=replace(ckpt.config, temperature=temperature), state_dict=state_dict)


def as_trained(ckpt: Checkpoint, log_prior: Tensor | None) -> Checkpoint:
    """A calibrated checkpoint's network as training left it (the inverse of calibrate_checkpoint's fold)."""
    temperature, prior_weight = ckpt.config.temperature, float(ckpt.metrics.get("prior_weight", 0.0))
    # Temperature 1 and weight −γ T take the γ T log q back out of the bias.
    return with_calibration(ckpt, 1.0, -prior_weight * temperature, log_prior)


def calibrate_checkpoint(
    ckpt: Checkpoint,
    out: Path,
    valid_ids: Tensor,
    train_counts: Tensor | None = None,
    valid_as_trained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate the checkpoint on valid_ids and save it to out; returns its new metrics.

    The model becomes softmax(z / T + γ log q): T its temperature and, with train_counts, q the training text's
    unigram distribution (add-one), both fitted on the validation text (fit_calibration). A
    model short of training is over-confident and leans too little on word frequency; these two numbers
    correct both. The prior folds into the decoder bias, (W h + b + γ T log q) / T, so the calibrated model
    is the same network with another bias and a temperature: export and serving need nothing new. The
    metrics keep the validation figures as trained (`valid_uncalibrated`) beside those after; a caller that
    has them already, measured by evaluate_stream on these valid_ids, passes them as valid_as_trained.
    """
    started = time.monotonic()
    if ckpt.config.temperature != 1.0 or "prior_weight" in ckpt.metrics:
        raise ValueError(f"the checkpoint is calibrated already (temperature {ckpt.config.temperature:.4f})")
    model = ckpt.build_model()
    log_prior = None if train_counts is None else unigram_log_prior(train_counts)
    fit = fit_calibration(model, valid_ids, log_prior)
    calibrated = with_calibration(ckpt, fit.temperature, fit.prior_weight, log_prior)
    calibrated.metrics = {
        **ckpt.metrics,
        "valid": evaluate_stream(calibrated.build_model(), valid_ids),
        "valid_uncalibrated": valid_as_trained or evaluate_stream(model, valid_ids),
        "temperature": fit.temperature,
        "prior_weight": fit.prior_weight,
        "calibration_seconds": time.monotonic() - started,
    }
    save_checkpoint(out, calibrated)
    return calibrated.metrics
