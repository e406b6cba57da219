"""Long-range memory: the gated LSTM against a vanilla tanh RNN on `builtin:longrange`.

Both models get the same shape (embedding, hidden size, layers), optimiser, time budget, schedule and
accuracy-driven gap curriculum; the probe is the accuracy of the word after "i speak" by filler-gap
bucket (`model.evaluate.long_range_accuracy`). Both train the demo's recipe, the one `cellgate train --corpus
builtin:longrange` runs (model.recipe.LONGRANGE_RECIPE).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from model.checkpoint import LAST, load_checkpoint
from model.config import LSTMConfig
from model.corpus import COUNTRY_LANGUAGE, LONGRANGE
from model.evaluate import BUCKET_WIDTH, long_range_accuracy
from model.lm import LSTMLanguageModel, locked_dropout
from model.recipe import TrainConfig, recipe
from model.train import ModelFactory, as_language_model, train

BAR_GAP = 60  # the demo recipe must hold every bucket below this many filler words…
BAR_ACCURACY = 0.95  # …at this accuracy or better
MAX_GAP = 100  # buckets are reported up to here
CHANCE = 1 / len(COUNTRY_LANGUAGE)  # guessing a language without remembering the country
MODELS = ("lstm", "rnn")


class RNNState(NamedTuple):
    hidden: Tensor  # h, (L, B, H): the only memory a vanilla RNN has


class TanhRNNLanguageModel(nn.Module):
    """Embedding → stacked vanilla tanh RNN layers → tied decoder, with the LSTM model's interface."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        sizes = [config.embed_size] + [config.hidden_size] * config.num_layers
        # One nn.RNN per layer so that dropout between layers is the LSTM's locked dropout.
        self.layers = nn.ModuleList(
            nn.RNN(sizes[i], sizes[i + 1], nonlinearity="tanh", batch_first=True) for i in range(config.num_layers)
        )
        if config.tie_weights:
            self.decoder_weight = self.embedding.weight
        else:
            self.decoder_weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
            nn.init.uniform_(self.decoder_weight, -0.1, 0.1)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def zero_state(self, batch_size: int) -> RNNState:
        """All-zero h for a batch: (L, B, H)."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return RNNState(self.embedding.weight.new_zeros(shape))

    def forward(self, tokens: Tensor, state: RNNState | None = None) -> tuple[Tensor, RNNState]:
        """tokens (B, T) int64 -> logits (B, T, V) and the state after the last token."""
        if state is None:
            state = self.zero_state(tokens.shape[0])
        x = locked_dropout(self.embedding(tokens), self.config.dropout, self.training)  # (B, T, E)
        new_h = []
        for index, layer in enumerate(self.layers):
            x, h = layer(x, state.hidden[index : index + 1])  # (B, T, H), (1, B, H)
            x = locked_dropout(x, self.config.dropout, self.training)
            new_h.append(h.squeeze(0))
        logits = nn.functional.linear(x, self.decoder_weight, self.decoder_bias)  # (B, T, V)
        return logits, RNNState(torch.stack(new_h))


def lstm_factory(cfg: TrainConfig) -> ModelFactory:
    """The factory train() uses by default, spelled out so both arms of the experiment name theirs."""

    def build(config: LSTMConfig) -> nn.Module:
        return LSTMLanguageModel(config, recurrent_dropout=cfg.recurrent_dropout)

    return build


def factories(cfg: TrainConfig) -> dict[str, ModelFactory]:
    """Both arms of the experiment, keyed as in the report."""
    return {"lstm": lstm_factory(cfg), "rnn": TanhRNNLanguageModel}


def bucket_names(max_gap: int = MAX_GAP) -> list[str]:
    """Bucket keys as long_range_accuracy writes them: "0-10", "10-20", …"""
    return [f"{low}-{low + BUCKET_WIDTH}" for low in range(0, max_gap, BUCKET_WIDTH)]


def passes_bar(accuracy: dict[str, float], bar: float = BAR_ACCURACY, below_gap: int = BAR_GAP) -> bool:
    """Whether every bucket starting below `below_gap` words reaches `bar`."""
    return all(acc >= bar for name, acc in accuracy.items() if int(name.split("-")[0]) < below_gap)


def _train_arm(name: str, cfg: TrainConfig, factory: ModelFactory, per_bucket: int, echo: bool) -> dict[str, Any]:
    """Train one model, then probe its final weights with fresh episodes."""
    curriculum: list[dict[str, float]] = []

    def on_epoch(entry: dict[str, Any]) -> None:
        # Record (and show) only when the curriculum's gap moves: a few dozen lines, not thousands.
        if not curriculum or curriculum[-1]["gap_max"] != entry["gap_max"]:
            curriculum.append(
                {"epoch": entry["epoch"], "seconds": entry["elapsed_seconds"], "gap_max": entry["gap_max"]}
            )
            if echo:
                print(
                    f"  {name}: epoch {entry['epoch']:4d}  {entry['elapsed_seconds']:6.1f} s  gap ≤ {entry['gap_max']}"
                )

    result = train(cfg, on_epoch=on_epoch, model_factory=factory)
    # The last weights, not best.pt: best.pt is chosen by validation loss, which the curriculum distorts.
    ckpt = load_checkpoint(Path(cfg.out) / LAST)
    model = factory(ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    probe = long_range_accuracy(as_language_model(model), ckpt.vocab, per_bucket=per_bucket, max_gap=MAX_GAP)
    accuracy = {bucket: values["accuracy"] for bucket, values in probe.items()}
    final = result.log[-1] if result.log else {}
    return {
        "accuracy": accuracy,
        "passes_bar": passes_bar(accuracy),
        "train_seconds": result.seconds,
        "epochs": result.epochs_run,
        "tokens_per_second": result.tokens_per_second,
        "final_gap_max": final.get("gap_max"),
        "curriculum": curriculum,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(Path(cfg.out) / LAST),
    }


def run_experiment(
    out_dir: Path,
    minutes_per_model: float,
    seed: int,
    per_bucket: int = 100,
    threads: int | None = None,
    episodes: int | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Train the LSTM and the tanh RNN under one recipe and budget; write long_range.json and .png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = recipe(LONGRANGE, str(out_dir), seed=seed, max_minutes=minutes_per_model, progress=False)
    if threads is not None:
        base = replace(base, threads=threads)
    if base.threads is not None:
        torch.set_num_threads(base.threads)  # the final probes run outside train() too
    if episodes is not None:
        base = replace(base, episodes=episodes)
    models: dict[str, Any] = {}
    for name, factory in factories(base).items():
        cfg = replace(base, out=str(out_dir / name))
        if echo:
            print(f"training {name} for at most {minutes_per_model:g} min (seed {seed})")
        models[name] = _train_arm(name, cfg, factory, per_bucket, echo)
    report: dict[str, Any] = {
        "experiment": "long-range",
        "corpus": LONGRANGE,
        "seed": seed,
        "minutes_per_model": minutes_per_model,
        "torch_threads": torch.get_num_threads(),
        "per_bucket": per_bucket,
        "buckets": bucket_names(),
        "chance": CHANCE,
        "bar": {"accuracy": BAR_ACCURACY, "below_gap": BAR_GAP},
        "recipe": {k: v for k, v in asdict(base).items() if k not in ("out", "progress", "threads")},
        "models": models,
        "wall_seconds": time.monotonic() - started,
    }
    (out_dir / "long_range.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out_dir / "long_range.png")
    if echo:
        print(format_table(report))
    return report


def format_table(report: dict[str, Any]) -> str:
    """Accuracy by gap bucket for both models, as a Markdown table."""
    models = report["models"]
    lines = ["| filler gap (words) | " + " | ".join(name.upper() for name in models) + " |"]
    lines.append("|---|" + "---:|" * len(models))
    for bucket in report["buckets"]:
        cells = " | ".join(f"{100 * models[name]['accuracy'][bucket]:.0f} %" for name in models)
        lines.append(f"| {bucket} | {cells} |")
    rows: dict[str, Callable[[dict[str, Any]], str]] = {
        f"every bucket < {BAR_GAP} ≥ {100 * BAR_ACCURACY:.0f} %": lambda m: "yes" if m["passes_bar"] else "no",
        "largest gap reached by the curriculum": lambda m: str(m["final_gap_max"]),
        "training time (s)": lambda m: f"{m['train_seconds']:.0f}",
        "epochs": lambda m: str(m["epochs"]),
        "parameters": lambda m: f"{m['parameters']:,}",
    }
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(models[name]) for name in models) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy by gap bucket (left) and the curriculum's largest gap over training time (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    labels = {"lstm": "gated LSTM", "rnn": "vanilla tanh RNN"}
    fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    centres = [int(b.split("-")[0]) + BUCKET_WIDTH / 2 for b in report["buckets"]]
    for name, result in report["models"].items():
        values = [100 * result["accuracy"][b] for b in report["buckets"]]
        acc_ax.plot(centres, values, marker="o", label=labels.get(name, name))
        steps = result["curriculum"]
        if steps:
            seconds = [s["seconds"] for s in steps] + [result["train_seconds"]]
            gaps = [s["gap_max"] for s in steps] + [steps[-1]["gap_max"]]
            gap_ax.step(seconds, gaps, where="post", label=labels.get(name, name))
    acc_ax.axhline(100 * report["chance"], color="grey", linestyle=":", label="chance (1/16)")
    bar = report["bar"]
    acc_ax.axhline(
        100 * bar["accuracy"],
        color="green",
        linestyle="--",
        linewidth=0.8,
        label=f"bar: {100 * bar['accuracy']:.0f} % below {bar['below_gap']} words",
    )
    acc_ax.axvline(bar["below_gap"], color="green", linestyle="--", linewidth=0.8)
    acc_ax.set(xlabel="filler words between country and “i speak”", ylabel="accuracy of the language (%)")
    acc_ax.set(ylim=(0, 105), xlim=(0, MAX_GAP), xticks=range(0, MAX_GAP + 1, BUCKET_WIDTH))
    acc_ax.set_title(f"Remembering the country (seed {report['seed']}, {report['per_bucket']} episodes per bucket)")
    acc_ax.legend(loc="center right")  # the empty band between the two curves
    acc_ax.grid(alpha=0.3)
    gap_ax.set(xlabel="training time (s)", ylabel="largest gap in training (words)", ylim=(0, MAX_GAP + 5))
    gap_ax.set_title("Accuracy-driven gap curriculum")
    gap_ax.legend(loc="upper left")
    gap_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """`cellgate experiment long-range --out DIR --minutes N --seed S`."""
    parser = argparse.ArgumentParser(prog="cellgate experiment", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["long-range"], help="the experiment to run")
    parser.add_argument("--out", type=Path, default=Path("runs/long_range"), help="directory for runs, JSON and PNG")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per model, in minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's, 1)")
    parser.add_argument("--per-bucket", type=int, default=100, help="probe episodes per gap bucket")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per epoch (default: the recipe's)")
    args = parser.parse_args(argv)
    run_experiment(
        args.out, args.minutes, args.seed, per_bucket=args.per_bucket, threads=args.threads, episodes=args.episodes
    )
    return 0
