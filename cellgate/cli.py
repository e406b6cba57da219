"""The `cellgate` command. Thin: each subcommand parses flags and calls the library.

Heavy imports happen inside each command so `cellgate serve` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.recipe import TrainConfig

DEFAULT_URL = "http://127.0.0.1:8000"


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `cellgate train` runs: the corpus's recipe (model/recipe.py) with the flags given on top."""
    from model.recipe import parse_overrides, recipe

    flags = {
        "valid": args.valid,
        "max_minutes": args.max_minutes,
        "epochs": args.epochs,
        "seed": args.seed,
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "precision": args.precision,
        "threads": args.threads,
        "max_vocab": args.max_vocab,
        "split": args.split,
        "lowercase": args.lowercase,
    }
    chosen: dict[str, Any] = {key: value for key, value in flags.items() if value is not None}
    if args.epochs is not None and args.max_minutes is None:
        chosen["max_minutes"] = None  # --epochs alone: the epochs are the budget the schedule decays over
    chosen["progress"] = not args.quiet
    chosen.update(parse_overrides(args.set))
    return recipe(args.corpus, args.out, **chosen)


def _train(args: argparse.Namespace) -> int:
    from model.corpus import CorpusError
    from model.train import describe_epoch, train

    def show(entry: dict[str, Any]) -> None:
        print(describe_epoch(entry), file=sys.stderr, flush=True)

    try:
        cfg = train_config(args)
        result = train(cfg, resume=args.resume, on_epoch=None if args.quiet else show)
    except (CorpusError, ValueError) as exc:  # a bad corpus, or a configuration no training step could run with
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: checkpoint saved to {Path(args.out) / 'last.pt'} (continue with --resume)", file=sys.stderr
        )
        return 130
    summary = {
        "out": str(result.out),
        "epochs": result.epochs_run,
        "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second),
        "best": result.best_metrics,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.build import ParityError, export_checkpoint

    try:
        result = export_checkpoint(
            Path(args.checkpoint),
            Path(args.out),
            args.quantize,
            not args.skip_parity,
            args.force,
            Path(args.blocklist) if args.blocklist else None,
        )
    except (ParityError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = result.manifest
    print(json.dumps({"bundle": args.out, "model_version": m["model_version"], "parity": m["parity"]}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.server import serve

    overrides: dict[str, Any] = {}
    for name in ("bundle", "host", "port", "workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return serve(Settings(**overrides))


def _eval(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.corpus import CorpusError, load_corpus
    from model.data import encode_stream
    from model.evaluate import evaluate_stream

    try:
        ckpt = load_checkpoint(Path(args.checkpoint))
        text = load_corpus(args.corpus, seed=args.seed, episodes=args.episodes)
    except (FileNotFoundError, CorpusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = ckpt.build_model()
    metrics: dict[str, Any] = evaluate_stream(model, encode_stream(ckpt.vocab, text), unk_id=ckpt.vocab.unk_id)
    metrics["vocab_size"] = len(ckpt.vocab)
    metrics["temperature"] = ckpt.config.temperature  # 1 unless calibrated (cellgate train does, or cellgate calibrate)
    if args.keystrokes:
        from model.keystrokes import simulate_typing
        from service.completion import Completer

        vocab = ckpt.vocab
        completer = Completer(vocab.words, vocab.normalize, (vocab.pad_id, vocab.unk_id, vocab.eos_id))
        # Read the text as the model was trained to: each line from a zero state after mode "lines".
        per_line = ckpt.train_config.get("mode") == "lines"
        report = simulate_typing(model, vocab, text, completer, k=args.k, per_line=per_line)
        metrics["keystrokes"] = {**report.to_dict(), "per_line": per_line}
    print(json.dumps(metrics, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from model.calibration import calibrate_checkpoint
    from model.checkpoint import load_checkpoint, resolve_checkpoint
    from model.corpus import CorpusError, load_corpus
    from model.data import encode_stream

    try:
        path = resolve_checkpoint(args.checkpoint)
        ckpt = load_checkpoint(path)
        vocab = ckpt.vocab
        valid_ids = encode_stream(vocab, load_corpus(args.valid))
        counts = None
        if args.prior:
            counts = torch.bincount(encode_stream(vocab, load_corpus(args.prior)), minlength=len(vocab))
        metrics = calibrate_checkpoint(ckpt, Path(args.out or path), valid_ids, counts)
    except (FileNotFoundError, CorpusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "temperature": metrics["temperature"],
        "prior_weight": metrics["prior_weight"],
        "valid_perplexity": metrics["valid"]["perplexity"],
        "valid_perplexity_uncalibrated": metrics["valid_uncalibrated"]["perplexity"],
        "checkpoint": str(args.out or path),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cellgate.client import CellgateAPIError, Client

    try:
        with Client(args.url, api_key=args.api_key) as client:
            result = client.predict(args.text, k=args.k)
    except CellgateAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        for p in result.predictions:
            print(f"{p.prob:.4f}  {p.word}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from cellgate.chat import run_chat

    return run_chat(args.url, args.api_key, args.text, args.k)


def _experiment(args: argparse.Namespace) -> int:
    from model.experiments import long_range

    return int(long_range.main(args.rest) or 0)


BENCHMARKS = {
    "serve": "bench.serve",  # HTTP and WebSocket serving against the framework floor and a naive server
    "peer": "bench.peer",  # cellgate against a real Triton sequence batcher, same load, alternating
    "export": "bench.export_speed",  # ONNX Runtime vs PyTorch, graph forms, prefill, int8
    "train-quality": "bench.train_quality",  # the WikiText-2 perplexity bar
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.benchmark])
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a word-level LSTM language model",
        description="Train the recipe for the corpus (model/recipe.py: for text, the best found for a 5-minute "
        "budget on a CPU; for builtin:longrange, the demo's). The flags change what users tune; --set changes any "
        "other field of the recipe.",
    )
    t.add_argument("--corpus", required=True, help="a UTF-8 text file, a directory of .txt files, or builtin:longrange")
    t.add_argument("--out", required=True, help="directory for best.pt, last.pt and log.jsonl")
    t.add_argument("--valid", help="validation text (default: hold out the last 5%% of lines)")
    t.add_argument("--max-minutes", type=float, help="the time budget the schedule decays over (default: 5)")
    t.add_argument("--epochs", type=int, help="at most this many epochs; alone, the budget instead of the time")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no line per epoch")
    t.add_argument("--hidden-size", type=int, help="width of every layer (and of the tied embedding); default 256")
    t.add_argument("--layers", type=int, help="stacked LSTM layers; default 2")
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "bf16-all"],
        help="auto (default): bfloat16 where the CPU computes it natively, fp32 elsewhere",
    )
    t.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    t.add_argument("--max-vocab", type=int, help="keep only the most frequent words (default: every training word)")
    t.add_argument(
        "--split",
        choices=["auto", "words", "whitespace"],
        help="auto (default): whitespace for text that comes tokenized (WikiText), words and punctuation otherwise",
    )
    t.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        help="default: lowercase unless the text comes tokenized",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other TrainConfig field (model/recipe.py gives each with its reason), e.g. --set dropout=0.4",
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a checkpoint to a verified ONNX bundle")
    e.add_argument("checkpoint", help="a checkpoint file or a training directory")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--quantize", choices=["int8"], help="also quantize weights")
    e.add_argument("--skip-parity", action="store_true", help="do not run the parity checks (not recommended)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    e.add_argument(
        "--blocklist", help="ship this blocklist in the bundle: words never suggested or sampled (one per line)"
    )
    e.set_defaults(func=_export)

    s = sub.add_parser("serve", help="serve a bundle over HTTP (settings: CELLGATE_* environment variables)")
    s.add_argument("--bundle", help="bundle directory (CELLGATE_BUNDLE)")
    s.add_argument("--host", help="bind address (CELLGATE_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="bind port (CELLGATE_PORT, default 8000)")
    s.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing sessions (CELLGATE_WORKERS, default 1; 0 = one per core, docs/deploy.md)",
    )
    s.set_defaults(func=_serve)

    v = sub.add_parser("eval", help="perplexity and top-k accuracy of a checkpoint on a text")
    v.add_argument("checkpoint")
    v.add_argument("--corpus", required=True, help="held-out text: a file, a directory of .txt, builtin:longrange")
    v.add_argument(
        "--keystrokes",
        action="store_true",
        help="also simulate a typist taking completions (keystroke savings, top-1/top-k next-word recall)",
    )
    v.add_argument("--k", type=int, default=3, help="completions shown to the simulated typist (default 3)")
    v.add_argument(
        "--seed",
        type=int,
        default=0,
        help="builtin:longrange only: episodes of this seed (held out: one training never used)",
    )
    v.add_argument("--episodes", type=int, default=2000, help="builtin:longrange only: how many episodes")
    v.set_defaults(func=_eval)

    k = sub.add_parser("calibrate", help="fit a checkpoint's softmax temperature on a validation text")
    k.add_argument("checkpoint", help="a checkpoint file or a training directory (its best.pt)")
    k.add_argument("--valid", required=True, help="held-out text the temperature is fitted on (not the test text)")
    k.add_argument("--prior", help="the training text: also fit the weight of its unigram distribution")
    k.add_argument("--out", help="write the calibrated checkpoint here (default: in place)")
    k.set_defaults(func=_calibrate)

    p = sub.add_parser("predict", help="next-word suggestions from a running server")
    p.add_argument("text")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--api-key")
    p.add_argument("--json", action="store_true", help="print the raw JSON response")
    p.set_defaults(func=_predict)

    c = sub.add_parser("chat", help="an interactive loop against a running server: suggestions after each line")
    c.add_argument("--url", default=DEFAULT_URL)
    c.add_argument("--api-key")
    c.add_argument("--k", type=int, default=5)
    c.add_argument("--text", default="", help="prime the session with this text first")
    c.set_defaults(func=_chat)

    x = sub.add_parser("experiment", help="experiments, e.g. `cellgate experiment long-range`")
    x.add_argument("rest", nargs=argparse.REMAINDER)
    x.set_defaults(func=_experiment)

    b = sub.add_parser("bench", help="benchmarks, e.g. `cellgate bench serve --short` (figures in docs/benchmarks.md)")
    b.add_argument("benchmark", choices=sorted(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (`cellgate bench NAME --help`)")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
