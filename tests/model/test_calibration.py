"""Calibration: the fit recovers a temperature and a prior, Newton stops at the rounding floor, train() and
`cellgate calibrate` fold the fit into best.pt, and as_trained takes it back out."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from model.calibration import as_trained, fit_calibration, newton_minimise, unigram_log_prior
from model.checkpoint import BEST, LAST, load_checkpoint
from model.config import LSTMConfig
from model.data import TrainingData
from model.evaluate import evaluate_stream
from model.lm import LSTMLanguageModel
from model.train import train
from tests.training import tiny_stream_config

REPO = Path(__file__).resolve().parents[2]


def sample_streams(model: LSTMLanguageModel, streams: int, length: int) -> torch.Tensor:
    """Text drawn from the model: `streams` rows from the zero state, laid end to end (as evaluate_stream cuts it)."""
    model.eval()
    rows = torch.zeros(streams, length, dtype=torch.long)
    state = model.zero_state(streams)
    with torch.no_grad():
        for t in range(1, length):
            logits, state = model(rows[:, t - 1 : t], state)
            rows[:, t] = torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1).squeeze(1)
    return rows.reshape(-1)


def with_calibration(model: LSTMLanguageModel, temperature: float, bias_shift: torch.Tensor | None = None):
    calibrated = LSTMLanguageModel(replace(model.config, temperature=temperature))
    state = dict(model.state_dict())
    if bias_shift is not None:
        state["decoder_bias"] = state["decoder_bias"] + bias_shift
    calibrated.load_state_dict(state)
    return calibrated.eval()


@pytest.fixture(scope="module")
def peaked_model() -> LSTMLanguageModel:
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=30, embed_size=16, hidden_size=16, num_layers=2, dropout=0.0))
    with torch.no_grad():
        model.embedding.weight.mul_(20)  # peaked distributions, so the temperature matters
    return model.eval()


def test_fit_calibration_recovers_the_temperature_text_was_sampled_at(peaked_model: LSTMLanguageModel) -> None:
    ids = sample_streams(with_calibration(peaked_model, 1.5), streams=10, length=1500)
    fit = fit_calibration(peaked_model, ids)
    assert fit.temperature == pytest.approx(1.5, abs=0.05)
    assert fit.prior_weight == 0.0
    assert fit.nll == pytest.approx(evaluate_stream(with_calibration(peaked_model, fit.temperature), ids)["loss"])
    # The fit reads the logits before any temperature: the same model already at 2 finds 1.5 too.
    assert fit_calibration(with_calibration(peaked_model, 2.0), ids).temperature == pytest.approx(fit.temperature)
    for off in (1.3, 1.7):
        assert evaluate_stream(with_calibration(peaked_model, off), ids)["loss"] > fit.nll


def test_fit_calibration_recovers_a_unigram_prior(peaked_model: LSTMLanguageModel) -> None:
    """Text from softmax(z / 1.5 + 0.7 log q), that model built as calibrate_checkpoint folds it: bias + γ T log q."""
    counts = torch.arange(1, 31, dtype=torch.float64) ** 2
    log_prior = (counts / counts.sum()).log()
    ids = sample_streams(with_calibration(peaked_model, 1.5, (0.7 * 1.5 * log_prior).float()), 10, 1500)
    fit = fit_calibration(peaked_model, ids, log_prior)
    assert fit.temperature == pytest.approx(1.5, abs=0.08)
    assert fit.prior_weight == pytest.approx(0.7, abs=0.1)
    assert fit.nll < fit_calibration(peaked_model, ids).nll  # the prior explains what a temperature cannot


def noisy_quadratic(optimum: torch.Tensor, gradient_noise: float) -> tuple[list[int], Any]:
    """An ill-conditioned convex quadratic whose value and gradient carry deterministic rounding-like noise."""
    a = torch.tensor([[1.0, 0.999], [0.999, 1.0]], dtype=torch.float64)  # eigenvalues 1.999 and 0.001
    calls = [0]

    def statistics(theta: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        calls[0] += 1
        d = theta - optimum
        value = 0.5 * float(d @ a @ d) + 4.9 + 1e-8 * math.sin(1e7 * float(theta[0]) + 3e7 * float(theta[1]))
        wobble = torch.tensor([math.cos(2e7 * float(theta[0])), math.sin(2e7 * float(theta[1]))], dtype=torch.float64)
        return value, a @ d + gradient_noise * wobble, a

    return calls, statistics


def test_newton_stops_at_the_rounding_floor() -> None:
    """Near an ill-conditioned optimum, gradient noise of 1e-5 leaves a Newton decrement of ~5e-8: rounding, which
    the fit must not chase (a WikiText calibration once took 226 s instead of 8 doing so)."""
    optimum = torch.tensor([0.8, 0.15], dtype=torch.float64)
    calls, statistics = noisy_quadratic(optimum, gradient_noise=1e-5)
    theta, value = newton_minimise(statistics, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(theta, optimum, atol=0.02)
    assert value == pytest.approx(4.9, abs=1e-6)
    assert calls[0] <= 6
    # Without noise it converges to the optimum itself.
    calls, statistics = noisy_quadratic(optimum, gradient_noise=0.0)
    theta, _ = newton_minimise(statistics, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(theta, optimum, atol=1e-3)


def test_calibrate_writes_the_fitted_temperature_into_best(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_stream_config(corpus, tmp_path, epochs=6, dropout=0.0, lr=5e-2, calibrate=True)
    result = train(cfg)
    best = load_checkpoint(tmp_path / BEST)
    metrics = best.metrics
    assert best.config.temperature == metrics["temperature"] != 1.0
    assert metrics["prior_weight"] != 0.0
    assert not torch.equal(best.state_dict["decoder_bias"], load_checkpoint(tmp_path / LAST).state_dict["decoder_bias"])
    assert metrics["valid"]["loss"] < metrics["valid_uncalibrated"]["loss"]
    assert result.best_metrics == metrics
    data = TrainingData(cfg, None)
    valid_ids = data.valid_ids
    assert evaluate_stream(best.build_model(), valid_ids)["loss"] == pytest.approx(metrics["valid"]["loss"], rel=1e-6)
    # as_trained undoes the fold: the network as training left it, at its validation figures then.
    trained = as_trained(best, unigram_log_prior(data.train_counts)).build_model()
    with pytest.raises(ValueError, match="prior"):
        as_trained(best, None)  # the fold cannot be undone without the prior it added
    assert evaluate_stream(trained, valid_ids)["loss"] == pytest.approx(metrics["valid_uncalibrated"]["loss"], rel=1e-5)
    assert load_checkpoint(tmp_path / LAST).config.temperature == 1.0  # training resumes from the weights as trained
    with pytest.raises(ValueError, match="calibrate"):
        train(tiny_stream_config(corpus, tmp_path / "lines", mode="lines", calibrate=True))


def test_calibrate_command_fits_a_trained_checkpoint(corpus: Path, tmp_path: Path) -> None:
    train(tiny_stream_config(corpus, tmp_path, epochs=3, dropout=0.0, lr=5e-2))

    def calibrate(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cellgate.cli", "calibrate", *argv]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)

    out = tmp_path / "calibrated.pt"
    done = calibrate(str(tmp_path), "--valid", str(corpus), "--prior", str(corpus), "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["temperature"] == load_checkpoint(out).config.temperature != 1.0
    assert summary["valid_perplexity"] < summary["valid_perplexity_uncalibrated"]
    assert summary["prior_weight"] == load_checkpoint(out).metrics["prior_weight"] != 0.0
    assert load_checkpoint(tmp_path / BEST).config.temperature == 1.0  # --out leaves the original alone
    again = calibrate(str(out), "--valid", str(corpus))
    assert again.returncode == 2
    assert "calibrated already" in again.stderr
    absent = calibrate(str(tmp_path / "absent.pt"), "--valid", str(corpus))
    assert absent.returncode == 2
    assert "does not exist" in absent.stderr
    assert "Traceback" not in absent.stderr
    missing = calibrate(str(tmp_path), "--valid", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2
    assert "error:" in missing.stderr
    assert load_checkpoint(tmp_path / BEST).config.temperature == 1.0
