"""Tiny trainings: loss goes down, levers still learn, seeds reproduce, resume and Ctrl-C keep a checkpoint."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import BEST, LAST, load_checkpoint
from model.corpus import CorpusError
from model.cpu import bf16_recurrence_supported
from model.data import TrainingData, rare_words_to_unk
from model.lm import LSTMLanguageModel
from model.optim import budget_lr, clip_grad_norm
from model.recipe import TrainConfig
from model.softmax import SampledSoftmax
from model.train import (
    _train_epoch,
    _training_parts,
    describe_epoch,
    profile_steps,
    train,
)
from tests.training import tiny_stream_config, tiny_train_config

REPO = Path(__file__).resolve().parents[2]


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def test_loss_decreases(corpus: Path, tmp_path: Path) -> None:
    result = train(tiny_stream_config(corpus, tmp_path, epochs=4))
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
        {"precision": "bf16-all"},
        {"precision": "auto"},
        {"schedule": "budget"},
        {"embed_dropout": 0.1, "recurrent_dropout": 0.2, "optimizer": "sgd", "lr": 5.0},
        {"rare_word_unk": 1.0},
        # SGD with the sampled softmax: row-sparse gradients for the tied matrix, here under bf16 autocast.
        {"softmax": "sampled", "samples": 16, "optimizer": "sgd", "lr": 5.0, "precision": "bf16"},
    ],
    ids=[
        "sampled-softmax",
        "bf16",
        "bf16-all",
        "auto-precision",
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
            train(tiny_stream_config(corpus, tmp_path, **levers))
        assert not tmp_path.exists() or not any(tmp_path.iterdir())
        return
    result = train(tiny_stream_config(corpus, tmp_path, **levers))
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


def test_a_configuration_no_step_could_run_with_is_refused_when_made(corpus: Path, tmp_path: Path) -> None:
    for overrides, message in (
        ({"mode": "lines", "rare_word_unk": 1.0}, "rare_word_unk: stream mode only"),
        ({"mode": "lines", "softmax": "sampled"}, "sampled"),
        ({"rare_word_unk": -1.0}, "rare_word_unk must be >= 0"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"schedule": "plateau", "validate_from": 0.5}, "plateau schedule"),
        ({"validate_from": 1.5}, r"validate_from must be in \[0, 1\]"),
        ({"precision": "fp16"}, "precision must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            tiny_stream_config(corpus, tmp_path, **overrides)
    assert not any(tmp_path.iterdir())


def test_same_seed_same_weights(corpus: Path, tmp_path: Path) -> None:
    first = train(tiny_stream_config(corpus, tmp_path / "a", epochs=2))
    second = train(tiny_stream_config(corpus, tmp_path / "b", epochs=2))
    a = load_checkpoint(first.out / LAST).state_dict
    b = load_checkpoint(second.out / LAST).state_dict
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = load_checkpoint(train(tiny_stream_config(corpus, tmp_path / "c", epochs=2, seed=8)).out / LAST).state_dict
    assert not all(torch.equal(a[name], other[name]) for name in a)


def test_resume_continues_from_last(corpus: Path, tmp_path: Path) -> None:
    straight = train(tiny_stream_config(corpus, tmp_path / "straight", epochs=3))
    out = tmp_path / "resumed"
    train(tiny_stream_config(corpus, out, epochs=2))
    resumed = train(tiny_stream_config(corpus, out, epochs=3), resume=True)
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
        train(tiny_stream_config(corpus, tmp_path, epochs=5), on_epoch=interrupt)
    last = load_checkpoint(tmp_path / LAST)
    assert last.metrics.get("interrupted") is True
    assert last.epoch == 1
    assert last.resume_state is not None
    resumed = train(tiny_stream_config(corpus, tmp_path, epochs=2), resume=True)
    assert [entry["epoch"] for entry in resumed.log] == [1, 2]


def test_eval_command_prints_metrics(corpus: Path, tmp_path: Path) -> None:
    train(tiny_stream_config(corpus, tmp_path, epochs=1))
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


def test_budget_schedule_decays_straight_to_zero(corpus: Path, tmp_path: Path) -> None:
    cfg = tiny_stream_config(corpus, tmp_path, schedule="budget", lr=2.0)
    assert budget_lr(cfg, 0.0) == pytest.approx(2.0)
    assert budget_lr(cfg, 0.25) == pytest.approx(1.5)
    assert budget_lr(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert budget_lr(cfg, 1.2) == 0.0  # the batch that crosses the deadline trains at zero, never below
    # Without a time budget the epochs are the budget: epoch k's last batch is a little above 2 (1 - k / 3).
    result = train(tiny_stream_config(corpus, tmp_path, schedule="budget", lr=2.0, epochs=3))
    for k, entry in enumerate(result.log, start=1):
        assert 2 * (1 - k / 3) < entry["lr"] < 2 * (1 - (k - 0.5) / 3), k


def test_validate_from_skips_validation_until_late_in_training(corpus: Path, tmp_path: Path) -> None:
    result = train(tiny_stream_config(corpus, tmp_path, epochs=4, schedule="budget", validate_from=0.6))
    # Epochs end at 1/4, 1/2, 3/4 and all of training: the first two before 0.6.
    assert ["valid" in entry for entry in result.log] == [False, False, True, True]
    assert result.best_metrics["epoch"] in (3, 4)
    assert load_checkpoint(tmp_path / BEST).epoch == result.best_metrics["epoch"]
    assert "valid" in load_checkpoint(tmp_path / LAST).metrics
    # The epoch a budget ends in validates, however early: best.pt always exists.
    cut = train(
        tiny_stream_config(corpus, tmp_path / "cut", epochs=4, schedule="budget", max_minutes=1e-6, validate_from=1.0)
    )
    assert len(cut.log) == 1
    assert "valid" in cut.log[0]
    assert (tmp_path / "cut" / BEST).exists()
    # builtin:longrange probes only the validated epochs; a target accuracy stops at the first that reaches it.
    probed = train(tiny_train_config(tmp_path / "lr", epochs=4, validate_from=0.6, target_accuracy=0.0))
    assert ["long_range" in entry for entry in probed.log] == [False, False, True]


def test_sampled_softmax_matches_full_softmax_with_every_word_sampled() -> None:
    """With far more samples than words, the corrected sampled loss approaches the full cross-entropy."""
    torch.manual_seed(0)
    vocab, hidden, n = 6, 4, 5
    sampler = SampledSoftmax(torch.tensor([0, 5, 4, 3, 2, 1]), samples=20000)
    outputs, weight, bias = torch.randn(n, hidden), torch.randn(vocab, hidden), torch.randn(vocab)
    targets = torch.tensor([1, 2, 3, 4, 5])
    full = torch.nn.functional.cross_entropy(outputs @ weight.t() + bias, targets)
    assert sampler.loss(outputs, targets, weight, bias).item() == pytest.approx(full.item(), abs=0.05)


def test_train_reports_a_bad_corpus(tmp_path: Path) -> None:
    """model/corpus.py's errors (tests/model/test_corpus.py) reach train()'s caller as they are."""
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xff\xfe\xfa broken\n")
    with pytest.raises(CorpusError, match="not valid UTF-8"):
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
    cfg = tiny_stream_config(corpus, tmp_path, softmax="sampled", samples=16, optimizer="sgd", lr=5.0, clip=0.25)
    data = TrainingData(cfg, None)
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
    cfg = tiny_stream_config(corpus, tmp_path, epochs=5, max_minutes=1e-7, schedule="budget")
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
    cfg = tiny_stream_config(corpus, tmp_path, softmax="sampled", samples=16, optimizer=optimizer, lr=1.0)
    seconds, ops = profile_steps(cfg, steps=3, warmup=2)
    assert seconds > 0
    names = {op.key for op in ops}
    assert "aten::mm" in names
    assert ("aten::_coalesce" in names) == sparse  # sparse gradients are coalesced before clipping
    with pytest.raises(ValueError, match="fewer than"):
        profile_steps(cfg, steps=100_000)


def test_negatives_follow_the_unigram_and_a_small_vocabulary_trains_the_full_softmax(
    corpus: Path, tmp_path: Path
) -> None:
    cfg = tiny_stream_config(corpus, tmp_path, softmax="sampled", samples=16, optimizer="sgd")
    data = TrainingData(cfg, None)
    assert len(data.vocab) >= 4 * 16
    model, _, sampler = _training_parts(cfg, data, None)
    assert sampler is not None
    assert isinstance(model, LSTMLanguageModel)
    assert model.sparse_grad
    expected = data.train_counts.double().clamp(min=1)
    torch.testing.assert_close(sampler.probs, (expected / expected.sum()).float())
    # Fewer than 4 x samples words: the negatives would be most of the rows, so the full softmax it is.
    wide = tiny_stream_config(corpus, tmp_path, softmax="sampled", samples=len(data.vocab), optimizer="sgd")
    model, _, sampler = _training_parts(wide, data, None)
    assert sampler is None
    assert isinstance(model, LSTMLanguageModel)
    assert not model.sparse_grad


def test_describe_epoch_is_one_line() -> None:
    entry = {"epoch": 3, "lr": 12.5, "train_loss": math.log(200.0), "train_tokens_per_second": 8312.4}
    assert describe_epoch({**entry, "elapsed_seconds": 75.2}) == (
        "epoch 3  lr 12.5  train ppl 200.0  8,312 tokens/s  75 s"
    )
    validated = {**entry, "valid": {"perplexity": 180.24}, "gap_max": 35, "elapsed_seconds": 75.2}
    assert (
        describe_epoch(validated)
        == "epoch 3  lr 12.5  train ppl 200.0  valid ppl 180.2  gap ≤ 35  8,312 tokens/s  75 s"
    )
