"""Pieces shared by AdamSN and Adafactor: argument checks, gradient checks, chunking."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.optim import Optimizer

from memeff.optim import kernels
from memeff.optim.sharding import Shards, StateFactory, local, shards_of

# Elements per chunk of the fused per-chunk loops: 4 MiB of float32, so one chunk of
# each operand (param, grad, state, scratch) stays in a 32 MiB L3 cache between the
# ops that touch it, while the Python overhead per chunk stays small next to its work.
DEFAULT_CHUNK_SIZE = 2**20

# "auto": the compiled CPU kernels where they apply and can be built, else eager;
# "eager": PyTorch ops only; "compiled": as "auto", but a failed build raises.
BACKENDS = ("auto", "eager", "compiled")


def check_lr(lr: float) -> None:
    if isinstance(lr, torch.Tensor):
        raise ValueError(f"Invalid learning rate: a Tensor lr is not supported, got {lr!r}; "
                         f"pass a float (lr=float(lr))")
    if not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_beta(beta: float, index: int, name: str = "beta") -> None:
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"Invalid {name} parameter at index {index}: {beta}")


def check_nonnegative(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value}")


def check_positive_int(value, name: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a positive integer)")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a bool)")


def check_grad(optimizer_name: str, param: torch.Tensor, maximize: bool) -> torch.Tensor:
    """The param's gradient (negated to maximize), refusing sparse and complex ones as
    torch.optim does."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(f"{optimizer_name} does not support sparse gradients")
    if torch.is_complex(param):
        raise RuntimeError(f"{optimizer_name} does not support complex parameters")
    return -grad if maximize else grad


def new_step_tensor() -> torch.Tensor:
    """The ``step`` counter: a float32 CPU scalar tensor, as torch.optim keeps it."""
    return torch.tensor(0.0, dtype=torch.float32)


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is ``<= k`` (1 when ``k`` is 1)."""
    for d in range(min(n, k), 0, -1):
        if n % d == 0:
            return d
    return 1


def chunks(length: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(length)`` in pieces of ``per_chunk``."""
    per_chunk = max(1, per_chunk)
    for start in range(0, length, per_chunk):
        yield start, min(start + per_chunk, length)


class Scratch:
    """One reusable buffer per (device, dtype), alive for a single ``step`` call.

    Ops write their chunk-sized temporaries into it instead of allocating fresh
    tensors: a fresh tensor over a few MiB is page-faulted in on every use on CPU.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        key = (like.device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.chunk_size), dtype=dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel]


def contiguous_work(param: torch.Tensor, grad: torch.Tensor):
    """Contiguous versions of ``param`` and ``grad`` (the tensors themselves when they are).

    A non-contiguous param is updated in a contiguous copy that the caller writes back
    with ``param.copy_(work)``; this costs one param-sized temporary for such params only.
    """
    work = param if param.is_contiguous() else param.contiguous()
    return work, grad.contiguous()


class ChunkedOptimizer(Optimizer):
    """The loop both optimizers share: lazy state, step counting, contiguous work copies.

    Every group has ``maximize`` (torch.optim's flag: ascend the objective; the step then
    works on a negated copy of each gradient). Parameters with no elements count their
    steps and are otherwise left alone, as there is nothing to update.

    Parameters may be DTensors sharded on dim 0 (FSDP2, see :mod:`memeff.optim.sharding`):
    the update then runs on this rank's rows, and ``shards`` sums what spans dim 0.

    Subclasses define ``NAME``, ``check_hparams(group)`` (raising ValueError),
    ``init_state(param, group, state, new)`` (filling an empty state dict with tensors made
    by ``new``, a :class:`~memeff.optim.sharding.StateFactory`) and
    ``update(work, grad, state, group, t, scratch, shards)`` (one step on contiguous local
    ``work`` and ``grad``; ``state`` as kept, DTensors for a sharded parameter, whose
    ``local`` parts the update writes; ``shards`` is None for a plain parameter), which may use
    ``compiled_kernels(work, grad)`` for a fused step; ``check_sharding(param, group,
    shards)`` may refuse a sharded parameter at construction.
    """

    NAME = "optimizer"

    def __init__(self, params, defaults: dict, chunk_size: int, backend: str = "auto"):
        check_positive_int(chunk_size, "chunk_size")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend value: {backend!r} (must be one of "
                             f"{', '.join(repr(b) for b in BACKENDS)})")
        self.check_hparams(defaults)
        self.chunk_size = chunk_size
        self.backend = backend
        super().__init__(params, defaults)
        if backend == "compiled":  # fail here, not in the middle of training
            kernels.load(required=True)

    def _shards(self, param: torch.Tensor, group: dict) -> Shards | None:
        shards = shards_of(param, self.NAME)
        if shards is not None:
            self.check_sharding(param, group, shards)
        return shards

    def compiled_kernels(self, work: torch.Tensor, grad: torch.Tensor):
        """The compiled kernels if this step of ``work`` may use them, else None.

        They take contiguous float32 or float64 CPU tensors with a gradient of the same
        dtype; anything else, and every tensor under ``backend="eager"``, stays eager.
        """
        if (self.backend == "eager" or work.device.type != "cpu" or work.numel() == 0
                or work.dtype not in kernels.COMPILED_DTYPES or grad.dtype != work.dtype):
            return None
        return kernels.load(required=self.backend == "compiled")

    @staticmethod
    def check_hparams(group: dict) -> None:
        raise NotImplementedError

    def check_sharding(self, param: torch.Tensor, group: dict, shards: Shards) -> None:
        """Raise ValueError if this optimizer cannot step ``param`` exactly as sharded."""

    def init_state(self, param: torch.Tensor, group: dict, state: dict, new: StateFactory) -> None:
        raise NotImplementedError

    def update(self, work, grad, state: dict, group: dict, t: float, scratch: Scratch,
               shards: Shards | None) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.check_hparams(group)
        for p in group["params"]:  # a sharding this optimizer can't step fails here
            self._shards(p, group)

    def __setstate__(self, state: dict) -> None:
        """As torch.optim's optimizers: accept state dicts with a plain-number ``step`` and
        groups saved before ``maximize`` existed."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
        for param_state in self.state.values():
            if "step" in param_state and not torch.is_tensor(param_state["step"]):
                param_state["step"] = torch.tensor(float(param_state["step"]), dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        scratch = Scratch(self.chunk_size)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = check_grad(self.NAME, p, group["maximize"])
                shards = self._shards(p, group)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = new_step_tensor()
                    self.init_state(p, group, state, StateFactory(p, shards))
                state["step"] += 1
                if p.numel() == 0:  # (every rank of a sharded param gets here alike)
                    continue
                param = local(p)
                work, grad = contiguous_work(param, local(grad))
                self.update(work, grad, state, group, state["step"].item(), scratch, shards)
                if work is not param:
                    param.copy_(work)
        return loss
