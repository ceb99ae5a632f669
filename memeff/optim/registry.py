"""Every optimizer the project measures, by name: the one place names are listed.

An :class:`OptimizerSpec` says how to build the optimizer over parameter groups whose
*kind* is known (``"matrix"``: ``nn.Linear`` weights; ``"other_weights"``: other tensors of
2+ dims; ``"no_decay"``: 1-D tensors; see :mod:`memeff.optim.build`), how to label it in
tables, which settings it takes, the settings tuned for nanoGPT's baby config, and the
analytic bytes of its state. To add an optimizer, add one spec to :data:`SPECS`.

Settings a spec's optimizer does not take are an error that lists the ones it does.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

GROUP_KINDS = ("matrix", "other_weights", "no_decay")
# settings build_optimizer itself takes, whatever the optimizer
BUILD_SETTINGS = ("lr", "weight_decay", "tied_weight_as_linear", "group_hparams")


def _class(path: str) -> Callable[[], type]:
    """The class at ``module.Name``, imported on first use (a peer's package may be missing)."""
    module, name = path.rsplit(".", 1)
    return lambda: getattr(importlib.import_module(module), name)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _torch_step_bytes() -> int:
    """torch's optimizers keep ``step`` as a scalar of the default dtype."""
    return 8 if torch.get_default_dtype() == torch.float64 else 4


STEP_BYTES = 4  # memeff's optimizers keep ``step`` as a float32 scalar


# ---- analytic state bytes, one function per layout: (group, param) -> bytes -------------
# Per process: for a parameter sharded on dim 0 (FSDP2), the state this rank holds, i.e.
# its rows of the state that follows the param's rows, plus what every rank holds whole.

def _local_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` this rank holds."""
    from memeff.optim.sharding import local

    return local(p).numel()


def adamw_state_bytes(group: dict, p: torch.Tensor) -> int:
    """``step`` + ``exp_avg`` + ``exp_avg_sq`` (+ ``max_exp_avg_sq`` with amsgrad)."""
    moments = 3 if group.get("amsgrad") else 2
    return _torch_step_bytes() + moments * _local_numel(p) * _itemsize(p.dtype)


def adamsn_state_bytes(group: dict, p: torch.Tensor) -> int:
    """``step`` + first moment (full, or rank-r momentum and projector) + one second-moment
    value per subset (see :class:`memeff.optim.AdamSN`)."""
    from memeff.optim.adamsn import subset_layout
    from memeff.optim.sharding import local_rows

    numel, local_numel = p.numel(), _local_numel(p)
    n = p.shape[0] if p.dim() >= 1 else 1
    if group["rank"] is not None and p.dim() >= 2 and numel:
        m = numel // n
        r = min(group["rank"], n, m)
        # (n, r) momentum + (r, m) projector, or (r, m) + (n, r): the n side is sharded
        first_moment = local_rows(p) * r + r * m
    else:
        first_moment = local_numel
    layout = subset_layout(p.shape, group["subset_size"], group["subset_norm"])
    if layout is None:
        subsets = local_numel
    elif layout[2]:  # one per column, held whole
        subsets = layout[1]
    else:  # subsets of layout[1] elements within the rows this rank holds
        subsets = local_numel // layout[1]
    return STEP_BYTES + (first_moment + subsets) * _itemsize(p.dtype)


def adafactor_state_bytes(group: dict, p: torch.Tensor) -> int:
    """``step`` + row and column statistics of each (n, m) matrix (or a per-element one),
    in the statistics dtype, + ``exp_avg`` with ``beta1`` (see :class:`memeff.optim.Adafactor`)."""
    from memeff.optim.adafactor import statistics_dtype
    from memeff.optim.sharding import local_rows

    numel, local_numel = p.numel(), _local_numel(p)
    stat = _itemsize(statistics_dtype(p.dtype))
    if group["factored"] and p.dim() >= 2 and numel:
        rows, cols = numel // p.shape[-1], numel // p.shape[-2]
        # a 2-D weight's column statistic spans dim 0: every rank holds it whole
        local_cols = cols if p.dim() == 2 else cols // p.shape[0] * local_rows(p)
        second = (rows // p.shape[0] * local_rows(p) + local_cols) * stat
    else:
        second = local_numel * stat
    first = local_numel * _itemsize(p.dtype) if group["beta1"] is not None else 0
    return STEP_BYTES + second + first


def torch_adafactor_state_bytes(group: dict, p: torch.Tensor) -> int:
    """``step`` + ``row_var`` and ``col_var`` for tensors of 2+ dims, else ``variance``."""
    numel = p.numel()
    if p.dim() > 1:
        stats = numel // p.shape[-1] + numel // p.shape[-2] if numel else 0
    else:
        stats = numel
    return _torch_step_bytes() + stats * _itemsize(p.dtype)


# ---- specs ---------------------------------------------------------------------------

def _on_matrices(setting: str) -> Callable[[str], dict]:
    """``setting`` True for the ``matrix`` groups and False for the others."""
    return lambda kind: {setting: kind == "matrix"}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str  # in tables and figures
    family: str  # "adam" (per-element moments), "subset-norm", "factored"
    optimizer_class: Callable[[], type[torch.optim.Optimizer]]
    state_bytes: Callable[[dict, torch.Tensor], int]  # analytic bytes of one param's state
    # settings this name passes unless the caller passes one of ``defaults_yield_to``
    defaults: Mapping[str, Any] = field(default_factory=dict)
    defaults_yield_to: tuple[str, ...] = ()
    # settings each group gets from its kind; the caller sets them per group only
    by_kind: Callable[[str], dict] | None = None
    # settings that apply to the matrix groups only, with their defaults
    matrix_settings: Mapping[str, Any] = field(default_factory=dict)
    refused: tuple[str, ...] = ()  # constructor arguments this name does not expose
    exclusive: tuple[tuple[str, str], ...] = ()  # pairs of settings that cannot both be true
    # nanoGPT's baby config, tuned by the lr sweep: TrainConfig fields
    tuned: Mapping[str, Any] = field(default_factory=dict)
    trained: bool = True  # False: a second form of another optimizer, timed only

    def settings(self) -> tuple[str, ...]:
        """The settings this optimizer takes (keyword arguments of build_optimizer)."""
        constructor = inspect.signature(self.optimizer_class().__init__).parameters
        controlled = set(self.by_kind("matrix")) if self.by_kind else set()
        taken = [k for k in constructor if k not in ("self", "params", *controlled, *self.refused)
                 and constructor[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                 inspect.Parameter.VAR_KEYWORD)]
        return tuple(dict.fromkeys([*BUILD_SETTINGS, *taken]))

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        unknown = sorted(set(settings) - set(self.settings()))
        if unknown:
            raise ValueError(f"{self.name} does not take {', '.join(unknown)}; its settings are "
                             f"{', '.join(self.settings())}")
        for a, b in self.exclusive:
            if settings.get(a) and settings.get(b):
                raise ValueError(f"{self.name} takes {a}=True or {b}=True, not both; "
                                 f"drop one of them")

    def build(self, groups: list[dict], **settings) -> torch.optim.Optimizer:
        """The optimizer over ``groups``, dicts with ``params``, a ``kind`` from
        :data:`GROUP_KINDS` and any per-group settings (which win over ``settings``)."""
        self.check_settings(settings)
        settings = dict(settings)
        if not any(k in settings for k in self.defaults_yield_to):
            settings = {**self.defaults, **settings}
        matrix = {k: settings.pop(k, v) for k, v in self.matrix_settings.items()}
        per_group_settings = {*self.settings(), *(self.by_kind("matrix") if self.by_kind else ())}
        built = []
        for group in groups:
            group = dict(group)
            unknown = sorted(set(group) - per_group_settings - {"params", "kind"})
            if unknown:
                raise ValueError(f"{self.name} does not take {', '.join(unknown)} in a parameter "
                                 f"group; its settings are {', '.join(sorted(per_group_settings))}")
            kind = group.pop("kind")
            per_group = {**(self.by_kind(kind) if self.by_kind else {}),
                         **(matrix if kind == "matrix" else {})}
            built.append({**per_group, **group})
        return self.optimizer_class()(built, **settings)


SUBSPACE_RANK = 128  # AdamSN+SM's default rank and projector refresh gap
SUBSPACE_GAP = 200

SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec("adamw", "AdamW (torch, fused)", "adam", _class("torch.optim.AdamW"),
                  adamw_state_bytes, defaults={"fused": True},
                  defaults_yield_to=("fused", "foreach"), exclusive=(("fused", "foreach"),),
                  tuned={"learning_rate": 3e-3, "weight_decay": 0.1}),
    OptimizerSpec("adamsn", "AdamSN", "subset-norm", _class("memeff.optim.adamsn.AdamSN"),
                  adamsn_state_bytes, by_kind=_on_matrices("subset_norm"),
                  refused=("rank", "gap"),
                  tuned={"learning_rate": 4e-2, "weight_decay": 0.01}),
    # rank 32 on the baby config: the default 128 is full rank for its 128-wide weights
    OptimizerSpec("adamsnsm", "AdamSN+SM", "subset-norm", _class("memeff.optim.adamsn.AdamSN"),
                  adamsn_state_bytes, by_kind=_on_matrices("subset_norm"),
                  matrix_settings={"rank": SUBSPACE_RANK, "gap": SUBSPACE_GAP},
                  tuned={"learning_rate": 4e-2, "weight_decay": 0.0,
                         "optimizer_hparams": {"rank": 32}}),
    OptimizerSpec("adafactor", "Adafactor (ours)", "factored",
                  _class("memeff.optim.adafactor.Adafactor"), adafactor_state_bytes,
                  by_kind=_on_matrices("factored"),
                  tuned={"learning_rate": 6e-2, "weight_decay": 0.0}),
    OptimizerSpec("torch_adafactor", "Adafactor (torch)", "factored",
                  _class("torch.optim.Adafactor"), torch_adafactor_state_bytes,
                  tuned={"learning_rate": 6e-2, "weight_decay": 0.0}),
    OptimizerSpec("adamw_foreach", "AdamW (torch, foreach)", "adam", _class("torch.optim.AdamW"),
                  adamw_state_bytes, defaults={"foreach": True},
                  defaults_yield_to=("fused", "foreach"), exclusive=(("fused", "foreach"),),
                  trained=False),
    OptimizerSpec("torch_adafactor_foreach", "Adafactor (torch, foreach)", "factored",
                  _class("torch.optim.Adafactor"), torch_adafactor_state_bytes,
                  defaults={"foreach": True}, defaults_yield_to=("foreach",), trained=False),
)
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in SPECS}
OPTIMIZER_NAMES = tuple(spec.name for spec in SPECS if spec.trained)  # what training compares
BASELINE = "adamw"  # what every ratio is taken against


def spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name is a ValueError listing the choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(REGISTRY)}") from None


def label(name: str) -> str:
    return spec(name).label


def state_formula(optimizer: torch.optim.Optimizer) -> Callable[[dict, torch.Tensor], int]:
    """The analytic state-byte formula of ``optimizer``'s class, from the registry."""
    for s in SPECS:
        try:
            cls = s.optimizer_class()
        except ImportError:
            continue
        if type(optimizer) is cls:
            return s.state_bytes
    raise TypeError(f"no optimizer in memeff.optim.registry is a {type(optimizer).__name__}")
