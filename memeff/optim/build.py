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

Every optimizer is built through its spec in :mod:`memeff.optim.registry`, which says
what each group's kind means to it (``"adamw"`` and ``"torch_adafactor"`` treat the groups
alike apart from weight decay) and which settings it takes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memeff.optim.registry import GROUP_KINDS, spec


def param_groups(model: nn.Module, *,
                 tied_weight_as_linear: bool = True) -> dict[str, list[nn.Parameter]]:
    """The module docstring's three groups, by name, each parameter listed once."""
    linear, tied = linear_and_tied_weights(model)
    groups: dict[str, list[nn.Parameter]] = {kind: [] for kind in GROUP_KINDS}
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
                    weight_decay: float = 0.0, tied_weight_as_linear: bool = True,
                    group_hparams: dict | None = None, **settings) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters; see the module docstring.

    ``settings`` go to the optimizer's constructor (e.g. ``betas``, ``eps``,
    ``subset_size``, ``fused``; ``rank`` and ``gap`` of ``"adamsnsm"`` apply to the
    ``matrix`` group); a setting the optimizer does not take is a ValueError naming the
    ones it does. ``group_hparams`` maps group names to settings that override these in
    that group only.
    """
    optimizer_spec = spec(name)
    optimizer_spec.check_settings(settings)
    group_hparams = dict(group_hparams or {})
    unknown = sorted(set(group_hparams) - {*GROUP_KINDS, "tied"})
    if unknown:
        raise ValueError(f"unknown group name(s) {', '.join(unknown)} in group_hparams; "
                         f"choose from {', '.join(GROUP_KINDS)} and tied")
    for key, overrides in group_hparams.items():
        if not isinstance(overrides, dict) or "params" in overrides:
            raise ValueError(f"group_hparams[{key!r}] must be a dict of optimizer settings "
                             f"such as {{'lr': 3e-3}} (no 'params'), got {overrides!r}")
    named = param_groups(model, tied_weight_as_linear=tied_weight_as_linear)
    kind = {key: key for key in named}  # what a group is: tied keeps the kind it came from
    if "tied" in group_hparams:
        named, kind["tied"] = split_tied_weight(model, named)
    decay = {"matrix": weight_decay, "other_weights": weight_decay, "no_decay": 0.0}
    groups = [{"params": params, "kind": kind[key], "weight_decay": decay[kind[key]],
               **group_hparams.get(key, {})}
              for key, params in named.items() if params]
    return optimizer_spec.build(groups, model=model, lr=lr, **settings)


def build_optimizer_for_tensors(name: str, params, **settings) -> torch.optim.Optimizer:
    """Optimizer ``name`` over bare tensors, each treated as the weight the method is meant
    for (subset-norm, factoring, subspace momentum) whatever its shape."""
    return spec(name).build([{"params": list(params), "kind": "matrix"}], **settings)


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
