"""Training configurations for tests: models small enough that an epoch takes a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.corpus import LONGRANGE
from model.recipe import TrainConfig

# What the tests' runs leave out of the text recipe: its levers are tested one at a time, on request.
PLAIN: dict[str, Any] = {
    "dropout": 0.0,
    "embed_dropout": 0.0,
    "recurrent_dropout": 0.0,
    "optimizer": "adamw",
    "lr": 1e-2,
    "clip": 1.0,
    "schedule": "none",
    "precision": "fp32",
    "softmax": "full",
    "rare_word_unk": 0.0,
    "calibrate": False,
    "validate_from": 0.0,
    "max_minutes": None,
    "progress": False,
}


def tiny_train_config(out: Path, **overrides: Any) -> TrainConfig:
    """A small 2-layer LSTM on builtin:longrange lines, AdamW without a schedule, no progress bar.

    Each test overrides what it is about (corpus, mode, sizes, the lever under test).
    """
    base: dict[str, Any] = {
        **PLAIN,
        "corpus": LONGRANGE,
        "out": str(out),
        "mode": "lines",
        "lowercase": True,
        "split": "words",
        "hidden_size": 24,
        "num_layers": 2,
        "epochs": 3,
    }
    return TrainConfig(**{**base, **overrides})


def tiny_stream_config(corpus: Path, out: Path, **overrides: Any) -> TrainConfig:
    """A text file as one stream, with dropout, a fixed seed and one thread."""
    stream = {"corpus": str(corpus), "mode": "stream", "dropout": 0.1, "lr": 3e-2, "batch_size": 8, "bptt": 16}
    return tiny_train_config(out, **{**stream, "seed": 7, "threads": 1, **overrides})
