"""The training loop: SGD or AdamW with clipping, a schedule, per-epoch validation, checkpoints and resume.

What a run trains with is model/recipe.py's (TrainConfig), what it reads model/data.py's (TrainingData),
its optimizer, schedule and clipping model/optim.py's, what it does once training ends model/calibration.py's,
and what the CPU can do model/cpu.py's. Two data modes:
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.profiler_util import EventList
from tqdm import tqdm

from model.calibration import calibrate_checkpoint
from model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, save_checkpoint
from model.config import LSTMConfig
from model.cpu import keep_freed_memory, resolve_precision
from model.data import TrainingData, line_batches
from model.evaluate import LanguageModel, detach_state, evaluate_batches, evaluate_stream, long_range_accuracy
from model.lm import LSTMLanguageModel, LSTMState
from model.optim import budget_lr, clip_grad_norm, make_optimizer
from model.recipe import TrainConfig
from model.softmax import SampledSoftmax
from vocab import Vocabulary

# Builds the network from its shape; train() defaults to the gated LSTM, an experiment may swap it.
ModelFactory = Callable[[LSTMConfig], nn.Module]


def as_language_model(model: nn.Module) -> LanguageModel:
    """The module seen through the LanguageModel protocol (nn.Module hides methods from mypy)."""
    if not callable(getattr(model, "zero_state", None)):
        raise TypeError(f"{type(model).__name__} has no zero_state(batch_size); it cannot be trained here")
    return cast(LanguageModel, model)


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


def describe_epoch(entry: dict[str, Any]) -> str:
    """One log entry as one line, for a log that is a file or a pipe rather than a progress bar."""
    parts = [
        f"epoch {entry['epoch']}",
        f"lr {entry['lr']:.3g}",
        f"train ppl {math.exp(min(entry['train_loss'], 50)):.1f}",
    ]
    if "valid" in entry:
        parts.append(f"valid ppl {entry['valid']['perplexity']:.1f}")
    if "gap_max" in entry:
        parts.append(f"gap ≤ {entry['gap_max']}")
    parts += [f"{entry['train_tokens_per_second']:,.0f} tokens/s", f"{entry['elapsed_seconds']:.0f} s"]
    return "  ".join(parts)


def mastered(long_range: dict[str, dict[str, float]], gap_max: int, threshold: float) -> bool:
    """Whether every probe bucket starting below gap_max (at least the first) reaches threshold."""
    below = [v["accuracy"] for k, v in long_range.items() if int(k.split("-")[0]) < max(gap_max, 1)]
    return bool(below) and min(below) >= threshold


def _training_parts(
    cfg: TrainConfig, data: TrainingData, model_factory: ModelFactory | None
) -> tuple[nn.Module, torch.optim.Optimizer, SampledSoftmax | None]:
    """The model, its optimizer and the sampled softmax (or None) that cfg trains with."""
    if cfg.calibrate and model_factory is not None:
        raise ValueError("calibrate fits the LSTM language model's temperature; another model cannot calibrate")
    sampled = cfg.uses_sampled_softmax(len(data.vocab))
    model: nn.Module
    if model_factory is None:
        # With a sampled softmax and plain SGD the tied (V, H) matrix gets gradient in only the batch's rows
        # (its inputs, targets and negatives): sparse gradients skip zero-filling, clipping and updating all
        # V rows every step, a seventh of a 2 x 300 step. AdamW's moments need every row.
        sparse = cfg.optimizer == "sgd" and sampled
        model = LSTMLanguageModel(cfg.model_config(len(data.vocab)), cfg.recurrent_dropout, sparse_grad=sparse)
    else:
        model = model_factory(cfg.model_config(len(data.vocab)))
    optimizer = make_optimizer(cfg, model)
    sampler = SampledSoftmax(data.train_counts, cfg.samples) if sampled else None
    return model, optimizer, sampler


def _start(cfg: TrainConfig, vocab: Vocabulary | None) -> TrainingData:
    """What a run does before it builds a model: threads, allocator, precision, seeds, then the data.

    The data's cfg is the run's, with what depends on the CPU and the text decided (precision, tokenization).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    cfg = replace(cfg, precision=resolve_precision(cfg.precision)[0])
    seed_everything(cfg.seed)
    return TrainingData(cfg, vocab)


def _validate(data: TrainingData, model: LanguageModel) -> dict[str, Any]:
    if data.cfg.mode == "stream":
        return evaluate_stream(model, data.valid_ids)
    pad = data.vocab.pad_id
    return evaluate_batches(model, line_batches(data.valid_lines, data.cfg.batch_size, pad), pad)


def profile_steps(cfg: TrainConfig, steps: int, warmup: int = 20) -> tuple[float, EventList]:
    """Seconds per training step of cfg, and torch.profiler's per-op averages over `steps` steps.

    The steps are the first epoch's batches after `warmup` untimed ones, run by the code train() runs
    (model, optimizer, loss, clipping, update) at cfg's constant lr: where a step's time goes.
    """
    data = _start(cfg, None)
    cfg = data.cfg
    model, optimizer, sampler = _training_parts(cfg, data, None)
    batches = data.train_batches(1, random.Random(cfg.seed), cfg.gap_max)
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
    """Train per cfg, writing best.pt, last.pt and log.jsonl under cfg.out; on_epoch sees each log entry."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = load_checkpoint(out / LAST) if resume else None
    data = _start(cfg, previous.vocab if previous else None)
    cfg = data.cfg
    model, optimizer, sampler = _training_parts(cfg, data, model_factory)
    lm = as_language_model(model)
    model_config = cfg.model_config(len(data.vocab))
    start_epoch = 1
    best_loss = math.inf
    best_metrics: dict[str, Any] = {}
    lr = cfg.lr
    stale = 0  # validated epochs since the last improvement (the plateau schedule anneals on one)
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

    def progress(epoch_fraction: float) -> float:
        """How far through the budget (the time, or `epochs` without one) training is."""
        if cfg.max_minutes:
            return (elapsed_before + time.monotonic() - started) / (cfg.max_minutes * 60)
        return (epoch - 1 + epoch_fraction) / cfg.epochs

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr
            gap_max = curriculum_gap if cfg.curriculum_mastery is not None else cfg.gap_max
            batches = data.train_batches(epoch, rng, gap_max)
            epoch_started = time.monotonic()
            schedule = progress if cfg.schedule == "budget" else None
            stats = _train_epoch(model, optimizer, batches, cfg, data.vocab.pad_id, epoch, deadline, sampler, schedule)
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
                valid = _validate(data, lm)
                last_metrics["valid"] = entry["valid"] = valid
                if data.longrange:
                    entry["long_range"] = long_range_accuracy(lm, data.vocab, per_bucket=50)
                    if cfg.curriculum_mastery is not None and mastered(
                        entry["long_range"], gap_max, cfg.curriculum_mastery
                    ):
                        curriculum_gap = min(cfg.gap_max, gap_max + cfg.curriculum_step)
                if valid["loss"] < best_loss:
                    best_loss, best_metrics, stale = valid["loss"], {"valid": valid, "epoch": epoch}, 0
                    if "long_range" in entry:
                        best_metrics["long_range"] = entry["long_range"]
                    save_checkpoint(out / BEST, snapshot(epoch, best_metrics, with_resume=False))
                else:
                    stale += 1
                    if cfg.schedule == "plateau":
                        lr /= cfg.anneal
            entry["elapsed_seconds"] = elapsed_before + time.monotonic() - started
            log.append(entry)
            with (out / "log.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            save_checkpoint(out / LAST, snapshot(epoch, last_metrics, with_resume=True))
            if on_epoch is not None:
                on_epoch(entry)
            # Past the budget now (its validation may be what crossed it): a new epoch would train one batch.
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if stats["stopped_early"] or out_of_time:
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


def _loss(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    state: Any,
    cfg: TrainConfig,
    ignore_index: int,
    sampler: SampledSoftmax | None,
) -> tuple[Tensor, Any]:
    """The cross-entropy of the configured softmax for one batch, and the carried state (always fp32)."""
    low_precision = cfg.precision in ("bf16", "bf16-all")  # "auto" is resolved before training starts
    if not isinstance(model, LSTMLanguageModel):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            logits, state = as_language_model(model)(inputs, state)  # (B, T, V)
        if low_precision:
            state = type(state)(*(s.float() for s in state))
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
        )
        return loss, state
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
    return loss, state


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
    # disable=None: tqdm draws the bar only on a terminal; a log file or a pipe gets no carriage-return updates.
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=None if cfg.progress else True, leave=False)
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
        loss, state = _loss(model, inputs, targets, state, cfg, ignore_index, sampler)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if cfg.clip > 0:
            clip_grad_norm(model.parameters(), cfg.clip)
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
