"""Training: truncated BPTT (or whole lines), AdamW/SGD with clipping, schedules, early stopping.

Two data modes:
- "stream": the corpus is one token stream cut into `batch_size` parallel streams; windows of
  `bptt` tokens are trained in order and (h, C) is carried (detached) from one window to the next.
- "lines": each line is one sequence from a zero state, so backpropagation spans the whole line.
  The long-range corpus uses it: an episode is a line, and a gradient must cross the whole gap.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.profiler_util import EventList
from tqdm import tqdm

from model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, save_checkpoint
from model.config import LSTMConfig
from model.corpus import LONGRANGE, load_corpus, longrange_text
from model.data import batchify, encode_lines, encode_stream, line_batches, rare_words_to_unk, stream_windows
from model.evaluate import (
    LanguageModel,
    detach_state,
    evaluate_batches,
    evaluate_stream,
    fit_calibration,
    long_range_accuracy,
)
from model.lm import LSTMLanguageModel, LSTMState
from model.softmax import SampledSoftmax
from model.vocab import Vocabulary, tokenize

# Builds the network from its shape; train() defaults to the gated LSTM, an experiment may swap it.
ModelFactory = Callable[[LSTMConfig], nn.Module]


def as_language_model(model: nn.Module) -> LanguageModel:
    """The module seen through the LanguageModel protocol (nn.Module hides methods from mypy)."""
    if not callable(getattr(model, "zero_state", None)):
        raise TypeError(f"{type(model).__name__} has no zero_state(batch_size); it cannot be trained here")
    return cast(LanguageModel, model)


@dataclass
class TrainConfig:
    corpus: str
    out: str
    valid: str | None = None  # a file; without it the last `valid_fraction` of lines is held out
    valid_fraction: float = 0.05
    # vocabulary
    lowercase: bool = True
    split: str = "words"
    min_freq: int = 1
    max_vocab: int | None = None
    # model
    embed_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.2
    embed_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    input_dropout: float | None = None  # locked dropout on the embedded input; None: dropout
    layer_dropout: float | None = None  # locked dropout between layers; None: dropout (which stays on the output)
    tie_weights: bool = True
    # optimisation
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 20.0
    weight_decay: float = 0.0
    clip: float = 0.25
    # "plateau" (divide by anneal on no improvement), "cosine" (per epoch over `epochs`), "none", or
    # "budget": per-batch warm-up then cosine decay to zero over max_minutes (over `epochs` without it).
    schedule: str = "plateau"
    anneal: float = 4.0
    warmup: float = 0.0  # "budget" only: the fraction of the budget spent warming up linearly
    lr_floor: float = 0.0  # "budget" only: the decay stops at lr_floor * lr (a constant tail, e.g. to average)
    decay: str = "cosine"  # "budget" only: the decay's shape, "cosine" or "linear" (straight to zero)
    # "bf16": the decoder's matmuls run under bfloat16 autocast in training; "bf16-all": the recurrence too
    precision: str = "fp32"
    softmax: str = "full"  # "sampled": the stream-mode training loss scores `samples` shared negatives
    samples: int = 1024
    sample_power: float = 0.75  # the negatives are drawn ∝ count^sample_power (1: the unigram, 0: uniform)
    rare_word_unk: float = 0.0  # α: a train word seen c times becomes <unk> with probability α/(α+c), per epoch
    activation_reg: float = 0.0  # AR: weight of the mean squared top-layer output
    temporal_reg: float = 0.0  # TAR: weight of the mean squared step-to-step change of that output
    # Weight averaging (SWA; AWD-LSTM's averaged SGD): from this fraction of training on (of the budget, or
    # of `epochs` without one) a running mean of the weights is kept, sampled every `average_every` steps,
    # and each epoch's checkpoint is whichever of the mean and the current weights validates better.
    average_from: float | None = None
    average_every: int = 10
    # Once training ends, best.pt gets the temperature and the weight of a unigram prior that minimise the
    # validation perplexity (calibrate_checkpoint; stream mode, the LSTM language model).
    calibrate: bool = False
    batch_size: int = 20
    bptt: int = 35
    epochs: int = 40
    patience: int = 3  # epochs without validation improvement before stopping
    # Epochs that end before this fraction of training (the budget, or `epochs`) are not validated or checkpointed
    # as best: under a budget schedule the best epoch is one of the last, and validation is time off training.
    # The epoch the budget ends always validates. Not with the "plateau" schedule, which is driven by validation.
    validate_from: float = 0.0
    max_minutes: float | None = None
    mode: str = "stream"  # "stream" or "lines"
    seed: int = 0
    threads: int | None = None
    # builtin:longrange
    episodes: int = 2000
    gap_min: int = 0
    gap_max: int = 100
    curriculum_epochs: int = 0  # epochs over which the largest gap grows from curriculum_start to gap_max
    curriculum_start: int = 10  # the largest gap of the first epoch, when a curriculum is on
    # Accuracy-driven curriculum: the largest gap grows by curriculum_step only once every probe bucket
    # below it reaches this accuracy, so a hard gap is never shown before the easier ones are learnt.
    curriculum_mastery: float | None = None
    curriculum_step: int = 10  # words the largest gap grows by each time it is mastered
    target_accuracy: float | None = None  # stop once every bucket below 60 words reaches this
    progress: bool = True

    def model_config(self, vocab_size: int) -> LSTMConfig:
        return LSTMConfig(
            vocab_size=vocab_size,
            embed_size=self.hidden_size if self.tie_weights else self.embed_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
            embed_dropout=self.embed_dropout,
            input_dropout=self.input_dropout,
            layer_dropout=self.layer_dropout,
            tie_weights=self.tie_weights,
        )


@dataclass
class TrainResult:
    out: Path
    best_metrics: dict[str, Any]
    epochs_run: int
    seconds: float
    tokens_per_second: float
    log: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split_valid(text: str, fraction: float) -> tuple[str, str]:
    lines = text.splitlines()
    cut = max(1, int(len(lines) * (1 - fraction)))
    if cut >= len(lines):
        raise ValueError("the corpus has too few lines to hold out a validation slice; pass --valid")
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n"


class _Data:
    """Training and validation data for one run, in the configured mode."""

    def __init__(self, cfg: TrainConfig, vocab: Vocabulary | None) -> None:
        self.cfg = cfg
        self.longrange = cfg.corpus == LONGRANGE
        text = load_corpus(cfg.corpus, cfg.seed, cfg.episodes, cfg.gap_min, cfg.gap_max)
        if cfg.valid:
            train_text, valid_text = text, load_corpus(cfg.valid)
        else:
            train_text, valid_text = _split_valid(text, cfg.valid_fraction)
        if vocab is None:
            vocab = Vocabulary.build(
                tokenize(train_text, cfg.lowercase, cfg.split),
                min_freq=cfg.min_freq,
                max_size=cfg.max_vocab,
                lowercase=cfg.lowercase,
                split=cfg.split,
            )
        self.vocab = vocab
        self.train_text = train_text
        if cfg.mode == "lines":
            self.valid_lines = encode_lines(vocab, valid_text)
            self.train_lines = encode_lines(vocab, train_text)
        elif cfg.mode == "stream":
            self.valid_ids = encode_stream(vocab, valid_text)
            train_ids = encode_stream(vocab, train_text)
            self.train_ids = train_ids
            self.train_counts = torch.bincount(train_ids, minlength=len(vocab))  # (V,), the sampled softmax's q
            self.train_streams = batchify(train_ids, cfg.batch_size)
        else:
            raise ValueError(f"mode must be 'stream' or 'lines', got {cfg.mode!r}")

    def gap_max(self, epoch: int) -> int:
        """The epoch-driven curriculum's largest gap (gap_max itself when that curriculum is off)."""
        cfg = self.cfg
        if not cfg.curriculum_epochs:
            return cfg.gap_max
        start = cfg.curriculum_start
        grown = start + (cfg.gap_max - start) * min(1.0, epoch / cfg.curriculum_epochs)
        return max(cfg.gap_min, int(grown))

    def train_batches(self, epoch: int, rng: random.Random, gap_max: int) -> list[tuple[Tensor, Tensor]]:
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
            # Fresh episodes every epoch (no memorisation) with the curriculum's largest gap.
            text = longrange_text(cfg.seed * 7919 + epoch, cfg.episodes, cfg.gap_min, gap_max)
            lines = encode_lines(self.vocab, text)
        return line_batches(lines, cfg.batch_size, self.vocab.pad_id, rng)

    def validate(self, model: LanguageModel) -> dict[str, Any]:
        if self.cfg.mode == "stream":
            return evaluate_stream(model, self.valid_ids)
        batches = line_batches(self.valid_lines, self.cfg.batch_size, self.vocab.pad_id)
        return evaluate_batches(model, batches, self.vocab.pad_id)


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 with this CPU's own instructions (AVX-512 and newer).

    Without them (AVX2 alone) bfloat16 autocast still runs, emulated and far slower than fp32: the
    quality bench's reference shape trains at 205 tokens/s with a bf16 decoder against 4,587 in fp32.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


@functools.cache
def bf16_recurrence_supported() -> bool:
    """Whether torch's fused LSTM runs under bfloat16 autocast here: oneDNN refuses it on some x86 CPUs."""
    lstm = nn.LSTM(4, 4)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(2, 1, 4))
    except RuntimeError:
        return False
    return True


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def budget_lr(cfg: TrainConfig, progress: float) -> float:
    """The "budget" schedule at `progress` in [0, 1]: linear warm-up, then a cosine (or linear) decay to zero.

    With lr_floor the decay holds at lr_floor * lr once it gets there: SWA's constant tail. The linear decay
    spends longer at middling rates than the cosine, which lingers near the peak and near zero.
    """
    if progress < cfg.warmup:
        return cfg.lr * max(progress / cfg.warmup, 0.01)
    decay = min(1.0, (progress - cfg.warmup) / max(1.0 - cfg.warmup, 1e-9))
    left = 1.0 - decay if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * decay))
    return max(cfg.lr * left, cfg.lr_floor * cfg.lr)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing big blocks back to the OS each step.

    A step allocates tensors of batch·bptt·V floats (36 MB for WikiText-2), above glibc's mmap
    threshold: each is a fresh mapping whose pages fault in again, a quarter of a CPU step.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale all gradients together so their total L2 norm is at most max_norm; returns the norm before.

    torch's clip_grad_norm_, for row-sparse gradients too (it refuses them): those are coalesced first,
    so rows gathered twice are summed before their norm is taken, exactly as in the dense gradient.
    """
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total: Tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return total


def _running_mean(
    averaged: tuple[Tensor, ...] | list[Tensor], current: tuple[Tensor, ...] | list[Tensor], n_averaged: Tensor | int
) -> None:
    """Fold one more sample into the running means, in place: avg += (x - avg) / (n + 1).

    AveragedModel's default computes the same out of place on a CPU: 20 ms for a 4.4M-weight model,
    against lerp_'s 1.3 ms.
    """
    weight = 1.0 / (int(n_averaged) + 1)
    for mean, x in zip(averaged, current, strict=True):
        mean.lerp_(x, weight)


class WeightAverage:
    """The running mean of a model's weights over the steps taken from `start` (a fraction of training) on.

    SGD's late iterates bounce around a minimum; their mean sits nearer its middle, which validates better
    than any one of them. torch's AveragedModel keeps the mean, in a copy of the model that can be
    evaluated and saved like the model itself.
    """

    def __init__(self, model: nn.Module, start: float, every: int) -> None:
        if not 0.0 <= start <= 1.0 or every < 1:
            raise ValueError(f"average_from must be in [0, 1] and average_every >= 1, got {start}, {every}")
        self.averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_running_mean)
        self.start = start
        self.every = every
        self.steps = 0  # steps taken since start

    @property
    def samples(self) -> int:
        return int(self.averaged.n_averaged)

    @property
    def model(self) -> nn.Module:
        return self.averaged.module

    def step_at(self, model: nn.Module, progress: Callable[[float], float], epoch_fraction: float) -> None:
        """After an optimizer step, `epoch_fraction` through the epoch: fold the weights in, every `every` steps.

        `progress` maps the epoch fraction to the fraction of training done (budget or epochs).
        """
        if progress(epoch_fraction) < self.start:
            return
        if self.steps % self.every == 0:
            self.averaged.update_parameters(model)
        self.steps += 1

    def state(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.steps = state["steps"]


def mastered(long_range: dict[str, dict[str, float]], gap_max: int, threshold: float) -> bool:
    """Whether every probe bucket starting below gap_max (at least the first) reaches threshold."""
    below = [v["accuracy"] for k, v in long_range.items() if int(k.split("-")[0]) < max(gap_max, 1)]
    return bool(below) and min(below) >= threshold


def _training_parts(
    cfg: TrainConfig, model_config: LSTMConfig, data: _Data, model_factory: ModelFactory | None
) -> tuple[nn.Module, torch.optim.Optimizer, SampledSoftmax | None]:
    """The model, its optimizer and the sampled softmax (or None) that cfg trains with.

    A configuration no step could run is refused here, for train() and profile_steps() alike.
    """
    if cfg.rare_word_unk < 0 or (cfg.rare_word_unk > 0 and cfg.mode != "stream"):
        raise ValueError(f"rare_word_unk must be >= 0 and needs stream mode, got {cfg.rare_word_unk}")
    if cfg.calibrate and (cfg.mode != "stream" or model_factory is not None):
        raise ValueError(
            "calibrate fits the LSTM language model's temperature on a validation stream: stream mode only"
        )
    if cfg.decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {cfg.decay!r}")
    if not 0 <= cfg.validate_from <= 1 or (
        cfg.validate_from > 0 and (cfg.schedule == "plateau" or cfg.curriculum_mastery is not None)
    ):
        raise ValueError(
            f"validate_from must be in [0, 1], and 0 with the plateau schedule or a mastery curriculum (both are "
            f"driven by each epoch's validation), got {cfg.validate_from}"
        )
    if cfg.precision not in ("fp32", "bf16", "bf16-all"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'bf16-all', got {cfg.precision!r}")
    if cfg.precision == "bf16-all" and not bf16_recurrence_supported():
        raise ValueError(
            "precision 'bf16-all' needs a bfloat16 LSTM kernel, which oneDNN does not build for this CPU; "
            "use 'bf16' (the decoder alone) or 'fp32'"
        )
    model: nn.Module
    if model_factory is None:
        # With a sampled softmax and plain SGD the tied (V, H) matrix gets gradient in only the batch's rows
        # (its inputs, targets and negatives): sparse gradients skip zero-filling, clipping and updating all
        # V rows every step, a seventh of a 2 x 300 step. AdamW's moments need every row.
        sparse = cfg.optimizer == "sgd" and cfg.softmax == "sampled"
        model = LSTMLanguageModel(model_config, recurrent_dropout=cfg.recurrent_dropout, sparse_grad=sparse)
    else:
        model = model_factory(model_config)
    optimizer = _make_optimizer(cfg, model)
    sampler = None
    if cfg.softmax == "sampled":
        if cfg.mode != "stream":
            raise ValueError("the sampled softmax is for stream mode")
        sampler = SampledSoftmax(data.train_counts, cfg.samples, cfg.sample_power)
    elif cfg.softmax != "full":
        raise ValueError(f"softmax must be 'full' or 'sampled', got {cfg.softmax!r}")
    return model, optimizer, sampler


def _start(cfg: TrainConfig, vocab: Vocabulary | None) -> _Data:
    """What a run does before it builds a model: threads, allocator, seeds, then the data (with vocab, if given)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    return _Data(cfg, vocab)


def profile_steps(cfg: TrainConfig, steps: int, warmup: int = 20) -> tuple[float, EventList]:
    """Seconds per training step of cfg, and torch.profiler's per-op averages over `steps` steps.

    The steps are the first epoch's batches after `warmup` untimed ones, run by the code train() runs
    (model, optimizer, loss, clipping, update) at cfg's constant lr: where a step's time goes.
    """
    data = _start(cfg, None)
    model, optimizer, sampler = _training_parts(cfg, cfg.model_config(len(data.vocab)), data, None)
    batches = data.train_batches(1, random.Random(cfg.seed), data.gap_max(1))
    if len(batches) < warmup + steps:
        raise ValueError(f"the corpus gives {len(batches)} batches, fewer than {warmup} + {steps}")
    pad = data.vocab.pad_id
    _train_epoch(model, optimizer, batches[:warmup], cfg, pad, 1, None, sampler)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        _train_epoch(model, optimizer, batches[warmup : warmup + steps], cfg, pad, 1, None, sampler)
        seconds = time.perf_counter() - started
    return seconds / steps, profiler.key_averages()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    model_factory: ModelFactory | None = None,
) -> TrainResult:
    """Train per cfg, writing best.pt, last.pt and log.jsonl under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = load_checkpoint(out / LAST) if resume else None
    data = _start(cfg, previous.vocab if previous else None)
    model_config = cfg.model_config(len(data.vocab))
    model, optimizer, sampler = _training_parts(cfg, model_config, data, model_factory)
    lm = as_language_model(model)
    average = None if cfg.average_from is None else WeightAverage(model, cfg.average_from, cfg.average_every)
    start_epoch = 1
    best_loss = math.inf
    best_metrics: dict[str, Any] = {}
    lr = cfg.lr
    stale = 0
    elapsed_before = 0.0
    curriculum_gap = max(cfg.gap_min, min(cfg.curriculum_start, cfg.gap_max))
    log: list[dict[str, Any]] = []
    rng = random.Random(cfg.seed)
    if previous is not None and previous.resume_state is not None:
        model.load_state_dict(previous.state_dict)
        rs = previous.resume_state
        optimizer.load_state_dict(rs["optimizer"])
        start_epoch = previous.epoch + 1
        best_loss, best_metrics, lr, stale = rs["best_loss"], rs["best_metrics"], rs["lr"], rs["stale"]
        elapsed_before = rs["elapsed"]
        curriculum_gap = rs.get("curriculum_gap", curriculum_gap)
        if average is not None and "average" in rs:
            average.load_state(rs["average"])
        rng.setstate(rs["python_rng"])
        torch.set_rng_state(rs["torch_rng"])
        log = rs["log"]

    def snapshot(epoch: int, metrics: dict[str, Any], with_resume: bool, weights: nn.Module = model) -> Checkpoint:
        resume_state = None
        if with_resume:
            resume_state = {
                "optimizer": optimizer.state_dict(),
                "best_loss": best_loss,
                "best_metrics": best_metrics,
                "lr": lr,
                "stale": stale,
                "elapsed": elapsed_before + (time.monotonic() - started),
                "curriculum_gap": curriculum_gap,
                "python_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "log": log,
            }
            if average is not None:
                resume_state["average"] = average.state()
        return Checkpoint(
            config=model_config,
            vocab=data.vocab,
            state_dict={k: v.detach().clone() for k, v in weights.state_dict().items()},
            metrics=metrics,
            train_config=asdict(cfg),
            seed=cfg.seed,
            epoch=epoch,
            resume_state=resume_state,
        )

    started = time.monotonic()
    deadline = None if cfg.max_minutes is None else started + cfg.max_minutes * 60 - elapsed_before
    total_tokens = 0
    train_seconds = 0.0
    epoch = start_epoch - 1

    def progress(epoch_fraction: float) -> float:
        """How far through the budget training is, for the "budget" schedule."""
        if cfg.max_minutes:
            return (elapsed_before + time.monotonic() - started) / (cfg.max_minutes * 60)
        return (epoch - 1 + epoch_fraction) / cfg.epochs

    on_step = None if average is None else functools.partial(average.step_at, model, progress)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr
            gap_max = curriculum_gap if cfg.curriculum_mastery is not None else data.gap_max(epoch)
            batches = data.train_batches(epoch, rng, gap_max)
            epoch_started = time.monotonic()
            schedule = progress if cfg.schedule == "budget" else None
            stats = _train_epoch(
                model, optimizer, batches, cfg, data.vocab.pad_id, epoch, deadline, sampler, schedule, on_step
            )
            train_seconds += time.monotonic() - epoch_started
            if schedule is not None:
                lr = optimizer.param_groups[0]["lr"]  # where the per-batch schedule got to
            total_tokens += stats["tokens"]
            entry: dict[str, Any] = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": stats["loss"],
                "train_tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9),
            }
            if data.longrange:
                entry["gap_max"] = gap_max
            out_of_time = deadline is not None and time.monotonic() >= deadline
            last_epoch = stats["stopped_early"] or out_of_time or epoch == cfg.epochs
            last_metrics: dict[str, Any] = {"epoch": epoch}
            if last_epoch or progress(1.0) >= cfg.validate_from:
                valid = data.validate(lm)
                weights = model  # what this epoch's best checkpoint would hold
                last_metrics["valid"] = valid  # last.pt holds the current weights (training resumes from them)
                if average is not None and average.samples:
                    valid_average = data.validate(as_language_model(average.model))
                    entry.update(average_samples=average.samples, valid_current=valid)
                    if valid_average["loss"] < valid["loss"]:
                        weights, valid = average.model, valid_average
                    entry["weights"] = "average" if weights is average.model else "current"
                entry["valid"] = valid
                if data.longrange:
                    # Probed on the weights this epoch would checkpoint, so best.pt's metrics describe best.pt.
                    entry["long_range"] = long_range_accuracy(as_language_model(weights), data.vocab, per_bucket=50)
                    if cfg.curriculum_mastery is not None and mastered(
                        entry["long_range"], gap_max, cfg.curriculum_mastery
                    ):
                        curriculum_gap = min(cfg.gap_max, gap_max + cfg.curriculum_step)
                if valid["loss"] < best_loss:
                    best_loss, best_metrics, stale = valid["loss"], {"valid": valid, "epoch": epoch}, 0
                    if "long_range" in entry:
                        best_metrics["long_range"] = entry["long_range"]
                    save_checkpoint(out / BEST, snapshot(epoch, best_metrics, with_resume=False, weights=weights))
                else:
                    stale += 1
                    if cfg.schedule == "plateau":
                        lr /= cfg.anneal
            if cfg.schedule == "cosine":
                lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
            entry["elapsed_seconds"] = elapsed_before + time.monotonic() - started
            log.append(entry)
            with (out / "log.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            save_checkpoint(out / LAST, snapshot(epoch, last_metrics, with_resume=True))
            if on_epoch is not None:
                on_epoch(entry)
            # Past the budget now (its validation may be what crossed it): a new epoch would train one batch.
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if stats["stopped_early"] or out_of_time or stale >= cfg.patience:
                break
            if "long_range" in entry and cfg.target_accuracy is not None and entry["gap_max"] >= cfg.gap_max:
                near = [v["accuracy"] for k, v in entry["long_range"].items() if int(k.split("-")[0]) < 60]
                if min(near) >= cfg.target_accuracy:
                    break
    except KeyboardInterrupt:
        save_checkpoint(out / LAST, snapshot(epoch, {"interrupted": True}, with_resume=True))
        raise
    if cfg.calibrate and best_metrics:
        # best.pt's validation metrics are those of its weights on data.valid_ids: no second pass for them.
        best_metrics = calibrate_checkpoint(
            load_checkpoint(out / BEST), out / BEST, data.valid_ids, data.train_counts, best_metrics["valid"]
        )
    return TrainResult(
        out=out,
        best_metrics=best_metrics,
        epochs_run=epoch - start_epoch + 1,
        seconds=elapsed_before + time.monotonic() - started,
        tokens_per_second=total_tokens / max(train_seconds, 1e-9),
        log=log,
    )


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
    unigram distribution (add-one), both fitted on the validation text (model.evaluate.fit_calibration). A
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


def _loss(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    state: Any,
    cfg: TrainConfig,
    ignore_index: int,
    sampler: SampledSoftmax | None,
) -> tuple[Tensor, Tensor, Any]:
    """Training objective, its cross-entropy part and the carried state, for one batch.

    The objective adds the activation penalties (AWD-LSTM's AR and TAR) to the cross-entropy of the
    configured softmax; the carried (h, C) always leaves in fp32, whatever precision the window ran at.
    """
    low_precision = cfg.precision != "fp32"
    if not isinstance(model, LSTMLanguageModel):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            logits, state = as_language_model(model)(inputs, state)  # (B, T, V)
        if low_precision:
            state = type(state)(*(s.float() for s in state))
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
        )
        return loss, loss, state
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16-all"):
        outputs, state = model.hidden_states(inputs, state)  # (B, T, H)
    state = LSTMState(state.hidden.float(), state.cell.float())
    outputs = outputs.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
        if sampler is not None:
            flat = outputs.reshape(-1, outputs.shape[-1])  # (B*T, H)
            weight, bias = model.decoder_weight, model.decoder_bias
            loss = sampler.loss(flat, targets.reshape(-1), weight, bias, sparse_grad=model.sparse_grad)
        else:
            logits = model.decode(outputs)  # (B, T, V)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
            )
    objective = loss
    if cfg.activation_reg > 0:
        # AR: large top-layer activations are penalised, so no single unit carries a prediction alone.
        objective = objective + cfg.activation_reg * outputs.pow(2).mean()
    if cfg.temporal_reg > 0:
        # TAR: the top layer's output should change slowly from one step to the next.
        objective = objective + cfg.temporal_reg * (outputs[:, 1:] - outputs[:, :-1]).pow(2).mean()
    return objective, loss, state


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    pad_id: int,
    epoch: int,
    deadline: float | None,
    sampler: SampledSoftmax | None = None,
    progress: Callable[[float], float] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    model.train()
    lm = as_language_model(model)
    lines = cfg.mode == "lines"
    ignore_index = pad_id if lines else -100
    state = None if lines else lm.zero_state(cfg.batch_size)
    total_loss = 0.0
    total_tokens = 0
    started = time.monotonic()
    stopped_early = False
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not cfg.progress, leave=False)
    for index, (inputs, targets) in enumerate(bar):
        # Every epoch trains at least one batch: an epoch of none would log a loss of 0 and a budget too
        # small for one batch would leave an untrained checkpoint.
        if deadline is not None and index > 0 and time.monotonic() >= deadline:
            stopped_early = True
            break
        if progress is not None:
            for group in optimizer.param_groups:
                group["lr"] = budget_lr(cfg, progress(index / len(batches)))
        state = lm.zero_state(inputs.shape[0]) if lines else detach_state(state)
        objective, loss, state = _loss(model, inputs, targets, state, cfg, ignore_index, sampler)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()  # type: ignore[no-untyped-call]
        if cfg.clip > 0:
            clip_grad_norm(model.parameters(), cfg.clip)
        optimizer.step()
        if on_step is not None:
            on_step((index + 1) / len(batches))
        n = int((targets != pad_id).sum()) if lines else targets.numel()
        total_loss += loss.item() * n
        total_tokens += n
        seconds = time.monotonic() - started
        bar.set_postfix(
            tok_s=f"{total_tokens / max(seconds, 1e-9):.0f}", ppl=f"{math.exp(min(total_loss / total_tokens, 50)):.1f}"
        )
    return {
        "loss": total_loss / max(total_tokens, 1),
        "tokens": total_tokens,
        "seconds": time.monotonic() - started,
        "stopped_early": stopped_early,
    }
