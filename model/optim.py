"""Optimisation: the optimizer a recipe names, the budget schedule's learning rate, and gradient clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from model.recipe import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW at cfg.lr, without weight decay (torch's AdamW defaults to 0.01; no recipe uses any)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)


def budget_lr(cfg: TrainConfig, progress: float) -> float:
    """The "budget" schedule at `progress` in [0, 1]: straight down from cfg.lr to zero."""
    return cfg.lr * max(0.0, 1.0 - progress)


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
