"""Helpers the benchmark suites share: profiles, synchronized timing, SDPA backend names,
which path an optimizer step took, peak resident memory, worker processes for training runs."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from bench.results import PROFILES
from memeff.optim.registry import PEER_NAMES, missing_package

# torch._fused_sdp_choice returns the index of torch.nn.attention.SDPBackend's member
SDPA_BACKENDS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def in_profile(profile: str, needed: str) -> bool:
    """Whether the running profile includes ``needed`` (quick < default < full)."""
    return PROFILES.index(profile) >= PROFILES.index(needed)


def require_profile(profile: str, needed: str) -> None:
    """Skip unless the running profile includes ``needed``."""
    if not in_profile(profile, needed):
        pytest.skip(f"in the {needed} profile: run with --profile {needed}")


def missing_peer_packages() -> dict[str, str]:
    """The install hint of each peer whose package is missing (its rows are skipped)."""
    hints = {name: missing_package(name) for name in PEER_NAMES}
    return {name: hint for name, hint in hints.items() if hint is not None}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device synchronization, so a timer sees the work finish."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


def sdpa_backend(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False) -> str:
    """Which kernel F.scaled_dot_product_attention picks for these inputs."""
    choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal, enable_gqa=enable_gqa)
    return SDPA_BACKENDS.get(int(choice), f"unknown({int(choice)})")


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int,
                        device: torch.device, warmup: int = 2,
                        before_each: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds of each callable, timed in turn round after round.

    Interleaving spreads the machine's drifts (other load, clock changes) over all
    candidates alike, so ratios between them are fair even on a noisy machine.
    ``before_each`` runs, off the clock, before every timed call.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(warmup + rounds):
        for name, fn in candidates.items():
            if before_each is not None:
                before_each()
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to a multiple of this


def allocator_bytes(tensors) -> int:
    """Bytes the CUDA caching allocator charges for the CUDA storages behind ``tensors``.

    Each storage is counted once, rounded up to a multiple of 512 bytes as the allocator
    rounds its blocks (so a 4-byte ``step`` scalar costs 512); storages on the CPU cost
    nothing here. This is what ``torch.cuda.memory_allocated`` grows by when they are made.
    """
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "cuda":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += -(-storage.nbytes() // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return total


def state_allocator_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the CUDA caching allocator charges for ``optimizer``'s state: the storages of
    every tensor :func:`memeff.memory.state_tensors` finds (nested containers, projector
    objects; a tensor subclass such as torchao's quantized state by its inner tensors), none
    shared with a parameter, each rounded as :func:`allocator_bytes` rounds it."""
    from memeff.memory import plain_tensors, state_tensors

    def storage(t: torch.Tensor) -> tuple[torch.device, int]:
        return t.device, t.untyped_storage().data_ptr()

    params = {storage(p) for group in optimizer.param_groups for p in group["params"]}
    return allocator_bytes(t for t in plain_tensors(state_tensors(optimizer))
                           if storage(t) not in params)


# packages whose optimizers step through torch.compile, compiling on first use (torchao:
# 20-100 s per model on 2 CPU cores); the state they make is the same run eagerly
COMPILING_PACKAGES = ("torchao",)


def compiles(name: str) -> bool:
    """Whether optimizer ``name``'s step goes through torch.compile."""
    from memeff.optim.registry import spec

    return spec(name).package in COMPILING_PACKAGES


def allocator_delta(make: Callable[[], object], device: torch.device) -> tuple[object, int | None]:
    """``make()``'s result and the bytes ``torch.cuda.memory_allocated`` grew by (None off CUDA)."""
    if device.type != "cuda":
        return make(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    made = make()
    torch.cuda.synchronize(device)
    return made, torch.cuda.memory_allocated(device) - before


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes ``fn`` allocates beyond what existed when it started, and how it was measured.

    CUDA: the allocator's peak after ``reset_peak_memory_stats``. CPU: the running sum of
    the allocation and free events that torch's profiler records during the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, "cpu profiler allocation events"


def observe_kernels(optimizer: torch.optim.Optimizer, run: Callable[[], object],
                    device: torch.device) -> dict:
    """Call ``run()``, which steps ``optimizer``, and say which code stepped its parameters.

    memeff's optimizers ask ``compiled_kernels(work, grad)`` for the C++ kernels on every
    parameter and call them only where the parameter and its state fit them (dtype,
    device, layout; AdamSN+SM's projected momentum never does); elsewhere they step in
    PyTorch ops. For the length of ``run()`` the instance's ``compiled_kernels`` is
    wrapped so that a kernel call marks its parameter compiled, which observes the path
    instead of predicting it. Returns ``kernels``: ``"compiled"``, ``"eager"``,
    ``"compiled+eager"`` (some of each) or ``"torch"`` (not one of memeff's optimizers);
    ``compiled_fraction``: the share of stepped elements the kernels took (None for
    torch's); ``kernels_error``: why the kernels could not be built, where a CPU step ran
    eager for want of them (else None).
    """
    if not hasattr(optimizer, "compiled_kernels"):
        run()
        return {"kernels": "torch", "compiled_fraction": None, "kernels_error": None}
    asked: list[list] = []  # [elements, called a kernel] per parameter, in step order
    ask = optimizer.compiled_kernels

    def compiled_kernels(work, grad):
        asked.append([work.numel(), False])
        module = ask(work, grad)
        return None if module is None else _KernelCalls(module, asked[-1])

    optimizer.compiled_kernels = compiled_kernels  # shadows the method on this instance only
    try:
        run()
    finally:
        del optimizer.compiled_kernels
    compiled = sum(n for n, called in asked if called)
    total = sum(n for n, _ in asked)
    kernels = "compiled" if compiled == total else "eager" if compiled == 0 else "compiled+eager"
    error = None
    if compiled < total and device.type == "cpu" and getattr(optimizer, "backend", None) != "eager":
        from memeff.optim import kernels as compiled_module

        error = compiled_module.build_error()  # tried already by the step: cached
    return {"kernels": kernels, "compiled_fraction": compiled / total if total else None,
            "kernels_error": error}


class _KernelCalls:
    """The kernels module, marking its parameter's entry when any kernel is called."""

    def __init__(self, module, entry: list):
        self._module, self._entry = module, entry

    def __getattr__(self, name):
        kernel = getattr(self._module, name)

        def call(*args, **kwargs):
            self._entry[1] = True
            return kernel(*args, **kwargs)

        return call


def peak_rss_bytes() -> dict[str, int | None]:
    """Peak resident memory so far of this process (``self``) and of the largest of its
    finished, waited-for child processes and their descendants (``children``: training
    workers, compilers), from ``getrusage``; None where the platform has no ``resource``.

    ``ru_maxrss`` is a high-water mark over the process's life, never reset. A child
    started by a plain ``fork`` counts the pages it shares with this process until it
    execs; ``spawn`` workers and ``subprocess`` (vfork/posix_spawn) start small.
    """
    try:
        import resource
    except ImportError:  # Windows
        return {"self": None, "children": None}
    unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit}


def use_shared_copies(shared: os.PathLike) -> None:
    """Point the data and tokenizer variables at ``shared`` when the environment does not.

    These machines have no internet; CI sets both variables itself.
    """
    shared = Path(shared)
    if "MEMEFF_DATA_DIR" not in os.environ and (shared / "data").is_dir():
        os.environ["MEMEFF_DATA_DIR"] = str(shared / "data")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (shared / "tiktoken_cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(shared / "tiktoken_cache")


def _leave_interrupts_to_the_parent() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[multiprocessing.pool.Pool]:
    """``workers`` spawned processes for training runs; leaving the block stops them.

    Collect every result inside the block: on the way out (finished, failed, or Ctrl-C)
    runs still going are killed rather than awaited, so an interrupted suite stops at once.
    The workers ignore Ctrl-C themselves (the terminal sends it to them too), which leaves
    it to the parent.
    """
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_leave_interrupts_to_the_parent)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()
