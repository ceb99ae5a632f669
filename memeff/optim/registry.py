"""Every optimizer the project measures, by name: the one place names are listed.

An :class:`OptimizerSpec` says how to build the optimizer over parameter groups whose
*kind* is known (``"matrix"``: ``nn.Linear`` weights; ``"other_weights"``: other tensors of
2+ dims; ``"no_decay"``: 1-D tensors; see :mod:`memeff.optim.build`), how to label it in
tables, which settings it takes, the settings tuned for nanoGPT's baby config, and the
analytic bytes of its state. To add an optimizer, add one spec to :data:`SPECS`.

Settings a spec's optimizer does not take are an error that lists the ones it does.

Peers (optimizers from other packages: 8-bit AdamW, Adam-mini, GaLore, APOLLO, Muon, Lion,
AdamWSN) name their package in ``package``; they install with ``pip install -e ".[peers]"``
and, while missing, cost nothing until built: :func:`missing_package` gives the install
hint (or None), and building one raises :class:`MissingPackageError` (an ImportError and a
ValueError) with it. Their formulas follow what
each package really keeps, as of the versions the ``peers`` extra requires.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
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
PEERS_INSTALL = 'pip install -e ".[peers]"'


class MissingPackageError(ImportError, ValueError):
    """A peer optimizer's package does not import; the message says what to install. A
    ValueError too, so that a CLI reports it as bad input (one line, exit code 2)."""


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


# ---- analytic state bytes of the peers ---------------------------------------------------
# A Python number in the state (``step`` of most peers) holds no tensor bytes.

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes: smaller tensors keep float32 moments
BNB_BLOCK_SIZE = 256  # bitsandbytes' 8-bit optimizers, on every device
BNB_QMAP_ENTRIES = 256
TORCHAO_MIN_QUANTIZED_SIZE = 4096  # torchao quantizes tensors this large, in whole blocks


def bnb_adamw8bit_state_bytes(group: dict, p: torch.Tensor) -> int:
    """bitsandbytes' AdamW8bit: a tensor of fewer than 4096 elements keeps two float32
    moments; a larger one two uint8 moments and, per moment, one float32 absmax per block of
    256 elements (the last block partial). The two 256-entry quantization maps are shared by
    all tensors (:func:`bnb_shared_state_bytes`)."""
    n = p.numel()
    if n < BNB_MIN_8BIT_SIZE:
        return 2 * n * 4
    return 2 * (n + math.ceil(n / BNB_BLOCK_SIZE) * 4)


def bnb_shared_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The signed and unsigned quantization maps (256 float32 each), one pair per optimizer,
    held once any of its tensors is quantized."""
    quantized = any(p.numel() >= BNB_MIN_8BIT_SIZE
                    for group in optimizer.param_groups for p in group["params"])
    return 2 * BNB_QMAP_ENTRIES * 4 if quantized else 0


def _torchao_state_bytes(bits: int, block_size: int, qmap_entries: int):
    def state_bytes(group: dict, p: torch.Tensor) -> int:
        """torchao's low-bit AdamW: ``step`` (a scalar tensor) + ``exp_avg``, ``exp_avg_sq``
        (+ ``max_exp_avg_sq`` with amsgrad). A moment of a tensor of 4096+ elements that
        whole blocks cover is quantized: codes of ``bits`` per element, one float32 scale per
        block and its own float32 quantization map; any other tensor's is like the param."""
        n = _local_numel(p)
        moments = 3 if group.get("amsgrad") else 2
        if n >= TORCHAO_MIN_QUANTIZED_SIZE and n % block_size == 0:
            moment = n * bits // 8 + n // block_size * 4 + qmap_entries * 4
        else:
            moment = n * _itemsize(p.dtype)
        return _torch_step_bytes() + moments * moment
    return state_bytes


torchao_adamw8bit_state_bytes = _torchao_state_bytes(bits=8, block_size=256, qmap_entries=256)
torchao_adamw4bit_state_bytes = _torchao_state_bytes(bits=4, block_size=128, qmap_entries=16)


def adam_mini_state_bytes(group: dict, p: torch.Tensor) -> int:
    """Adam-mini: a full first moment ``m`` + one second-moment value per block (``vmean``):
    per element, per head, per row or one per tensor (see :class:`memeff.optim.peers.AdamMini`)."""
    n = p.numel()
    blocks = {"element": n, "head": n // group["head_numel"] if n else 0,
              "row": p.shape[0] if p.dim() else 1, "tensor": 1}[group["block"]]
    return (n + blocks) * _itemsize(p.dtype)


def galore_state_bytes(group: dict, p: torch.Tensor) -> int:
    """GaLore's AdamW: a group with ``rank`` projects each (n, m) gradient onto rank
    r = min(rank, k), k = min(n, m), from its SVD ("std": the shorter side), and keeps
    ``exp_avg``, ``exp_avg_sq`` of the projected (r, max(n, m)) gradient and the projector.
    The projector of a float32 param is a slice of the (k, k) SVD factor, which it keeps
    whole; of another dtype, an (r, k) copy in that dtype. Other groups: AdamW's moments."""
    size = _itemsize(p.dtype)
    if "rank" not in group:
        return 2 * p.numel() * size
    n, m = p.shape
    k = min(n, m)
    r = min(group["rank"], k)
    projector = k * k * 4 if p.dtype == torch.float32 else r * k * size
    return 2 * r * max(n, m) * size + projector


def apollo_state_bytes(group: dict, p: torch.Tensor) -> int:
    """APOLLO's AdamW: a group with ``rank`` keeps ``exp_avg``, ``exp_avg_sq`` of the gradient
    projected by a random (rank, k) matrix, k = min(n, m) (kept, in the param's dtype),
    i.e. (rank, max(n, m)) each, and ``scaled_grad``, the last scaled gradient's norm (a
    scalar). Other groups: AdamW's moments."""
    size = _itemsize(p.dtype)
    if "rank" not in group:
        return 2 * p.numel() * size
    n, m = p.shape
    rank = group["rank"]
    return 2 * rank * max(n, m) * size + rank * min(n, m) * size + size


def muon_with_adamw_state_bytes(group: dict, p: torch.Tensor) -> int:
    """Muon's ``momentum_buffer`` for a matrix it steps (like the param: under FSDP2 this
    rank's rows); AdamW's state for the rest."""
    if group["use_muon"]:
        return _local_numel(p) * _itemsize(p.dtype)
    return adamw_state_bytes(group, p)


def lion_state_bytes(group: dict, p: torch.Tensor) -> int:
    """Lion: ``exp_avg`` only (like the param: under FSDP2 this rank's rows)."""
    return _local_numel(p) * _itemsize(p.dtype)


def adamwsn_state_bytes(group: dict, p: torch.Tensor) -> int:
    """pytorch-optimizer's AdamWSN: ``exp_avg`` + in a group with ``sn``, one second-moment
    value per subset of the flattened tensor (subsets of the largest divisor of its numel
    at most ``subset_size``, or at most sqrt(numel) / |subset_size| when that is negative),
    else one per element. ``step`` is the group's, a Python int."""
    from memeff.optim._common import largest_divisor_at_most

    n = p.numel()
    if group.get("sn"):
        k = group["subset_size"]
        k = k if k > 0 else int(math.sqrt(n) / abs(k))
        second = n // largest_divisor_at_most(n, k)
    else:
        second = n
    return (n + second) * _itemsize(p.dtype)


# ---- specs ---------------------------------------------------------------------------

def _on_matrices(setting: str) -> Callable[[str], dict]:
    """``setting`` True for the ``matrix`` groups and False for the others."""
    return lambda kind: {setting: kind == "matrix"}


def _on_matrices_only(settings: dict) -> Callable[[str], dict]:
    """``settings`` for the ``matrix`` groups, none for the others (whose params a peer
    then steps as plain AdamW)."""
    return lambda kind: dict(settings) if kind == "matrix" else {}


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
    # True: the matrix settings reach 2-D tensors only; a matrix group's other tensors are
    # built as other_weights (a peer that projects or orthogonalizes matrices only)
    matrices_only: bool = False
    refused: tuple[str, ...] = ()  # constructor arguments this name does not expose
    exclusive: tuple[tuple[str, str], ...] = ()  # pairs of settings that cannot both be true
    # nanoGPT's baby config, tuned by the lr sweep: TrainConfig fields
    tuned: Mapping[str, Any] = field(default_factory=dict)
    trained: bool = True  # False: a second form of another optimizer, timed only
    # a peer's distribution on the package index (its module: "-" read as "_"); "torch" for
    # torch's Muon; None for ours and the original baselines
    package: str | None = None
    takes_model: bool = False  # the optimizer takes the model (names, config): build(model=...)
    # bytes the optimizer holds once whatever its params (e.g. shared quantization maps)
    shared_state_bytes: Callable[[torch.optim.Optimizer], int] | None = None
    # the package's classes whose objects its state holds (GaLore's and APOLLO's projectors):
    # a checkpoint loads them, with tensors and plain values, and nothing else
    checkpoint_classes: tuple[str, ...] = ()

    def missing_package(self) -> str | None:
        """What to install when this optimizer's package does not import, else None."""
        if self.package is None:
            return None
        try:
            importlib.import_module(self.package.replace("-", "_"))
        except ImportError as error:
            return (f"{self.name} needs the {self.package} package ({error}); install the "
                    f"peer optimizers with {PEERS_INSTALL}")
        return None

    def load_class(self) -> type[torch.optim.Optimizer]:
        """The optimizer's class; :class:`MissingPackageError` with the install hint when its
        package is missing."""
        hint = self.missing_package()
        if hint is not None:
            raise MissingPackageError(hint)
        return self.optimizer_class()

    def settings(self) -> tuple[str, ...]:
        """The settings this optimizer takes (keyword arguments of build_optimizer)."""
        constructor = inspect.signature(self.load_class().__init__).parameters
        controlled = set(self.by_kind("matrix")) if self.by_kind else set()
        passed_by_build = ("model",) if self.takes_model else ()
        taken = [k for k in constructor
                 if k not in ("self", "params", *controlled, *self.refused, *passed_by_build)
                 and constructor[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                 inspect.Parameter.VAR_KEYWORD)]
        return tuple(dict.fromkeys([*BUILD_SETTINGS, *taken, *self.matrix_settings]))

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        unknown = sorted(set(settings) - set(self.settings()))
        if unknown:
            raise ValueError(f"{self.name} does not take {', '.join(unknown)}; its settings are "
                             f"{', '.join(self.settings())}")
        for a, b in self.exclusive:
            if settings.get(a) and settings.get(b):
                raise ValueError(f"{self.name} takes {a}=True or {b}=True, not both; "
                                 f"drop one of them")

    def build(self, groups: list[dict], model: torch.nn.Module | None = None,
              **settings) -> torch.optim.Optimizer:
        """The optimizer over ``groups``, dicts with ``params``, a ``kind`` from
        :data:`GROUP_KINDS` and any per-group settings (which win over ``settings``).
        ``model`` (the module holding the params) goes to an optimizer that takes it."""
        self.check_settings(settings)
        settings = dict(settings)
        if not any(k in settings for k in self.defaults_yield_to):
            settings = {**self.defaults, **settings}
        matrix = {k: settings.pop(k, v) for k, v in self.matrix_settings.items()}
        per_group_settings = {*self.settings(), *(self.by_kind("matrix") if self.by_kind else ())}
        built = []
        for group in (part for g in groups for part in self._split_matrices(g)):
            group = dict(group)
            unknown = sorted(set(group) - per_group_settings - {"params", "kind"})
            if unknown:
                raise ValueError(f"{self.name} does not take {', '.join(unknown)} in a parameter "
                                 f"group; its settings are {', '.join(sorted(per_group_settings))}")
            kind = group.pop("kind")
            per_group = {**(self.by_kind(kind) if self.by_kind else {}),
                         **(matrix if kind == "matrix" else {})}
            built.append({**per_group, **group})
        if self.takes_model:
            settings["model"] = model
        return self.load_class()(built, **settings)

    def _split_matrices(self, group: dict) -> list[dict]:
        """``group``, or with ``matrices_only`` a matrix group as its 2-D tensors and the rest."""
        if not self.matrices_only or group["kind"] != "matrix":
            return [group]
        params = list(group["params"])
        parts = ([p for p in params if p.dim() == 2], "matrix"), \
                ([p for p in params if p.dim() != 2], "other_weights")
        return [{**group, "params": ps, "kind": kind} for ps, kind in parts if ps]


SUBSPACE_RANK = 128  # AdamSN+SM's default rank and projector refresh gap
SUBSPACE_GAP = 200

APOLLO_PROJECTOR = ("apollo_torch.random_projector.GradientProjector",)

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
    # ---- peers: their packages come with the "peers" extra; tuned: the best point of
    # their lr sweep where it lies inside their grid ----
    # settings that change a quantized state's layout are refused: the formulas assume
    # the packages' defaults (bitsandbytes' 4096-element threshold, torchao's block sizes)
    OptimizerSpec("bnb_adamw8bit", "AdamW 8-bit (bitsandbytes)", "quantized",
                  _class("bitsandbytes.optim.AdamW8bit"), bnb_adamw8bit_state_bytes,
                  refused=("amsgrad", "optim_bits", "args", "min_8bit_size", "is_paged"),
                  package="bitsandbytes", shared_state_bytes=bnb_shared_state_bytes,
                  tuned={"learning_rate": 1e-2, "weight_decay": 0.1}),
    # torchao compiles each parameter's step (torch.compile) on first use
    OptimizerSpec("torchao_adamw8bit", "AdamW 8-bit (torchao)", "quantized",
                  _class("torchao.optim.AdamW8bit"), torchao_adamw8bit_state_bytes,
                  refused=("block_size",), package="torchao",
                  tuned={"learning_rate": 1e-2, "weight_decay": 0.1}),
    OptimizerSpec("torchao_adamw4bit", "AdamW 4-bit (torchao)", "quantized",
                  _class("torchao.optim.AdamW4bit"), torchao_adamw4bit_state_bytes,
                  refused=("block_size",), package="torchao",
                  tuned={"learning_rate": 3e-3, "weight_decay": 0.1}),
    OptimizerSpec("adam_mini", "Adam-mini", "subset-norm",
                  _class("memeff.optim.peers.AdamMini"), adam_mini_state_bytes,
                  package="adam-mini", takes_model=True,
                  tuned={"learning_rate": 3e-3, "weight_decay": 0.1}),
    # GaLore and APOLLO project the matrix groups at AdamSN+SM's rank and gap, so the
    # low-rank methods compare at one rank (GPT-2 small: d/6; pass rank=192 for d/4);
    # scale 0.25 and the APOLLO settings are their papers' pretraining scripts'
    # (rank 32 on the baby config, as AdamSN+SM)
    OptimizerSpec("galore_adamw", "GaLore AdamW", "low-rank",
                  _class("galore_torch.GaLoreAdamW"), galore_state_bytes,
                  by_kind=_on_matrices_only({"proj_type": "std"}),
                  matrix_settings={"rank": SUBSPACE_RANK, "update_proj_gap": SUBSPACE_GAP,
                                   "scale": 0.25},
                  defaults={"no_deprecation_warning": True},
                  refused=("no_deprecation_warning",), matrices_only=True,
                  package="galore-torch",
                  checkpoint_classes=("galore_torch.galore_projector.GaLoreProjector",),
                  tuned={"learning_rate": 3e-2, "weight_decay": 0.1,
                         "optimizer_hparams": {"rank": 32}}),
    OptimizerSpec("apollo", "APOLLO", "low-rank",
                  _class("apollo_torch.APOLLOAdamW"), apollo_state_bytes,
                  by_kind=_on_matrices_only({"proj_type": "std", "proj": "random",
                                             "scale_type": "channel"}),
                  matrix_settings={"rank": SUBSPACE_RANK, "update_proj_gap": SUBSPACE_GAP,
                                   "scale": 1.0},
                  refused=("no_deprecation_warning",), matrices_only=True,
                  package="apollo-torch", checkpoint_classes=APOLLO_PROJECTOR,
                  tuned={"learning_rate": 3e-2, "weight_decay": 0.1,
                         "optimizer_hparams": {"rank": 32}}),
    OptimizerSpec("apollo_mini", "APOLLO-Mini", "low-rank",
                  _class("apollo_torch.APOLLOAdamW"), apollo_state_bytes,
                  by_kind=_on_matrices_only({"proj_type": "std", "proj": "random",
                                             "scale_type": "tensor"}),
                  matrix_settings={"rank": 1, "update_proj_gap": SUBSPACE_GAP, "scale": 128.0},
                  refused=("no_deprecation_warning",), matrices_only=True,
                  package="apollo-torch", checkpoint_classes=APOLLO_PROJECTOR,
                  tuned={"learning_rate": 1e-2, "weight_decay": 0.1}),
    OptimizerSpec("torch_muon", "Muon + AdamW (torch)", "momentum-only",
                  _class("memeff.optim.peers.MuonWithAdamW"), muon_with_adamw_state_bytes,
                  by_kind=_on_matrices("use_muon"), matrices_only=True, package="torch",
                  tuned={"learning_rate": 3e-3, "weight_decay": 0.1}),
    OptimizerSpec("lion_pytorch", "Lion (lion-pytorch)", "momentum-only",
                  _class("lion_pytorch.Lion"), lion_state_bytes,
                  refused=("use_triton",), package="lion-pytorch",
                  tuned={"learning_rate": 3e-3, "weight_decay": 1.0}),
    # subset-norm on the matrix groups, as its docs' example (nn.Linear weights)
    OptimizerSpec("adamwsn", "AdamWSN (pytorch-optimizer)", "subset-norm",
                  _class("pytorch_optimizer.AdamWSN"), adamwsn_state_bytes,
                  by_kind=_on_matrices("sn"), package="pytorch-optimizer",
                  tuned={"learning_rate": 4e-2, "weight_decay": 0.01}),
)
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in SPECS}
# ours and the baselines they are tuned against: what every suite measures and trains
OPTIMIZER_NAMES = tuple(spec.name for spec in SPECS if spec.trained and spec.package is None)
# optimizers from other packages (and torch's Muon), measured beside ours where a suite
# names them
PEER_NAMES = tuple(spec.name for spec in SPECS if spec.package is not None)
BASELINE = "adamw"  # what every ratio is taken against


def spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name is a ValueError listing the choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(REGISTRY)}") from None


def label(name: str) -> str:
    return spec(name).label


def checkpoint_classes() -> list[type]:
    """The classes a checkpoint may hold besides tensors and plain values: those of the
    installed peers' :attr:`OptimizerSpec.checkpoint_classes`."""
    return list({_class(path)() for s in SPECS if s.checkpoint_classes
                 and s.missing_package() is None for path in s.checkpoint_classes})


def missing_package(name: str) -> str | None:
    """The install hint when optimizer ``name``'s package is missing (a suite skips with it),
    else None."""
    return spec(name).missing_package()


def spec_of(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """The first spec whose class ``optimizer`` is (names sharing a class share formulas)."""
    for s in SPECS:
        if s.package is not None and sys.modules.get(s.package.replace("-", "_")) is None:
            continue  # an instance of a peer's class means its package is imported
        if type(optimizer) is s.optimizer_class():
            return s
    raise TypeError(f"no optimizer in memeff.optim.registry is a {type(optimizer).__name__}")


def state_formula(optimizer: torch.optim.Optimizer) -> Callable[[dict, torch.Tensor], int]:
    """The analytic state-byte formula of ``optimizer``'s class, from the registry."""
    return spec_of(optimizer).state_bytes
