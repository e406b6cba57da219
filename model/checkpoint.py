"""Self-describing checkpoints: config + vocabulary + weights + metrics + seed in one file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import LSTMConfig
from model.lm import LSTMLanguageModel
from vocab import Vocabulary

CHECKPOINT_FORMAT = 1
BEST = "best.pt"
LAST = "last.pt"


@dataclass
class Checkpoint:
    config: LSTMConfig
    vocab: Vocabulary
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    epoch: int = 0
    # Only in last.pt: what --resume needs to continue exactly.
    resume_state: dict[str, Any] | None = None

    def build_model(self) -> LSTMLanguageModel:
        model = LSTMLanguageModel(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write atomically, so an interrupted save never leaves a torn checkpoint behind."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": ckpt.config.to_dict(),
        "vocab": ckpt.vocab.to_dict(),
        "state_dict": ckpt.state_dict,
        "metrics": ckpt.metrics,
        "train_config": ckpt.train_config,
        "seed": ckpt.seed,
        "epoch": ckpt.epoch,
        "resume_state": ckpt.resume_state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a training directory (its best checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path} holds no {BEST} or {LAST}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = resolve_checkpoint(path)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cellgate checkpoint of format {CHECKPOINT_FORMAT}")
    return Checkpoint(
        config=LSTMConfig.from_dict(payload["config"]),
        vocab=Vocabulary.from_dict(payload["vocab"]),
        state_dict=payload["state_dict"],
        metrics=payload.get("metrics", {}),
        train_config=payload.get("train_config", {}),
        seed=payload.get("seed", 0),
        epoch=payload.get("epoch", 0),
        resume_state=payload.get("resume_state"),
    )
