"""Training: truncated BPTT (or whole lines), AdamW/SGD with clipping, schedules, early stopping.

Two data modes:
- "stream": the corpus is one token stream cut into `batch_size` parallel streams; windows of
  `bptt` tokens are trained in order and (h, C) is carried (detached) from one window to the next.
- "lines": each line is one sequence from a zero state, so backpropagation spans the whole line.
  The long-range corpus uses it: an episode is a line, and a gradient must cross the whole gap.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, save_checkpoint
from model.config import LSTMConfig
from model.corpus import LONGRANGE, load_corpus, longrange_text
from model.data import batchify, encode_lines, encode_stream, line_batches, stream_windows
from model.evaluate import LanguageModel, detach_state, evaluate_batches, evaluate_stream, long_range_accuracy
from model.lm import LSTMLanguageModel
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
    tie_weights: bool = True
    # optimisation
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 20.0
    weight_decay: float = 0.0
    clip: float = 0.25
    schedule: str = "plateau"  # "plateau" (divide by anneal on no improvement), "cosine", "none"
    anneal: float = 4.0
    batch_size: int = 20
    bptt: int = 35
    epochs: int = 40
    patience: int = 3  # epochs without validation improvement before stopping
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
            self.train_streams = batchify(encode_stream(vocab, train_text), cfg.batch_size)
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
            return list(stream_windows(self.train_streams, cfg.bptt))
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


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def mastered(long_range: dict[str, dict[str, float]], gap_max: int, threshold: float) -> bool:
    """Whether every probe bucket starting below gap_max (at least the first) reaches threshold."""
    below = [v["accuracy"] for k, v in long_range.items() if int(k.split("-")[0]) < max(gap_max, 1)]
    return bool(below) and min(below) >= threshold


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    model_factory: ModelFactory | None = None,
) -> TrainResult:
    """Train per cfg, writing best.pt, last.pt and log.jsonl under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    previous = load_checkpoint(out / LAST) if resume else None
    seed_everything(cfg.seed)
    data = _Data(cfg, previous.vocab if previous else None)
    model_config = cfg.model_config(len(data.vocab))
    if model_factory is None:
        model: nn.Module = LSTMLanguageModel(model_config, recurrent_dropout=cfg.recurrent_dropout)
    else:
        model = model_factory(model_config)
    lm = as_language_model(model)
    optimizer = _make_optimizer(cfg, model)
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
        rng.setstate(rs["python_rng"])
        torch.set_rng_state(rs["torch_rng"])
        log = rs["log"]

    def snapshot(epoch: int, metrics: dict[str, Any], with_resume: bool) -> Checkpoint:
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
        return Checkpoint(
            config=model_config,
            vocab=data.vocab,
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
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
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr
            gap_max = curriculum_gap if cfg.curriculum_mastery is not None else data.gap_max(epoch)
            batches = data.train_batches(epoch, rng, gap_max)
            epoch_started = time.monotonic()
            stats = _train_epoch(model, optimizer, batches, cfg, data.vocab.pad_id, epoch, deadline)
            train_seconds += time.monotonic() - epoch_started
            total_tokens += stats["tokens"]
            valid = data.validate(lm)
            entry: dict[str, Any] = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": stats["loss"],
                "train_tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9),
                "valid": valid,
                "elapsed_seconds": elapsed_before + time.monotonic() - started,
            }
            if data.longrange:
                entry["gap_max"] = gap_max
                entry["long_range"] = long_range_accuracy(lm, data.vocab, per_bucket=50)
                if cfg.curriculum_mastery is not None and mastered(
                    entry["long_range"], gap_max, cfg.curriculum_mastery
                ):
                    curriculum_gap = min(cfg.gap_max, gap_max + cfg.curriculum_step)
            improved = valid["loss"] < best_loss
            if improved:
                best_loss, best_metrics, stale = valid["loss"], {"valid": valid, "epoch": epoch}, 0
                if "long_range" in entry:
                    best_metrics["long_range"] = entry["long_range"]
                save_checkpoint(out / BEST, snapshot(epoch, best_metrics, with_resume=False))
            else:
                stale += 1
                if cfg.schedule == "plateau":
                    lr /= cfg.anneal
            if cfg.schedule == "cosine":
                lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
            log.append(entry)
            with (out / "log.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            save_checkpoint(out / LAST, snapshot(epoch, {"valid": valid, "epoch": epoch}, with_resume=True))
            if on_epoch is not None:
                on_epoch(entry)
            if stats["stopped_early"] or stale >= cfg.patience:
                break
            if data.longrange and cfg.target_accuracy is not None and entry["gap_max"] >= cfg.gap_max:
                near = [v["accuracy"] for k, v in entry["long_range"].items() if int(k.split("-")[0]) < 60]
                if min(near) >= cfg.target_accuracy:
                    break
    except KeyboardInterrupt:
        save_checkpoint(out / LAST, snapshot(epoch, {"interrupted": True}, with_resume=True))
        raise
    return TrainResult(
        out=out,
        best_metrics=best_metrics,
        epochs_run=epoch - start_epoch + 1,
        seconds=elapsed_before + time.monotonic() - started,
        tokens_per_second=total_tokens / max(train_seconds, 1e-9),
        log=log,
    )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    pad_id: int,
    epoch: int,
    deadline: float | None,
) -> dict[str, Any]:
    model.train()
    lm = as_language_model(model)
    lines = cfg.mode == "lines"
    state = None if lines else lm.zero_state(cfg.batch_size)
    total_loss = 0.0
    total_tokens = 0
    started = time.monotonic()
    stopped_early = False
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not cfg.progress, leave=False)
    for inputs, targets in bar:
        if deadline is not None and time.monotonic() >= deadline:
            stopped_early = True
            break
        state = lm.zero_state(inputs.shape[0]) if lines else detach_state(state)
        logits, state = lm(inputs, state)  # (B, T, V)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id if lines else -100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
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
