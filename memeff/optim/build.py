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

``group_hparams`` overrides optimizer settings per group, by the names above, for
ablations: ``{"no_decay": {"lr": 3e-3}}`` steps the LayerNorm gains at their own lr. The
name ``"tied"`` moves the tied weight into a group of its own, with the settings of the
group it leaves and then these: ``{"tied": {"subset_size": 128}}`` gives AdamSN one
subset per row of a (vocab, 128) table, i.e. one per token. A group's ``lr`` is its peak:
``memeff.train``'s schedule scales every group's lr by the same factor.

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


GROUP_NAMES = ("matrix", "other_weights", "no_decay")


def param_groups(model: nn.Module, weight_decay: float, *,
                 tied_weight_as_linear: bool = True) -> dict[str, list[nn.Parameter]]:
    """The module docstring's three groups, by name, each parameter listed once."""
    linear, tied = linear_and_tied_weights(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        key = id(p)
        if p.dim() < 2:
            groups["no_decay"].append(p)
        elif key in linear and (tied_weight_as_linear or key not in tied):
            groups["matrix"].append(p)
        else:
            groups["other_weights"].append(p)
    return groups


def linear_and_tied_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """``id``s of the ``nn.Linear`` weights, and of those also an ``nn.Embedding``'s."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return linear, linear & embedding


def build_optimizer(name: str, model: nn.Module, *, lr: float = 1e-3,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    tied_weight_as_linear: bool = True, group_hparams: dict | None = None,
                    **hparams) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters; see the module docstring.

    ``hparams`` go to the optimizer's constructor (e.g. ``eps``, ``subset_size``,
    ``chunk_size``, ``fused``); for ``"adamsnsm"``, ``rank`` (default 128) and ``gap``
    (default 200) apply to the ``matrix`` group. ``group_hparams`` maps group names to
    settings that override these in that group only.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    group_hparams = dict(group_hparams or {})
    unknown = sorted(set(group_hparams) - {*GROUP_NAMES, "tied"})
    if unknown:
        raise ValueError(f"unknown group name(s) {', '.join(unknown)} in group_hparams; "
                         f"choose from {', '.join(GROUP_NAMES)} and tied")
    for key, settings in group_hparams.items():
        if not isinstance(settings, dict) or "params" in settings:
            raise ValueError(f"group_hparams[{key!r}] must be a dict of optimizer settings "
                             f"such as {{'lr': 3e-3}} (no 'params'), got {settings!r}")
    named = param_groups(model, weight_decay, tied_weight_as_linear=tied_weight_as_linear)
    kind = {key: key for key in named}  # what a group is: tied keeps the kind it came from
    if "tied" in group_hparams:
        named, kind["tied"] = split_tied_weight(model, named)
    decay = {"matrix": weight_decay, "other_weights": weight_decay, "no_decay": 0.0}
    named = {key: params for key, params in named.items() if params}
    groups = [{"params": params, "weight_decay": decay[kind[key]]} for key, params in named.items()]
    keys = [kind[key] for key in named]
    if name == "adamw":
        if "foreach" not in hparams:  # torch's fused kernel unless a form is asked for
            hparams.setdefault("fused", True)
        optimizer_class, hparams = torch.optim.AdamW, dict(betas=betas, **hparams)
    elif name == "torch_adafactor":
        optimizer_class = torch.optim.Adafactor
    elif name == "adafactor":
        for key, group in zip(keys, groups):
            group["factored"] = key == "matrix"
        optimizer_class = Adafactor
    else:
        if name == "adamsnsm":
            rank = hparams.pop("rank", SUBSPACE_RANK)
            gap = hparams.pop("gap", SUBSPACE_GAP)
        for key, group in zip(keys, groups):
            group["subset_norm"] = key == "matrix"
            if name == "adamsnsm" and key == "matrix":
                group.update(rank=rank, gap=gap)
        optimizer_class, hparams = AdamSN, dict(betas=betas, **hparams)
    for key, group in zip(named, groups):
        group.update(group_hparams.get(key, {}))
    return optimizer_class(groups, lr=lr, **hparams)


def split_tied_weight(model: nn.Module, named: dict[str, list[nn.Parameter]]):
    """``named`` with the tied weights moved to a group ``"tied"``, and the group they left
    (one: ``param_groups`` puts every tied weight in the same group)."""
    _, tied = linear_and_tied_weights(model)
    left = next((key for key, params in named.items() if any(id(p) in tied for p in params)), None)
    if left is None:
        raise ValueError("group_hparams names a 'tied' group, but the model has no trainable "
                         "weight shared by an nn.Linear and an nn.Embedding")
    moved = [p for p in named[left] if id(p) in tied]
    named = {key: [p for p in params if id(p) not in tied] for key, params in named.items()}
    return {**named, "tied": moved}, left
