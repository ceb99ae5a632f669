"""``build_optimizer(name, model, **hparams)``: one place that groups a model's parameters.

Grouping (nanoGPT's): weight decay applies to parameters with 2 or more dimensions
(Linear and embedding weights) and not to biases or LayerNorm parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

OPTIMIZER_NAMES = ("adamw",)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(name: str, model: nn.Module, *, lr: float = 1e-3,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    **hparams) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters; see the module docstring."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    groups = _decay_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **hparams)
