"""``build_optimizer(name, model, **hparams)``: one place that groups a model's parameters.

Grouping, as the AdamSN reference implementation (github.com/timmytonga/sn-sm) does it:

- ``matrix``: the weights of ``nn.Linear`` modules. AdamSN gives them subset-norm (and
  subspace momentum for ``"adamsnsm"``); our Adafactor factors their second moment.
- ``other_weights``: every other parameter with 2 or more dims (embedding tables such as
  GPT's position embedding). Per-element second moment (AdamW's, or Adafactor's
  unfactored one).
- ``no_decay``: parameters with fewer than 2 dims (biases, LayerNorm gains and shifts).
  Per-element, and no weight decay.

Weight decay applies to the first two groups only (2-D weights), as in nanoGPT.

A weight shared by an ``nn.Linear`` and an ``nn.Embedding`` (GPT's ``lm_head`` tied to
``transformer.wte``) is both; ``tied_weight_as_linear`` picks its group: True (the
default, what the reference does, since it selects every ``nn.Linear`` weight) puts it in
``matrix``, False in ``other_weights``. Tied weights are listed once.

``"adamw"`` (torch.optim.AdamW, in its ``fused=True`` form unless ``foreach`` or
``fused`` is passed: torch's fastest on CPU and CUDA, which nanoGPT picks where it can)
and ``"torch_adafactor"`` (torch.optim.Adafactor, which factors every tensor of 2+ dims
and has no per-group switch) use the same groups, which only differ for them in weight
decay. The ``betas`` argument is used by the Adam family;
the Adafactors ignore it (their second-moment decay follows ``1 - t^-0.8``; pass
``beta1=...`` for our Adafactor's optional first moment).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memeff.optim.adafactor import Adafactor
from memeff.optim.adamsn import AdamSN

OPTIMIZER_NAMES = ("adamw", "adamsn", "adamsnsm", "adafactor", "torch_adafactor")

SUBSPACE_RANK = 128  # the defaults for "adamsnsm": rank and projector refresh gap
SUBSPACE_GAP = 200


def param_groups(model: nn.Module, weight_decay: float, *,
                 tied_weight_as_linear: bool = True) -> dict[str, list[nn.Parameter]]:
    """The module docstring's three groups, by name, each parameter listed once."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "other_weights": [], "no_decay": []}
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        key = id(p)
        if p.dim() < 2:
            groups["no_decay"].append(p)
        elif key in linear and (tied_weight_as_linear or key not in embedding):
            groups["matrix"].append(p)
        else:
            groups["other_weights"].append(p)
    return groups


def build_optimizer(name: str, model: nn.Module, *, lr: float = 1e-3,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    tied_weight_as_linear: bool = True, **hparams) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters; see the module docstring.

    ``hparams`` go to the optimizer's constructor (e.g. ``eps``, ``subset_size``,
    ``chunk_size``, ``fused``); for ``"adamsnsm"``, ``rank`` (default 128) and ``gap``
    (default 200) apply to the ``matrix`` group.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    named = param_groups(model, weight_decay, tied_weight_as_linear=tied_weight_as_linear)
    decay = {"matrix": weight_decay, "other_weights": weight_decay, "no_decay": 0.0}
    groups = [{"params": params, "weight_decay": decay[key]} for key, params in named.items() if params]
    if name == "adamw":
        if "foreach" not in hparams:  # torch's fused kernel unless a form is asked for
            hparams.setdefault("fused", True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **hparams)
    if name == "torch_adafactor":
        return torch.optim.Adafactor(groups, lr=lr, **hparams)
    keys = [key for key, params in named.items() if params]
    if name == "adafactor":
        for key, group in zip(keys, groups):
            group["factored"] = key == "matrix"
        return Adafactor(groups, lr=lr, **hparams)
    if name == "adamsnsm":
        rank = hparams.pop("rank", SUBSPACE_RANK)
        gap = hparams.pop("gap", SUBSPACE_GAP)
    for key, group in zip(keys, groups):
        group["subset_norm"] = key == "matrix"
        if name == "adamsnsm" and key == "matrix":
            group.update(rank=rank, gap=gap)
    return AdamSN(groups, lr=lr, betas=betas, **hparams)
