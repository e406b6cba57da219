"""Tiny trainings: loss goes down, seeds reproduce, resume and Ctrl-C keep a checkpoint, eval prints JSON."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import BEST, LAST, load_checkpoint
from model.config import LSTMConfig
from model.corpus import CorpusError, load_corpus, longrange_text
from model.data import rare_words_to_unk
from model.evaluate import evaluate_stream, fit_calibration, newton_minimise
from model.lm import LSTMLanguageModel
from model.softmax import SampledSoftmax
from model.train import (
    TrainConfig,
    WeightAverage,
    _Data,
    _train_epoch,
    _training_parts,
    as_trained,
    bf16_recurrence_supported,
    budget_lr,
    clip_grad_norm,
    profile_steps,
    train,
    unigram_log_prior,
)
from tests.training import tiny_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated text (never the shared data): short long-range episodes, one per line."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(longrange_text(seed=3, episodes=200, gap_min=0, gap_max=12), encoding="utf-8")
    return path


def tiny_config(corpus: Path, out: Path, **overrides: Any) -> TrainConfig:
    """The test corpus as one stream, with dropout, a fixed seed and one thread."""
    stream = {"corpus": str(corpus), "mode": "stream", "dropout": 0.1, "lr": 3e-2, "batch_size": 8, "bptt": 16}
    return tiny_train_config(out, **{**stream, "seed": 7, "threads": 1, **overrides})


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_loss_decreases(corpus: Path, tmp_path: Path) -> None:
    result = train(tiny_config(corpus, tmp_path, epochs=4))
    losses = [entry["train_loss"] for entry in result.log]
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.8
    assert result.log[-1]["valid"]["perplexity"] < result.log[0]["valid"]["perplexity"]
    assert (tmp_path / BEST).exists()
    assert (tmp_path / LAST).exists()


@pytest.mark.parametrize(
    "levers",
    [
        {"softmax": "sampled", "samples": 16},
        {"precision": "bf16"},
        {"precision": "bf16-all", "activation_reg": 2.0, "temporal_reg": 1.0},
        {"schedule": "budget", "warmup": 0.2},
        {"embed_dropout": 0.1, "recurrent_dropout": 0.2, "optimizer": "sgd", "lr": 5.0},
        {"rare_word_unk": 1.0},
        # SGD with the sampled softmax: row-sparse gradients for the tied matrix, here under bf16 autocast.
        {"softmax": "sampled", "samples": 16, "optimizer": "sgd", "lr": 5.0, "precision": "bf16"},
    ],
    ids=[
        "sampled-softmax",
        "bf16",
        "bf16-all-ar-tar",
        "budget-schedule",
        "dropouts-sgd",
        "rare-word-unk",
        "sparse-sgd-sampled-bf16",
    ],
)
def test_training_levers_still_learn(corpus: Path, tmp_path: Path, levers: dict[str, Any]) -> None:
    if levers.get("precision") == "bf16-all" and not bf16_recurrence_supported():
        # oneDNN has no bfloat16 LSTM for this CPU: the run is refused up front, before anything is written.
        with pytest.raises(ValueError, match=r"bf16-all.*this CPU"):
            train(tiny_config(corpus, tmp_path, **levers))
        assert not tmp_path.exists() or not any(tmp_path.iterdir())
        return
    result = train(tiny_config(corpus, tmp_path, **levers))
    losses = [entry["train_loss"] for entry in result.log]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


def test_rare_words_become_unk_in_proportion_to_their_rarity() -> None:
    unk, frequent = 0, 1
    ids = torch.cat([torch.full((2000,), frequent), torch.arange(2, 2002)])  # one frequent word, 2000 singletons
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    counts = torch.bincount(ids)

    def draw(alpha: float, seed: int) -> torch.Tensor:
        return rare_words_to_unk(ids, counts, alpha, unk, torch.Generator().manual_seed(seed))

    out = draw(1.0, 3)
    replaced = out != ids
    assert torch.all(out[replaced] == unk)  # a replacement is always <unk>, nothing else changes
    singletons = ids != frequent
    assert 0.45 < replaced[singletons].float().mean().item() < 0.55  # alpha / (alpha + 1) = 0.5
    assert replaced[~singletons].sum().item() <= 10  # alpha / (alpha + 2000): 1 expected
    assert torch.equal(draw(1.0, 3), out)  # fixed by the generator's seed
    assert not torch.equal(draw(1.0, 4), out)
    assert torch.equal(draw(0.0, 3), ids)
    assert draw(4.0, 3).eq(unk).sum() > out.eq(unk).sum()


def test_rare_word_unk_needs_stream_mode(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rare_word_unk"):
        train(tiny_config(corpus, tmp_path, mode="lines", rare_word_unk=1.0))
    with pytest.raises(ValueError, match="rare_word_unk"):
        train(tiny_config(corpus, tmp_path, rare_word_unk=-1.0))


def test_same_seed_same_weights(corpus: Path, tmp_path: Path) -> None:
    first = train(tiny_config(corpus, tmp_path / "a", epochs=2))
    second = train(tiny_config(corpus, tmp_path / "b", epochs=2))
    a = load_checkpoint(first.out / LAST).state_dict
    b = load_checkpoint(second.out / LAST).state_dict
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = load_checkpoint(train(tiny_config(corpus, tmp_path / "c", epochs=2, seed=8)).out / LAST).state_dict
    assert not all(torch.equal(a[name], other[name]) for name in a)


def test_resume_continues_from_last(corpus: Path, tmp_path: Path) -> None:
    straight = train(tiny_config(corpus, tmp_path / "straight", epochs=3))
    out = tmp_path / "resumed"
    train(tiny_config(corpus, out, epochs=2))
    resumed = train(tiny_config(corpus, out, epochs=3), resume=True)
    assert resumed.epochs_run == 1
    assert [entry["epoch"] for entry in read_log(out)] == [1, 2, 3]
    assert [entry["epoch"] for entry in resumed.log] == [1, 2, 3]
    last = load_checkpoint(out / LAST)
    assert last.epoch == 3
    # Optimiser, RNG and schedule state travel in last.pt, so the split run matches the straight one.
    reference = load_checkpoint(straight.out / LAST).state_dict
    for name, tensor in last.state_dict.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)


def test_ctrl_c_leaves_a_resumable_checkpoint(corpus: Path, tmp_path: Path) -> None:
    def interrupt(entry: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, tmp_path, epochs=5), on_epoch=interrupt)
    last = load_checkpoint(tmp_path / LAST)
    assert last.metrics.get("interrupted") is True
    assert last.epoch == 1
    assert last.resume_state is not None
    resumed = train(tiny_config(corpus, tmp_path, epochs=2), resume=True)
    assert [entry["epoch"] for entry in resumed.log] == [1, 2]


def test_train_command_reaches_the_quality_recipe_levers(corpus: Path, tmp_path: Path) -> None:
    """`cellgate train` can express the quality benchmark's recipe: each lever lands in the checkpoint's config."""
    flags = {
        "--hidden-size": "24", "--embed-size": "24", "--layers": "1", "--dropout": "0.3", "--embed-dropout": "0.05",
        "--recurrent-dropout": "0.15", "--lr": "20", "--batch-size": "10", "--schedule": "budget", "--warmup": "0.1",
        "--precision": "fp32", "--softmax": "sampled", "--samples": "64", "--sample-power": "0.5",
        "--rare-word-unk": "1", "--activation-reg": "2", "--temporal-reg": "1", "--average-from": "0.5",
        "--average-every": "5",
        "--lr-floor": "0.25", "--decay": "linear", "--input-dropout": "0.4", "--layer-dropout": "0.2",
        "--validate-from": "0.5", "--epochs": "1", "--seed": "3",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cellgate.cli", "train", "--corpus", str(corpus), "--out", str(tmp_path), "--quiet",
         *[part for pair in flags.items() for part in pair]],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = load_checkpoint(tmp_path / LAST).train_config
    for flag, value in flags.items():
        key = flag.removeprefix("--").replace("-", "_")
        key = {"layers": "num_layers"}.get(key, key)
        assert str(config[key]) == value or config[key] == float(value), key


def test_train_command_refuses_flags_no_step_could_run_with(corpus: Path, tmp_path: Path) -> None:
    """A configuration train() refuses is a one-line error and exit 2, not a traceback, and writes no checkpoint."""
    out = tmp_path / "refused"
    for flags, message in (
        (["--schedule", "budget", "--validate-from", "2"], "validate_from must be in [0, 1]"),
        (["--validate-from", "0.5"], "plateau schedule"),  # the default schedule acts on every validation
        (["--rare-word-unk", "-1"], "rare_word_unk must be >= 0"),
        (["--batch-size", "100000"], "too few for batch size"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cellgate.cli", "train", "--corpus", str(corpus), "--out", str(out), "--quiet",
             "--epochs", "1", *flags],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2, (flags, done.stderr)
        assert done.stderr.startswith("error: "), flags
        assert message in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (out / LAST).exists()
    assert not (out / BEST).exists()


def test_weight_average_is_the_mean_of_the_steps_it_samples() -> None:
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, start=0.5, every=2)
    for step, progress in enumerate([0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step**2))
        average.step_at(model, lambda fraction: fraction, progress)
    # From progress 0.5 on (steps 2..6), every second step: steps 2, 4 and 6.
    assert average.samples == 3
    for p in average.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, (4 + 16 + 36) / 3))
    with pytest.raises(ValueError, match="average_from"):
        WeightAverage(model, start=1.5, every=2)


def test_weight_averaging_checkpoints_the_weights_that_validate_better(corpus: Path, tmp_path: Path) -> None:
    # SGD at a high constant lr: noisy iterates, whose mean validates better in the last epoch (seed 7).
    cfg = tiny_config(corpus, tmp_path, epochs=3, optimizer="sgd", lr=20.0, average_from=0.5, average_every=1)
    result = train(cfg)
    averaged = [entry for entry in result.log if "weights" in entry]
    assert [entry["epoch"] for entry in averaged] == [2, 3]  # the mean starts half-way, in epoch 2
    assert averaged[-1]["average_samples"] > averaged[0]["average_samples"] > 0
    assert averaged[-1]["weights"] == "average"
    for entry in averaged:
        assert entry["valid"]["loss"] <= entry["valid_current"]["loss"]
        assert (entry["weights"] == "average") == (entry["valid"]["loss"] < entry["valid_current"]["loss"])
    # Each checkpoint holds the weights its metrics were measured on.
    valid_ids = _Data(cfg, None).valid_ids
    for name, key in ((BEST, "valid"), (LAST, "valid_current")):
        ckpt = load_checkpoint(tmp_path / name)
        measured = evaluate_stream(ckpt.build_model(), valid_ids)["loss"]
        assert measured == pytest.approx(ckpt.metrics["valid"]["loss"], rel=1e-5), name
        logged = next(entry for entry in result.log if entry["epoch"] == ckpt.epoch)
        assert ckpt.metrics["valid"]["loss"] == pytest.approx(logged[key]["loss"]), name


def test_weight_averaging_probes_long_range_on_the_checkpointed_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """best.pt's long-range metrics describe best.pt, also when it holds the mean of the weights."""

    def fingerprint(model: torch.nn.Module) -> float:
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    def probe(model: torch.nn.Module, vocab: object, per_bucket: int) -> dict[str, dict[str, float]]:
        # A tiny model's accuracy is 0 whatever its weights; the weights' own fingerprint tells them apart.
        return {"0-10": {"accuracy": fingerprint(model), "episodes": per_bucket}}

    monkeypatch.setattr("model.train.long_range_accuracy", probe)
    cfg = tiny_train_config(
        tmp_path, episodes=60, gap_max=20, epochs=3, optimizer="sgd", lr=20.0, average_from=0.5, average_every=1
    )
    result = train(cfg)
    best = load_checkpoint(tmp_path / BEST)
    logged = next(entry for entry in result.log if entry["epoch"] == best.epoch)
    assert logged["weights"] == "average"  # noisy SGD at lr 20: the mean wins (seed 0)
    assert best.metrics["long_range"]["0-10"]["accuracy"] == pytest.approx(fingerprint(best.build_model()))
    assert fingerprint(best.build_model()) != pytest.approx(fingerprint(load_checkpoint(tmp_path / LAST).build_model()))


def test_resume_keeps_the_weight_average(corpus: Path, tmp_path: Path) -> None:
    levers = {"average_from": 0.0, "average_every": 2}  # from the first step: the same start in both runs
    straight = train(tiny_config(corpus, tmp_path / "straight", epochs=3, **levers))
    out = tmp_path / "resumed"
    train(tiny_config(corpus, out, epochs=2, **levers))
    resumed = train(tiny_config(corpus, out, epochs=3, **levers), resume=True)
    assert resumed.log[-1]["average_samples"] == straight.log[-1]["average_samples"]
    assert resumed.log[-1]["valid"]["loss"] == pytest.approx(straight.log[-1]["valid"]["loss"], abs=1e-6)


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
    cfg = tiny_config(corpus, tmp_path, epochs=6, dropout=0.0, lr=5e-2, calibrate=True)
    result = train(cfg)
    best = load_checkpoint(tmp_path / BEST)
    metrics = best.metrics
    assert best.config.temperature == metrics["temperature"] != 1.0
    assert metrics["prior_weight"] != 0.0
    assert not torch.equal(best.state_dict["decoder_bias"], load_checkpoint(tmp_path / LAST).state_dict["decoder_bias"])
    assert metrics["valid"]["loss"] < metrics["valid_uncalibrated"]["loss"]
    assert result.best_metrics == metrics
    data = _Data(cfg, None)
    valid_ids = data.valid_ids
    assert evaluate_stream(best.build_model(), valid_ids)["loss"] == pytest.approx(metrics["valid"]["loss"], rel=1e-6)
    # as_trained undoes the fold: the network as training left it, at its validation figures then.
    trained = as_trained(best, unigram_log_prior(data.train_counts)).build_model()
    with pytest.raises(ValueError, match="prior"):
        as_trained(best, None)  # the fold cannot be undone without the prior it added
    assert evaluate_stream(trained, valid_ids)["loss"] == pytest.approx(metrics["valid_uncalibrated"]["loss"], rel=1e-5)
    assert load_checkpoint(tmp_path / LAST).config.temperature == 1.0  # training resumes from the weights as trained
    with pytest.raises(ValueError, match="calibrate"):
        train(tiny_config(corpus, tmp_path / "lines", mode="lines", calibrate=True))


def test_eval_command_prints_metrics(corpus: Path, tmp_path: Path) -> None:
    train(tiny_config(corpus, tmp_path, epochs=1))
    done = subprocess.run(
        [sys.executable, "-m", "cellgate.cli", "eval", str(tmp_path / BEST), "--corpus", str(corpus)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert {"perplexity", "top1", "top5", "tokens", "vocab_size"} <= metrics.keys()
    assert metrics["perplexity"] > 1.0
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["tokens"] > 0
    assert 0.0 <= metrics["unk_targets"] <= 1.0
    assert metrics["perplexity_known"] > 1.0
    assert metrics["vocab_size"] == len(load_checkpoint(tmp_path / BEST).vocab)
    assert metrics["temperature"] == 1.0
    absent = subprocess.run(
        [sys.executable, "-m", "cellgate.cli", "eval", str(tmp_path / "absent.pt"), "--corpus", str(corpus)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert absent.returncode == 2
    assert "does not exist" in absent.stderr
    assert "Traceback" not in absent.stderr


def test_calibrate_command_fits_a_trained_checkpoint(corpus: Path, tmp_path: Path) -> None:
    train(tiny_config(corpus, tmp_path, epochs=3, dropout=0.0, lr=5e-2))

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


def test_budget_schedule_warms_up_then_decays_to_zero(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus, tmp_path, schedule="budget", lr=2.0, warmup=0.1)
    assert budget_lr(cfg, 0.05) == pytest.approx(1.0)
    assert budget_lr(cfg, 0.1) == pytest.approx(2.0)
    assert budget_lr(cfg, 0.55) == pytest.approx(1.0)
    assert budget_lr(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    floored = tiny_config(corpus, tmp_path, schedule="budget", lr=2.0, warmup=0.1, lr_floor=0.25)
    assert budget_lr(floored, 0.55) == pytest.approx(1.0)  # above the floor: the same cosine
    assert budget_lr(floored, 0.9) == pytest.approx(0.5)  # cosine 0.19 there, held at the floor
    assert budget_lr(floored, 1.0) == pytest.approx(0.5)
    linear = tiny_config(corpus, tmp_path, schedule="budget", lr=2.0, warmup=0.1, decay="linear")
    assert budget_lr(linear, 0.1) == pytest.approx(2.0)
    assert budget_lr(linear, 0.325) == pytest.approx(1.5)  # a quarter of the way down: the cosine is at 1.71
    assert budget_lr(linear, 1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="decay"):
        train(tiny_config(corpus, tmp_path, schedule="budget", decay="step"))


def test_validate_from_skips_validation_until_late_in_training(corpus: Path, tmp_path: Path) -> None:
    result = train(tiny_config(corpus, tmp_path, epochs=4, schedule="cosine", validate_from=0.6))
    # Epochs end at 1/4, 1/2, 3/4 and all of training: the first two before 0.6.
    assert ["valid" in entry for entry in result.log] == [False, False, True, True]
    assert result.best_metrics["epoch"] in (3, 4)
    assert load_checkpoint(tmp_path / BEST).epoch == result.best_metrics["epoch"]
    assert "valid" in load_checkpoint(tmp_path / LAST).metrics
    # The epoch a budget ends in validates, however early: best.pt always exists.
    cut = train(tiny_config(corpus, tmp_path / "cut", epochs=4, schedule="budget", max_minutes=1e-6, validate_from=1.0))
    assert len(cut.log) == 1
    assert "valid" in cut.log[0]
    assert (tmp_path / "cut" / BEST).exists()
    # builtin:longrange probes only the validated epochs; a target accuracy stops at the first that reaches it.
    probed = train(
        tiny_train_config(tmp_path / "lr", schedule="cosine", epochs=4, validate_from=0.6, target_accuracy=0.0)
    )
    assert ["long_range" in entry for entry in probed.log] == [False, False, True]
    for schedule, value in (("plateau", 0.5), ("cosine", 1.5)):
        with pytest.raises(ValueError, match="validate_from"):
            train(tiny_config(corpus, tmp_path / "wrong", schedule=schedule, validate_from=value))


def test_sampled_softmax_matches_full_softmax_with_every_word_sampled() -> None:
    """With far more samples than words, the corrected sampled loss approaches the full cross-entropy."""
    torch.manual_seed(0)
    vocab, hidden, n = 6, 4, 5
    sampler = SampledSoftmax(torch.tensor([0, 5, 4, 3, 2, 1]), samples=20000)
    outputs, weight, bias = torch.randn(n, hidden), torch.randn(vocab, hidden), torch.randn(vocab)
    targets = torch.tensor([1, 2, 3, 4, 5])
    full = torch.nn.functional.cross_entropy(outputs @ weight.t() + bias, targets)
    assert sampler.loss(outputs, targets, weight, bias).item() == pytest.approx(full.item(), abs=0.05)


class TestCorpusErrors:
    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(CorpusError, match="does not exist"):
            load_corpus(str(tmp_path / "nope.txt"))

    def test_empty(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.txt"
        path.write_text("  \n\n", encoding="utf-8")
        with pytest.raises(CorpusError, match="empty"):
            load_corpus(str(path))

    def test_binary(self, tmp_path: Path) -> None:
        path = tmp_path / "model.bin"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        with pytest.raises(CorpusError, match="binary"):
            load_corpus(str(path))

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.txt"
        path.write_bytes("café au lait\n".encode("latin-1"))
        with pytest.raises(CorpusError, match="UTF-8"):
            load_corpus(str(path))

    def test_directory_without_txt(self, tmp_path: Path) -> None:
        (tmp_path / "notes.md").write_text("# not a corpus\n", encoding="utf-8")
        with pytest.raises(CorpusError, match=r"no \.txt"):
            load_corpus(str(tmp_path))

    def test_directory_of_txt_files(self, tmp_path: Path) -> None:
        (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
        (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
        (tmp_path / "skip.md").write_text("not read\n", encoding="utf-8")
        text = load_corpus(str(tmp_path))
        assert text.index("first file") < text.index("second file")
        assert "not read" not in text

    def test_train_reports_a_bad_corpus(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.txt"
        path.write_bytes(b"\xff\xfe\xfa broken\n")
        with pytest.raises(CorpusError):
            train(TrainConfig(corpus=str(path), out=str(tmp_path / "out"), progress=False))


def test_clip_grad_norm_matches_torch_for_dense_and_sparse_gradients() -> None:
    """The total norm and the clipped gradients equal torch's on the dense equivalent, rows gathered twice too."""
    torch.manual_seed(0)
    table, other = torch.randn(30, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    ids = torch.tensor([3, 7, 7, 29, 3, 0])

    def backward(sparse: bool) -> None:
        table.grad = other.grad = None
        rows = torch.nn.functional.embedding(ids, table, sparse=sparse)
        ((rows @ other) ** 2).sum().backward()

    backward(sparse=False)
    expected_norm = torch.nn.utils.clip_grad_norm_([table, other], 0.5)
    expected = (table.grad.clone(), other.grad.clone())
    for sparse in (False, True):
        backward(sparse)
        assert table.grad.is_sparse == sparse
        norm = clip_grad_norm([table, other], 0.5)
        assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
        assert float(norm) > 0.5  # the case under test is one that clips
        assert torch.allclose(table.grad.to_dense(), expected[0], atol=1e-7)
        assert torch.allclose(other.grad, expected[1], atol=1e-7)


def test_sparse_embedding_gradients_train_as_dense_ones(corpus: Path, tmp_path: Path) -> None:
    """SGD with a sampled softmax updates only the rows a batch touches: the same parameters as dense gradients."""
    cfg = tiny_config(corpus, tmp_path, softmax="sampled", samples=16, optimizer="sgd", lr=5.0, clip=0.25)
    data = _Data(cfg, None)
    batches = data.train_batches(1, random.Random(0), cfg.gap_max)[:12]
    sampler = SampledSoftmax(data.train_counts, cfg.samples)
    trained = []
    for sparse in (False, True):
        torch.manual_seed(5)
        model = LSTMLanguageModel(cfg.model_config(len(data.vocab)), sparse_grad=sparse)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        before = model.embedding.weight.detach().clone()
        _train_epoch(model, optimizer, batches, cfg, data.vocab.pad_id, 1, None, sampler)
        assert model.embedding.weight.grad is not None
        assert model.embedding.weight.grad.is_sparse == sparse
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    dense, sparse_run = trained
    assert not torch.equal(dense["embedding.weight"], before)  # the runs did train
    for name, value in dense.items():
        assert torch.allclose(sparse_run[name], value, atol=1e-5), name


def test_a_budget_smaller_than_one_batch_still_trains_one(corpus: Path, tmp_path: Path) -> None:
    """The budget ends training after the batch that crosses it: one epoch, one batch, a real loss, a checkpoint."""
    cfg = tiny_config(corpus, tmp_path, epochs=5, max_minutes=1e-7, schedule="budget")
    result = train(cfg)
    assert result.epochs_run == 1
    (entry,) = read_log(tmp_path)
    assert entry["train_loss"] > 0
    assert math.isfinite(entry["train_loss"])
    assert load_checkpoint(tmp_path / BEST).epoch == 1
    assert load_checkpoint(str(tmp_path)).epoch == 1  # a run directory, given as a string, means its best.pt
    assert result.tokens_per_second > 0


@pytest.mark.parametrize(("optimizer", "sparse"), [("sgd", True), ("adamw", False)])
def test_profile_steps_runs_the_training_step(corpus: Path, tmp_path: Path, optimizer: str, sparse: bool) -> None:
    """The profiled step is train()'s: with SGD and the sampled softmax its gradients are row-sparse."""
    cfg = tiny_config(corpus, tmp_path, softmax="sampled", samples=16, optimizer=optimizer, lr=1.0)
    seconds, ops = profile_steps(cfg, steps=3, warmup=2)
    assert seconds > 0
    names = {op.key for op in ops}
    assert "aten::mm" in names
    assert ("aten::_coalesce" in names) == sparse  # sparse gradients are coalesced before clipping
    with pytest.raises(ValueError, match="fewer than"):
        profile_steps(cfg, steps=100_000)


@pytest.mark.parametrize("power", [0.0, 0.75, 1.0])
def test_sampled_negatives_follow_the_configured_power(corpus: Path, tmp_path: Path, power: float) -> None:
    cfg = tiny_config(corpus, tmp_path, softmax="sampled", optimizer="sgd", sample_power=power)
    data = _Data(cfg, None)
    _, _, sampler = _training_parts(cfg, cfg.model_config(len(data.vocab)), data, None)
    assert sampler is not None
    expected = data.train_counts.double().clamp(min=1) ** power
    torch.testing.assert_close(sampler.probs, (expected / expected.sum()).float())
