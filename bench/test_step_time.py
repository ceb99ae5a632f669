"""Time of an optimizer step over whole models, against torch's AdamW and the memory floor.

Every optimizer is timed in a pair with torch's fused AdamW (``adamw``, the baseline):
the two step one model's parameters with the same fixed gradients, each with its own
state, and are timed round after round, interleaved with an in-place add as large as the
model, so that their ratio comes from one run. A pair's model, states and probe buffers
are freed before the next pair is built, so the default profile's peak resident memory is
that of one pair, under 5 GB for GPT-2 small (124M parameters), where all optimizers at
once held 9-13 GB. Sharing the parameters does not change what a step costs: the bytes it
moves do not depend on the values, and each step streams far more than the last-level
cache, so neither finds the other's data cached.

The in-place add gives the memory bandwidth the step could reach; an optimizer's floor is
the bytes it must move at that bandwidth, and ``fraction_of_floor`` is floor time over
measured time (1.0 is at the floor). Each pair measures its own bandwidth.

torch's foreach AdamW (``adamw_foreach``) is the second reference. It is timed once per
model, in a pair of its own against ``adamw`` (which gives the ``adamw`` and
``adamw_foreach`` rows their interleaved medians); another optimizer's
``ratio_to_adamw_foreach`` is its ratio to ``adamw`` over that pair's ratio of
``adamw_foreach`` to ``adamw``, a product of two interleaved ratios, each from one run.
Timing it in every pair instead would put two AdamW states and foreach's param-sized
temporaries beside every candidate, about 6.5 GB for GPT-2 small.

Rows of ``test_step_time`` (one per model and optimizer):
``model``, ``optimizer``, ``n_params``, ``interleaved_with`` (the names timed in turn),
``interleaved_rounds``, ``interleaved_median_s``, ``adamw_median_s`` (the baseline's
median in the same pair), ``ratio_to_adamw``, ``ratio_to_adamw_foreach``,
``inplace_add_s``, ``bandwidth_bytes_per_s``, ``floor_bytes``, ``fraction_of_floor``,
``step_peak_bytes``, ``step_peak_method``, ``kernels``, ``compiled_fraction``,
``kernels_error`` (see :func:`bench.common.observe_kernels`), ``cpu_capability``, and
pytest-benchmark's ``median_s`` and ``rounds`` of three uninterleaved steps.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

from bench.common import (interleaved_medians, observe_kernels, peak_allocated_bytes,
                          require_profile, synchronized)
from memeff import GPT, GPTConfig
from memeff.optim import OPTIMIZER_NAMES, build_optimizer
from memeff.optim.registry import BASELINE

MODELS = {
    "baby": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                       bias=False), "quick", 40),
    "gpt2-124M": (GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                            vocab_size=50257, bias=True), "default", 10),
}
FOREACH = "adamw_foreach"  # the second reference, timed against BASELINE in a pair of its own
# torch's other forms, timed beside the optimizers training compares
TORCH_VARIANTS = (FOREACH, "torch_adafactor_foreach")
CANDIDATES = tuple(OPTIMIZER_NAMES) + TORCH_VARIANTS
REFERENCE_PAIR = (BASELINE, FOREACH)
HPARAMS = dict(lr=1e-3, weight_decay=0.1)
# float32 accesses per element a step must make: reads and writes of param, grad and state
ACCESSES = {
    "adamw": 7, "adamw_foreach": 7,  # p, g, m, v read; p, m, v written
    "adamsn": 5,  # p, g, m read; p, m written (v is one value per row)
    "adamsnsm": 3,  # p, g read; p written (the momentum is low-rank)
    # Adafactor's row and column statistics need all of G, and its parameter scaling all
    # of X, before any element is updated: pass 1 reads G and X (for RMS(X)), pass 2 reads
    # G and X and writes X. Ours and torch's both take RMS(X) afresh every step.
    "adafactor": 5, "torch_adafactor": 5, "torch_adafactor_foreach": 5,
}
# params without the method's reduction: AdamW's 7; unfactored Adafactor keeps a per-element
# V, so pass 1 reads G, V and X and writes V, pass 2 reads G, V and X and writes X
PER_ELEMENT_ACCESSES = {"adamsn": 7, "adamsnsm": 7, "adafactor": 8, "torch_adafactor": 8,
                        "torch_adafactor_foreach": 8}
BATCH_SIZE, BLOCK = 12, 64
KV_HEADS = (4, 2, 1)


@dataclass
class StepRow:
    """One optimizer's whole-model step, timed in a pair with fused AdamW."""
    model: str
    optimizer: str
    n_params: int
    interleaved_with: list[str]  # what was timed in turn with it
    interleaved_rounds: int
    interleaved_median_s: float
    adamw_median_s: float  # fused AdamW's median in the same pair
    ratio_to_adamw: float
    ratio_to_adamw_foreach: float
    inplace_add_s: float
    bandwidth_bytes_per_s: float
    floor_bytes: int  # what the step must move
    fraction_of_floor: float  # floor time / measured time
    step_peak_bytes: int
    step_peak_method: str
    kernels: str  # which code stepped it: bench.common.observe_kernels
    compiled_fraction: float | None
    kernels_error: str | None
    cpu_capability: str


@dataclass
class IterationRow:
    """One training iteration of the baby model."""
    model: str
    optimizer: str
    n_kv_head: int
    batch_size: int
    block_size: int
    iteration_peak_bytes: int
    iteration_peak_method: str
    kernels: str
    compiled_fraction: float | None
    kernels_error: str | None
    cpu_capability: str


def suite_config(profile: str) -> dict:
    return {"models": {k: vars(v[0]) for k, v in MODELS.items()},
            "rounds": {k: v[2] for k, v in MODELS.items()}, "hparams": HPARAMS,
            "baseline": BASELINE, "reference_pair": list(REFERENCE_PAIR),
            "accesses_per_element": ACCESSES, "per_element_accesses": PER_ELEMENT_ACCESSES,
            "train_iteration": {"model": "baby", "batch_size": BATCH_SIZE, "block_size": BLOCK,
                                "n_kv_heads": list(KV_HEADS)}}


def floor_bytes(name: str, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the step must move: the method's accesses on the params it reduces over."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            reduced = {
                "adamsn": group.get("subset_norm", False), "adamsnsm": group.get("subset_norm", False),
                "adafactor": group.get("factored", False) and p.dim() >= 2,
                "torch_adafactor": p.dim() >= 2, "torch_adafactor_foreach": p.dim() >= 2,
            }.get(name, True)
            accesses = ACCESSES[name] if reduced else PER_ELEMENT_ACCESSES[name]
            total += accesses * p.numel() * p.element_size()
    return total


def model_with_gradients(config: GPTConfig, device: torch.device) -> GPT:
    """The same model and fixed gradients on every call."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


@contextlib.contextmanager
def stepped_optimizers(config: GPTConfig, names, device: torch.device) -> Iterator[tuple]:
    """``names``' optimizers over one model with fixed gradients, each stepped once (which
    creates its state and observes which code steps it), and those observations; all of
    it is freed on leaving the block."""
    model = model_with_gradients(config, device)
    optimizers = {name: build_optimizer(name, model, **HPARAMS) for name in names}
    paths = {name: observe_kernels(opt, opt.step, device) for name, opt in optimizers.items()}
    try:
        yield optimizers, paths
    finally:
        optimizers.clear()
        del model
        gc.collect()  # the next pair's tensors take the memory these leave


def interleaved_pair(optimizers: dict, n_params: int, rounds: int,
                     device: torch.device) -> tuple[dict[str, float], float]:
    """Median step time of each optimizer and of the bandwidth probe, interleaved, and the
    probe's bandwidth in bytes/s. The probe's buffers live only while it is timed."""
    # one in-place add over contiguous buffers as large as the model
    probe_target = torch.zeros(n_params, device=device)
    probe_source = torch.ones(n_params, device=device)
    candidates = {name: opt.step for name, opt in optimizers.items()}
    candidates["inplace_add"] = lambda: probe_target.add_(probe_source, alpha=1e-12)
    medians = interleaved_medians(candidates, rounds, device)
    return medians, 3 * probe_target.nbytes / medians["inplace_add"]  # read both, write one


@pytest.fixture(scope="module", params=list(MODELS))
def timed_model(request, device, profile):
    """The model's name, config and rounds, and the reference pair's timings: torch's fused
    AdamW against its foreach form, interleaved with the probe."""
    model_name = request.param
    config, needed, rounds = MODELS[model_name]
    require_profile(profile, needed)
    with stepped_optimizers(config, REFERENCE_PAIR, device) as (optimizers, paths):
        n_params = sum(p.numel() for g in optimizers[BASELINE].param_groups for p in g["params"])
        medians, bandwidth = interleaved_pair(optimizers, n_params, rounds, device)
    return dict(name=model_name, config=config, rounds=rounds, n_params=n_params,
                reference=dict(medians=medians, bandwidth=bandwidth, paths=paths))


@pytest.mark.benchmark(group="optimizer step")
@pytest.mark.parametrize("name", CANDIDATES)
def test_step_time(benchmark, record, device, timed_model, name):
    reference = timed_model["reference"]
    foreach_ratio = reference["medians"][FOREACH] / reference["medians"][BASELINE]
    if name in REFERENCE_PAIR:  # timed already: step a fresh copy for the peak and pytest-benchmark
        pair = reference
        names = (name,)
    else:
        pair = None
        names = (BASELINE, name)
    with stepped_optimizers(timed_model["config"], names, device) as (optimizers, paths):
        if pair is None:
            medians, bandwidth = interleaved_pair(optimizers, timed_model["n_params"],
                                                  timed_model["rounds"], device)
            pair = dict(medians=medians, bandwidth=bandwidth, paths=paths)
        optimizer = optimizers[name]
        peak, peak_method = peak_allocated_bytes(optimizer.step, device)
        benchmark.pedantic(synchronized(optimizer.step, device), rounds=3, warmup_rounds=0)
        floor = floor_bytes(name, optimizer)
        del optimizer  # the block frees the pair only when nothing else holds it
    medians, bandwidth = pair["medians"], pair["bandwidth"]
    ratio = medians[name] / medians[BASELINE]
    record(StepRow(
        model=timed_model["name"], optimizer=name, n_params=timed_model["n_params"],
        interleaved_with=list(medians), interleaved_rounds=timed_model["rounds"],
        interleaved_median_s=medians[name], adamw_median_s=medians[BASELINE],
        ratio_to_adamw=ratio, ratio_to_adamw_foreach=ratio / foreach_ratio,
        inplace_add_s=medians["inplace_add"], bandwidth_bytes_per_s=bandwidth,
        floor_bytes=floor, fraction_of_floor=floor / bandwidth / medians[name],
        step_peak_bytes=peak, step_peak_method=peak_method, **pair["paths"][name],
        cpu_capability=torch.backends.cpu.get_cpu_capability()))


@pytest.mark.benchmark(group="train iteration (baby)")
@pytest.mark.parametrize("n_kv_head", KV_HEADS, ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_train_iteration(benchmark, record, device, profile, name, n_kv_head):
    require_profile(profile, "quick" if n_kv_head == 4 or name == BASELINE else "default")
    config, _, _ = MODELS["baby"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(config), "n_kv_head": n_kv_head})).to(device)
    optimizer = build_optimizer(name, model, **HPARAMS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (BATCH_SIZE, BLOCK), generator=generator).to(device)
    y = torch.randint(config.vocab_size, (BATCH_SIZE, BLOCK), generator=generator).to(device)

    def iteration():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    path = observe_kernels(optimizer, iteration, device)  # creates the optimizer state
    peak, peak_method = peak_allocated_bytes(iteration, device)
    benchmark(synchronized(iteration, device))
    record(IterationRow(model="baby", optimizer=name, n_kv_head=n_kv_head,
                        batch_size=BATCH_SIZE, block_size=BLOCK, iteration_peak_bytes=peak,
                        iteration_peak_method=peak_method, **path,
                        cpu_capability=torch.backends.cpu.get_cpu_capability()))


SUMMARY_KEYS = ("ratio_to_adamw", "ratio_to_adamw_foreach", "fraction_of_floor",
                "interleaved_median_s", "kernels")


def summarize(rows: list[dict]) -> dict:
    """``{model: {optimizer: {key: value for key in SUMMARY_KEYS}}}`` from the step rows."""
    steps = [r for r in rows if r["test"].startswith("test_step_time")]
    return {
        model: {r["optimizer"]: {k: r[k] for k in SUMMARY_KEYS}
                for r in steps if r["model"] == model}
        for model in sorted({r["model"] for r in steps})
    }
