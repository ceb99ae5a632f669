"""Adapters for the peer optimizers that cannot be built from parameter groups alone.

The peers themselves are dependencies (``pip install -e ".[peers]"``), never copied here;
:mod:`memeff.optim.registry` builds most of them directly. Two need a thin wrapper:

- :class:`MuonWithAdamW`: torch's :class:`torch.optim.Muon` steps 2-D matrices only, so
  the ``matrix`` groups go to Muon and every other tensor to :class:`torch.optim.AdamW`.
- :class:`AdamMini`: Adam-mini (``adam_mini.Adam_mini``) picks each tensor's blocks from
  its parameter *name* and the model's width and head count, which parameter groups do
  not carry; it takes the ``model`` and maps nanoGPT's names onto Adam-mini's.

Both present their inner optimizers as one :class:`torch.optim.Optimizer`: one
``param_groups`` list and one ``state`` shared with the inner ones, so ``state_dict``,
``load_state_dict``, ``zero_grad`` and lr schedulers work as for any optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["AdamMini", "MuonWithAdamW"]


class _Combined(torch.optim.Optimizer):
    """Inner optimizers over disjoint parameter groups, stepped as one optimizer.

    The groups of ``param_groups`` are the inner optimizers' own group dicts, in the order
    given, and every inner optimizer's ``state`` is this optimizer's ``state``.
    """

    def __init__(self, groups: list[dict], inner: dict[str, torch.optim.Optimizer],
                 route: str):
        self._inner = inner
        self._route = route  # the group key naming the inner optimizer that steps a group
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        for key, optimizer in self._inner.items():
            optimizer.param_groups = [g for g in self.param_groups if g[self._route] == key]
            optimizer.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._inner.values():
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaces the group dicts and the state


def _as_groups(params) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    return [dict(g) for g in params] if isinstance(params[0], dict) else [{"params": params}]


class MuonWithAdamW(_Combined):
    r"""torch's Muon on 2-D ``matrix`` weights, torch's AdamW on every other parameter.

    A group with ``use_muon=True`` (the registry sets it on the 2-D tensors of the
    ``matrix`` groups) is stepped by :class:`torch.optim.Muon` (momentum, then the update
    orthogonalized by ``ns_steps`` Newton-Schulz iterations in bfloat16), every other group
    by :class:`torch.optim.AdamW`. State: Muon keeps
    ``momentum_buffer`` (one tensor like the param), AdamW ``step``, ``exp_avg``, ``exp_avg_sq``.

    Args:
        params: tensors, or groups (dicts) with ``use_muon`` (default: False; Muon takes
            2-D tensors only).
        lr: learning rate of both (default: 1e-3). With ``adjust_lr_fn="match_rms_adamw"``
            Muon scales it by ``0.2 * sqrt(max(n, m))`` so that its update has AdamW's RMS
            and one lr serves both (Liu et al., arXiv 2502.16982).
        weight_decay: decoupled, for both (default: 0.1).
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's (default: 0.95, True, 5,
            "match_rms_adamw"; torch's own default for ``adjust_lr_fn`` is "original").
        betas, eps: AdamW's (default: (0.9, 0.999), 1e-8).

    Note:
        The matrices a model gives Muon are its ``nn.Linear`` weights, the tied
        embedding/output weight included unless built with ``tied_weight_as_linear=False``
        (Muon's authors step embeddings and the output layer with AdamW).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str | None = "match_rms_adamw",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        groups = [{**group, "use_muon": bool(group.get("use_muon", False))}
                  for group in _as_groups(params)]
        inner = {}
        muon_groups = [g for g in groups if g["use_muon"]]
        adamw_groups = [g for g in groups if not g["use_muon"]]
        if muon_groups:
            inner[True] = torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay,
                                           momentum=momentum, nesterov=nesterov,
                                           ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        if adamw_groups:
            inner[False] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay)
        super().__init__(groups, inner, route="use_muon")


# nanoGPT's parameter names, added to Adam-mini's name lists
ADAM_MINI_NANOGPT_NAMES = {
    "wqk_names": ("c_attn",),  # fused q, k, v: one block per head (see AdamMini)
    "attn_proj_names": ("attn.c_proj",),  # attention output: one block per row
    "embd_names": ("wpe",),  # position embedding: one block per position, as for tokens
}


class AdamMini(_Combined):
    r"""Adam-mini (Zhang et al., arXiv 2406.16793; package ``adam-mini``) over a model's
    parameters, with nanoGPT's names mapped onto Adam-mini's.

    Adam-mini keeps a full first moment and one second-moment value per *block*, the mean of
    the squared gradient over the block. Its blocks, by parameter name: biases per element
    (Adam); queries and keys one per head; embeddings, output, values, attention output
    and MLP weights one per row; anything else (LayerNorm gains) one per tensor.

    nanoGPT's names are added to its lists (:data:`ADAM_MINI_NANOGPT_NAMES`): ``c_attn``
    (queries, keys and values fused in one weight) gets one block per head, so the value
    heads are blocks too, not rows as for a separate value weight; ``attn.c_proj`` one per
    row; ``wpe`` one per position. ``mlp`` and ``wte`` are names Adam-mini knows.

    Args:
        params: tensors or groups; a group's ``lr``, ``weight_decay``, ``eps`` and
            ``betas`` are kept for its tensors (Adam-mini itself sets weight decay by name).
        lr, betas, eps, weight_decay: as Adam (default: 1e-3, (0.9, 0.999), 1e-8, 0.0).
        model: the module holding the params, for their names and its ``config``'s
            ``n_embd``, ``n_head`` and ``n_kv_head`` (a :class:`memeff.GPTConfig`). Without
            it a tensor has no name: a 2-D tensor is one block per row, any other one block.

    Each group of ``param_groups`` holds one tensor (Adam-mini's layout), with ``block``
    (``"element"``, ``"head"``, ``"row"`` or ``"tensor"``) and ``head_numel`` for the
    state-byte formula.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *,
                 model: nn.Module | None = None):
        from adam_mini import Adam_mini

        groups = _as_groups(params)
        names = {}
        if model is not None:
            names = {id(p): name for name, p in model.named_parameters()}
            config = model.config
            heads = dict(dim=config.n_embd, n_heads=config.n_head, n_kv_heads=config.n_kv_head)
        else:
            heads = dict(dim=1, n_heads=1)  # no name is a query or key: heads are unused
        named = []
        for group in groups:
            for p in group["params"]:
                if id(p) not in names and model is not None:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is not one of "
                                     "the model's: pass the model whose parameters these are")
                name = names.get(id(p)) or ("matrix" if p.dim() == 2 else "block")
                named.append((f"{name}#{len(named)}", p))  # unique even without names
        inner = Adam_mini(named, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                          verbose=False, **heads)
        # Adam-mini takes every visible GPU for a rank; one process is a world of one
        inner.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if model is not None:
            for key, extra in ADAM_MINI_NANOGPT_NAMES.items():
                getattr(inner, key).update(extra)
        else:
            inner.mlp_names.add("matrix")  # Adam-mini's one-per-row rule
        group_of = {id(p): group for group in groups for p in group["params"]}
        for group in inner.param_groups:
            ours = group_of[id(group["params"][0])]
            group.update({k: ours[k] for k in ("lr", "weight_decay", "eps") if k in ours})
            if "betas" in ours:
                group["beta1"], group["beta2"] = ours["betas"]
            group["block"] = adam_mini_block(inner, group["name"])
            group["head_numel"] = inner.head_numel
            group["adam_mini"] = True
        super().__init__(inner.param_groups, {True: inner}, route="adam_mini")


def adam_mini_block(optimizer, name: str) -> str:
    """Which block a tensor is in, by Adam-mini's tests on its name in the order its step
    makes them: ``"element"``, ``"head"``, ``"row"`` or ``"tensor"``."""
    def named(*lists) -> bool:
        return any(key in name for names in lists for key in names)

    if named(optimizer.adam_block_names):
        return "element"
    if named(optimizer.wqk_names):
        return "head"
    if named(optimizer.embd_names, optimizer.output_names, optimizer.wv_names,
             optimizer.mlp_names, optimizer.attn_proj_names):
        return "row"
    return "tensor"
