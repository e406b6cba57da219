"""Quality bar of issue 3: train on WikiText-2 valid.txt split by lines, report test perplexity.

Protocol (fixed, whatever the recipe):
- `valid.txt` split by LINES: first 90 % train, next 5 % validation, last 5 % test;
- vocabulary = every whitespace-separated word of the train portion (no lowercasing, no min-freq;
  WikiText is already tokenized and has its own `<unk>`), each line ending in `<eos>`;
- validation/test words outside it become `<unk>`;
- the best checkpoint by validation perplexity is scored on the test portion with the full softmax,
  carrying state across windows (`model.evaluate.evaluate_stream`).

    python -m bench.train_quality --max-minutes 5 --out bench/results/train_quality.json
    python -m bench.train_quality --recipe reference --out bench/results/train_quality_reference.json
    python -m bench.train_quality --recipe best --set dropout=0.3 --set softmax=full   # one lever changed
    python -m bench.train_quality --throughput --out bench/results/train_throughput.json
    python -m bench.train_quality --profile 60 --out bench/results/train_profile.txt   # where a step's time goes

Figures on a shared 2-core machine are noisy: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
SPLITS = (("train", 0.0, 0.90), ("valid", 0.90, 0.95), ("test", 0.95, 1.0))

# The protocol's vocabulary: every whitespace-separated train word, case kept (WikiText comes tokenized, with its own
# `<unk>`). `cellgate train`'s "auto" tokenization decides the same for this text (model.recipe.looks_tokenized).
PROTOCOL: dict[str, Any] = {"lowercase": False, "split": "whitespace", "min_freq": 1}

# PyTorch's examples/word_language_model with its documented flags (--tied, --epochs 6, defaults otherwise), as
# changes to the recipe below.
REFERENCE: dict[str, Any] = {
    "hidden_size": 200,
    "num_layers": 2,
    "dropout": 0.2,
    "embed_dropout": 0.0,
    "recurrent_dropout": 0.0,
    "optimizer": "sgd",
    "lr": 20.0,
    "schedule": "plateau",
    "anneal": 4.0,
    "clip": 0.25,
    "bptt": 35,
    "batch_size": 20,
    "epochs": 6,
    "max_minutes": None,  # the example's 6 epochs, whatever the machine's speed
    "precision": "fp32",
    "softmax": "full",
    "rare_word_unk": 0.0,
    "calibrate": False,
    "validate_from": 0.0,  # the plateau schedule acts on every epoch's validation
}

# BEST is the recipe `cellgate train` runs: TrainConfig's defaults (model/recipe.py gives each choice with the runs
# behind it, docs/experiments.md the runs themselves), 5 minutes included.
RECIPES: dict[str, dict[str, Any]] = {"reference": REFERENCE, "best": {}}


def split_lines(path: Path) -> dict[str, str]:
    """The three portions of the protocol, each as text with one line per corpus line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = {}
    for name, lo, hi in SPLITS:
        chosen = lines[int(len(lines) * lo) : int(len(lines) * hi)]
        out[name] = "\n".join(chosen) + "\n"
    return out


class Setup(NamedTuple):
    """A recipe resolved for this run: its training config and what the report says about it."""

    cfg: Any  # model.train.TrainConfig (imported lazily, as torch is)
    recipe_name: str
    overrides: dict[str, Any]
    precision_fallback: str | None
    portions: dict[str, str]


def setup(args: argparse.Namespace) -> Setup:
    """The recipe, its overrides and the CPU's precision choice, as a TrainConfig on the protocol's split."""
    from model.cpu import resolve_precision
    from model.recipe import parse_overrides, recipe

    # Training speed alone is timed on the reference recipe (2 x 200, batch 20, bptt 35, full softmax, fp32),
    # whatever --recipe says, so the figure stays comparable with the PyTorch example's.
    recipe_name = "reference" if args.throughput else args.recipe
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    chosen = {**RECIPES[recipe_name], **overrides}
    if args.max_minutes is not None:
        chosen["max_minutes"] = args.max_minutes or None  # --max-minutes 0: no time budget, the epochs decide
    if args.throughput:
        # One timed slice of one epoch.
        chosen.update(epochs=1, max_minutes=args.max_minutes or 1.0)

    # A profile writes no checkpoint but must not clear a trained run's either.
    kind = "throughput" if args.throughput else "profile" if args.profile else recipe_name
    run_dir = Path(args.run_dir or f"runs/train_quality/{kind}")
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    portions = split_lines(Path(args.data))
    for name, text in portions.items():
        (data_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    for stale in ("best.pt", "last.pt", "log.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)

    cfg = recipe(
        str(data_dir / "train.txt"),
        str(run_dir),
        valid=str(data_dir / "valid.txt"),
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        **PROTOCOL,
        **chosen,
    )
    # "auto" (the recipe's) follows the CPU; bfloat16 is emulated on CPUs without AVX-512, far slower than fp32
    # (docs/experiments.md). A precision asked for with --set is run as asked.
    precision_fallback = resolve_precision(cfg.precision)[1]
    if precision_fallback:
        print(f"note: {precision_fallback}", file=sys.stderr)
    return Setup(cfg, recipe_name, overrides, precision_fallback, portions)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train one recipe under the protocol and score it on the test portion."""
    import torch

    from model.calibration import as_trained, unigram_log_prior
    from model.checkpoint import load_checkpoint
    from model.data import encode_stream
    from model.evaluate import evaluate_stream
    from model.train import describe_epoch, train

    cfg, recipe_name, overrides, precision_fallback, portions = setup(args)
    run_dir, minutes = Path(cfg.out), cfg.max_minutes
    load_before = os.getloadavg()
    started = time.monotonic()
    result = train(cfg, on_epoch=None if args.quiet else lambda entry: print(describe_epoch(entry), file=sys.stderr))
    train_wall = time.monotonic() - started
    load_after = os.getloadavg()

    ckpt = load_checkpoint(run_dir / "best.pt")
    model = ckpt.build_model()
    test_ids = encode_stream(ckpt.vocab, portions["test"])
    valid_ids = encode_stream(ckpt.vocab, portions["valid"])
    test = evaluate_stream(model, test_ids, unk_id=ckpt.vocab.unk_id)
    calibration: dict[str, Any] = {"temperature": ckpt.config.temperature}
    if "calibration_seconds" in ckpt.metrics:
        train_ids = encode_stream(ckpt.vocab, portions["train"])
        log_prior = unigram_log_prior(torch.bincount(train_ids, minlength=len(ckpt.vocab)))
        uncalibrated = as_trained(ckpt, log_prior).build_model()
        calibration["prior_weight"] = ckpt.metrics["prior_weight"]
        calibration["test_uncalibrated"] = evaluate_stream(uncalibrated, test_ids, unk_id=ckpt.vocab.unk_id)
        calibration["valid_uncalibrated"] = evaluate_stream(uncalibrated, valid_ids, unk_id=ckpt.vocab.unk_id)
        calibration["seconds"] = round(ckpt.metrics["calibration_seconds"], 1)
    report: dict[str, Any] = {
        "recipe": recipe_name,
        "overrides": overrides,
        "precision_fallback": precision_fallback,
        "throughput_only": args.throughput,
        "test": test,
        "valid": evaluate_stream(model, valid_ids, unk_id=ckpt.vocab.unk_id),
        "calibration": calibration,
        "best_epoch": ckpt.epoch,
        "epochs_run": result.epochs_run,
        "train_wall_seconds": round(train_wall, 1),
        "train_tokens_per_second": round(result.tokens_per_second),
        "max_minutes": minutes,
        "data": {
            "source": str(args.data),
            "vocab_size": len(ckpt.vocab),
            "train_tokens": len(ckpt.vocab.tokenize(portions["train"])),
            "valid_tokens": valid_ids.numel(),
            "test_tokens": test_ids.numel(),
            "test_oov_rate": float((test_ids == ckpt.vocab.unk_id).float().mean()),
        },
        "epochs": [
            {
                "epoch": e["epoch"],
                "lr": e["lr"],
                "train_loss": round(e["train_loss"], 4),
                # None for an epoch that validate_from left unvalidated
                "valid_perplexity": round(e["valid"]["perplexity"], 2) if "valid" in e else None,
                "train_tokens_per_second": round(e["train_tokens_per_second"]),
                "elapsed_seconds": round(e["elapsed_seconds"], 1),
            }
            for e in result.log
        ],
        "config": ckpt.train_config,  # as trained: the precision and the tokenization decided
        "machine": {
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
    }
    return report


def profile(args: argparse.Namespace) -> str:
    """Where a training step of the recipe goes: time per step and the ops by self CPU time."""
    from model.train import profile_steps

    resolved = setup(args)
    cfg = resolved.cfg
    seconds, ops = profile_steps(cfg, args.profile)
    tokens = cfg.batch_size * cfg.bptt
    label = " ".join([resolved.recipe_name, *args.set])
    head = (
        f"{label}: {seconds * 1000:.1f} ms per step of {tokens} tokens "
        f"({tokens / seconds:.0f} tokens/s under the profiler), {args.profile} steps, {cfg.threads} threads"
    )
    table: str = ops.table(sort_by="self_cpu_time_total", row_limit=20)  # type: ignore[no-untyped-call]
    return head + "\n" + table


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="best")
    parser.add_argument(
        "--max-minutes", type=float, help="training budget; 0 for none (default: the recipe's, 5 for best)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    parser.add_argument("--throughput", action="store_true", help="time training only (1 epoch slice, default 1 min)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="WikiText-2 valid.txt")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", help="checkpoints and split files (default runs/train_quality/RECIPE)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no line per epoch")
    parser.add_argument(
        "--profile", type=int, metavar="STEPS", help="no run: profile STEPS training steps (after 20 warm-up steps)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    if args.profile:
        text = profile(args)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        return 0

    report = run(args)
    test = report["test"]
    calibration = report["calibration"]
    if "test_uncalibrated" in calibration:
        print(
            f"calibrated: temperature {calibration['temperature']:.3f}, "
            f"prior weight {calibration['prior_weight']:.3f}, test perplexity "
            f"{calibration['test_uncalibrated']['perplexity']:.1f} as trained, in {calibration['seconds']} s"
        )
    print(
        f"{report['recipe']}: test perplexity {test['perplexity']:.1f}  "
        f"top-1 {test['top1']:.3f}  top-5 {test['top5']:.3f}  "
        f"train wall {report['train_wall_seconds']:.0f} s  {report['train_tokens_per_second']} tokens/s  "
        f"epochs {report['epochs_run']} (best {report['best_epoch']})  threads {report['machine']['threads']}  "
        f"load {report['machine']['loadavg_before'][0]}->{report['machine']['loadavg_after'][0]}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
