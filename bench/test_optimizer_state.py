"""Optimizer-state bytes against parameter shapes, counted three ways, and the time of a step.

For each shape and optimizer: the analytic count from the optimizer's formula
(``expected_state_bytes``) must equal the bytes of the live state tensors
(``state_bytes``), and on CUDA the allocator's growth over the first step (the step that
creates the state; its transients are freed by then) must equal the allocator blocks of
those tensors (each rounded up to 512 bytes; ``step`` scalars torch keeps on the CPU cost
none). Each bare tensor gets its method's full treatment (subset-norm or factoring
whatever its shape); ``step`` tensors are counted. bfloat16 parameters run on CUDA only.

The peers (optimizers from other packages, ``registry.PEER_NAMES``) get rows beside ours,
counted the same three ways: every tensor their state holds (``memory.state_tensors``:
quantized tensor subclasses by their inner tensors, GaLore's and APOLLO's projector
objects, shared quantization maps once). The full profile measures them on every shape;
the quick and default profiles on :data:`PEER_SHAPE` only (all peers over every shape
take minutes on 2 CPU cores: Muon's Newton-Schulz and GaLore's SVD on 4096x4096, eager
quantization of the 50257x768 table). A peer whose package is
missing is skipped with the install hint. A peer whose step goes through torch.compile
(torchao) is stepped eagerly here: the state is the same, compiling would take a minute
per shape, and its compiled step is timed by the step_time suite; its row says so
(``eager_instead_of_compiled``). A peer's timed steps stop at about
:data:`PEER_TIMING_BUDGET_S` seconds (fewer rounds, pytest-benchmark's ``rounds``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import pytest
import torch

from bench.common import (allocator_delta, compiles, in_profile, missing_peer_packages,
                          require_profile, state_allocator_bytes, synchronized)
from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import OPTIMIZER_NAMES, build_optimizer_for_tensors, registry
from memeff.optim.registry import PEER_NAMES

SHAPES = {
    (128, 128): "quick",
    (512, 512): "quick",
    (768,): "quick",
    (12, 768, 64): "quick",  # 3-D: (first dim, rest) for AdamSN, last two dims for Adafactor
    (768, 3072): "default",
    (3072, 768): "default",
    (4096, 4096): "default",
    (50257, 768): "full",
}
DTYPES = (torch.float32, torch.bfloat16)
CUDA_ONLY_DTYPES = (torch.bfloat16,)  # bfloat16 weights are trained on GPUs, not CPUs
SUBSET_SIZES = (1, 16, 256, 4096, "auto")
SUBSET_SHAPES = ((768, 3072), (4096, 4096))
LR = 1e-3
NAMES = tuple(OPTIMIZER_NAMES) + tuple(PEER_NAMES)
PEER_SHAPE = (512, 512)  # the peers' one shape in the quick and default profiles
PEER_TIMING_BUDGET_S = 20.0  # about how long a peer's timed steps may take, per row


@dataclass
class StateRow:
    """One optimizer's state over one parameter, counted three ways."""
    shape: list[int]
    numel: int
    optimizer: str
    dtype: str
    analytic_bytes: int  # expected_state_bytes: the formula
    live_bytes: int  # state_bytes: the tensors
    allocator_bytes_after_first_step: int | None  # the CUDA allocator; None on a CPU
    adamw_bytes: int  # fused AdamW's state over the same parameter
    ratio_to_adamw: float
    # a torch.compile'd step (torchao) run eagerly: same state, eager step time
    eager_instead_of_compiled: bool


@dataclass
class SubsetStateRow(StateRow):
    """AdamSN's state at one subset size."""
    subset_size: int | str


def suite_config(profile: str) -> dict:
    return {"shapes": [list(s) for s in SHAPES], "optimizers": list(OPTIMIZER_NAMES),
            "peers": list(PEER_NAMES),
            "peer_shapes": [list(s) for s in SHAPES if in_profile(profile, peer_profile(s))],
            "peer_timing_budget_s": PEER_TIMING_BUDGET_S,
            "peer_packages_missing": missing_peer_packages(),
            "adamsn_subset_sizes": list(SUBSET_SIZES),
            "adamsn_subset_shapes": [list(s) for s in SUBSET_SHAPES],
            "dtypes": [str(d) for d in DTYPES], "cuda_only_dtypes": [str(d) for d in CUDA_ONLY_DTYPES],
            "lr": LR, "step_tensors_counted": True}


def peer_profile(shape) -> str:
    """The profile that measures the peers on ``shape``."""
    return "quick" if shape == PEER_SHAPE else "full"


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def measure(benchmark, record, device, shape, name, dtype=torch.float32, **hparams):
    eager = compiles(name)
    # torch.compile'd steps run eagerly here: the state is the same (see the module docstring)
    with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
        return _measure(benchmark, record, device, shape, name, dtype, eager, **hparams)


def _measure(benchmark, record, device, shape, name, dtype, eager, **hparams):
    def step_on_fresh_param(seed: int):
        torch.manual_seed(seed)
        param = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        param.grad = torch.randn(shape, device=device, dtype=dtype)
        return param, build_optimizer_for_tensors(name, [param], lr=LR, **hparams)

    if device.type == "cuda":  # library workspaces (cuBLAS, cuSOLVER) are made once, here
        _, warm_up = step_on_fresh_param(1)
        warm_up.step()
        del warm_up, _
    param, optimizer = step_on_fresh_param(0)
    adamw_bytes = expected_state_bytes(build_optimizer_for_tensors("adamw", [param], lr=LR))
    analytic = expected_state_bytes(optimizer)
    started = time.perf_counter()
    _, allocated = allocator_delta(optimizer.step, device)  # the first step creates the state
    first_step_s = time.perf_counter() - started
    live = state_bytes(optimizer)
    assert live == analytic, f"{name} on {shape}: live state {live} bytes, formula {analytic}"
    if allocated is not None:
        charged = state_allocator_bytes(optimizer)  # every tensor memory.state_tensors finds
        assert allocated == charged, (f"{name} on {shape}: the allocator grew by {allocated} "
                                      f"bytes over the first step; the state's blocks are {charged}")
    rounds = max(3, min(50, int(2e8 // param.numel())))  # bounded time on large shapes
    warmup_rounds = 1
    if name in PEER_NAMES:  # Muon's Newton-Schulz, GaLore's SVD: bounded by time as well
        rounds = max(1, min(rounds, int(PEER_TIMING_BUDGET_S / max(first_step_s, 1e-9))))
        warmup_rounds = 1 if rounds > 1 else 0
    benchmark.pedantic(synchronized(optimizer.step, device), rounds=rounds,
                       warmup_rounds=warmup_rounds)
    row_type = SubsetStateRow if hparams else StateRow
    return record(row_type(shape=list(shape), numel=param.numel(), optimizer=name,
                           dtype=str(dtype), analytic_bytes=analytic, live_bytes=live,
                           allocator_bytes_after_first_step=allocated, adamw_bytes=adamw_bytes,
                           ratio_to_adamw=live / adamw_bytes, eager_instead_of_compiled=eager,
                           **hparams))


@pytest.mark.benchmark(group="optimizer state")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=shape_id)
def test_state_bytes(benchmark, record, device, profile, shape, name, dtype):
    if dtype in CUDA_ONLY_DTYPES and device.type != "cuda":
        pytest.skip(f"{dtype} optimizer steps are measured on CUDA only")
    if name in PEER_NAMES:
        require_profile(profile, peer_profile(shape))
        hint = registry.missing_package(name)
        if hint is not None:
            pytest.skip(hint)
    else:
        require_profile(profile, SHAPES[shape])
    row = measure(benchmark, record, device, shape, name, dtype)
    if len(shape) == 2 and name in ("adamsn", "adafactor") and dtype == torch.float32:
        n, m = shape
        expected_ratio = ((n * m + max(n, m)) if name == "adamsn" else (n + m)) / (2 * n * m)
        # the formula in the docs, step tensors aside (4 bytes each side)
        assert math.isclose((row["live_bytes"] - 4) / (row["adamw_bytes"] - 4), expected_ratio)


@pytest.mark.benchmark(group="adamsn subset size")
@pytest.mark.parametrize("subset_size", SUBSET_SIZES, ids=lambda s: f"subset{s}")
@pytest.mark.parametrize("shape", SUBSET_SHAPES, ids=shape_id)
def test_adamsn_subset_size(benchmark, record, device, profile, shape, subset_size):
    require_profile(profile, "default")
    measure(benchmark, record, device, shape, "adamsn", subset_size=subset_size)
