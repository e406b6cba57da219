"""Training configurations for tests: models small enough that an epoch takes a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.corpus import LONGRANGE
from model.train import TrainConfig


def tiny_train_config(out: Path, **overrides: Any) -> TrainConfig:
    """A small 2-layer LSTM on builtin:longrange lines, AdamW without a schedule, no progress bar.

    Each test overrides what it is about (corpus, mode, sizes, the lever under test).
    """
    base: dict[str, Any] = {
        "corpus": LONGRANGE,
        "out": str(out),
        "mode": "lines",
        "embed_size": 24,
        "hidden_size": 24,
        "num_layers": 2,
        "dropout": 0.0,
        "optimizer": "adamw",
        "lr": 1e-2,
        "clip": 1.0,
        "schedule": "none",
        "epochs": 3,
        "patience": 10,
        "progress": False,
    }
    return TrainConfig(**{**base, **overrides})
