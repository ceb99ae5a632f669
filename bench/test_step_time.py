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

The peers (optimizers from other packages, ``registry.PEER_NAMES``) are timed the same
way, each in a pair with fused AdamW: on the baby model in the quick and default profiles
(those whose step goes through torch.compile, torchao's, from the default profile: they
compile for about a minute), on every model in the full profile. A peer whose package is
missing is skipped with the install hint.

One-off costs are kept out of the interleaved medians and reported on their own:

- The first step of every optimizer (which makes its state) is untimed by the medians;
  its seconds are ``first_step_s``. For a step that goes through torch.compile it
  compiles, with dynamo's caches reset and inductor's on-disk caches off, so
  ``compile_s`` (the first step less a steady one) is a cold compile of that optimizer
  (what every process's first compile pays once, a trivial function compiled before,
  is not in it); None otherwise.
- A projector refresh (AdamSN+SM's SVD, GaLore's SVD, APOLLO's random projection), due
  every ``refresh_interval`` steps, never falls in the timed rounds. A second optimizer
  built to refresh on every step (its ``gap`` or ``update_proj_gap`` set to 1) times
  refresh steps alone, after its own untimed first step: ``refresh_step_median_s`` over
  ``refresh_rounds`` (at most :data:`REFRESH_ROUNDS`, fewer where they would take more
  than :data:`REFRESH_BUDGET_S`, at least one). ``amortized_median_s`` spreads
  the refresh over its interval: plain + (refresh - plain) / interval. The refresh's
  ratio to AdamW is of the same run but not interleaved.

A candidate whose step would take its share of a pair's rounds past
:data:`STEP_BUDGET_S` (torch's Muon on GPT-2 small on 2 CPU cores: Newton-Schulz in
bfloat16, 20-45x AdamW) is timed instead on the model's budget shapes
(:data:`BUDGET_MODELS`: GPT-2 small's layer shapes and embedding, one block instead of
twelve), against fused and foreach AdamW on those shapes in the same interleaved rounds,
with the rounds cut to fit the budget (at least :data:`MIN_ROUNDS`); its row names what
was timed (``timed_shapes``) and why (``shape_note``). Its ``n_params`` is of what was
timed; its ``model`` is the one it stands for.

Rows of ``test_step_time`` (one per model and optimizer):
``model``, ``optimizer``, ``peer`` (from another package), ``timed_shapes``,
``shape_note``, ``n_params``, ``interleaved_with`` (the names timed in turn),
``interleaved_rounds``, ``interleaved_median_s``, ``adamw_median_s`` (the baseline's
median in the same pair), ``ratio_to_adamw``, ``ratio_to_adamw_foreach``,
``first_step_s``, ``compile_s``, ``refresh_interval``, ``refresh_rounds``,
``refresh_step_median_s``, ``refresh_ratio_to_adamw``, ``amortized_median_s``,
``amortized_ratio_to_adamw``, ``state_bytes`` (``memory.state_bytes`` of the timed
optimizer), ``inplace_add_s``, ``bandwidth_bytes_per_s``, ``floor_bytes``,
``fraction_of_floor``, ``step_peak_bytes``, ``step_peak_method``, ``kernels``,
``compiled_fraction``, ``kernels_error`` (see :func:`bench.common.observe_kernels`;
``"torch"`` for any optimizer not memeff's), ``cpu_capability``, and pytest-benchmark's
``median_s`` and ``rounds`` of three uninterleaved steps (one for a step over the budget).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch

from bench.common import (compiles, in_profile, interleaved_medians, missing_peer_packages,
                          observe_kernels, peak_allocated_bytes, require_profile, synchronize,
                          synchronized)
from memeff import GPT, GPTConfig
from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import OPTIMIZER_NAMES, build_optimizer, registry
from memeff.optim.registry import BASELINE, PEER_NAMES

MODELS = {
    "baby": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                       bias=False), "quick", 40),
    "gpt2-124M": (GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                            vocab_size=50257, bias=True), "default", 10),
}
# where a candidate does not fit STEP_BUDGET_S on a model's shapes: (what the row calls
# them, the config); GPT-2 small's layer shapes and embedding, one block instead of twelve
BUDGET_MODELS = {
    "gpt2-124M": ("gpt2-124M, 1 of 12 blocks",
                  dataclasses.replace(MODELS["gpt2-124M"][0], n_layer=1)),
}
FOREACH = "adamw_foreach"  # the second reference, timed against BASELINE in a pair of its own
# torch's other forms, timed beside the optimizers training compares
TORCH_VARIANTS = (FOREACH, "torch_adafactor_foreach")
CANDIDATES = tuple(OPTIMIZER_NAMES) + TORCH_VARIANTS + tuple(PEER_NAMES)
REFERENCE_PAIR = (BASELINE, FOREACH)
HPARAMS = dict(lr=1e-3, weight_decay=0.1)
WARMUP_ROUNDS = 2  # interleaved_medians' untimed rounds
# a candidate's own steps over a pair's rounds (warm-up included) may take this long; one
# that would take longer is timed on the model's BUDGET_MODELS shapes, in fewer rounds
STEP_BUDGET_S = 120.0
MIN_ROUNDS = 3
REFRESH_ROUNDS = 5  # refresh steps timed alone, at most
REFRESH_BUDGET_S = 60.0  # about how long the timed refresh steps may take
# the settings that space projector refreshes, by what each optimizer calls it
REFRESH_SETTINGS = ("gap", "update_proj_gap")
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
    peer: bool  # from another package (registry.PEER_NAMES)
    timed_shapes: str  # the model whose parameters were stepped: ``model`` or its budget shapes
    shape_note: str | None  # why not ``model``'s own shapes; None when they were timed
    n_params: int
    interleaved_with: list[str]  # what was timed in turn with it
    interleaved_rounds: int
    interleaved_median_s: float
    adamw_median_s: float  # fused AdamW's median in the same pair
    ratio_to_adamw: float
    ratio_to_adamw_foreach: float
    first_step_s: float  # the untimed step that makes the state (and compiles, refreshes)
    compile_s: float | None  # torch.compile's share of the first step; None: nothing compiled
    refresh_interval: int | None  # steps between projector refreshes; None: no projector
    refresh_rounds: int | None
    refresh_step_median_s: float | None  # a step that refreshes the projector, timed alone
    refresh_ratio_to_adamw: float | None
    amortized_median_s: float  # the refresh spread over its interval (plain: the median)
    amortized_ratio_to_adamw: float
    state_bytes: int
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


def peer_profile(name: str, model_name: str) -> str:
    """The profile that times peer ``name`` on ``model_name``: every model in the full one;
    the baby model from the quick one, or the default one for a compiling step."""
    if model_name != "baby":
        return "full"
    return "default" if compiles(name) else "quick"


def suite_config(profile: str) -> dict:
    return {"models": {k: vars(v[0]) for k, v in MODELS.items()},
            "rounds": {k: v[2] for k, v in MODELS.items()}, "hparams": HPARAMS,
            "baseline": BASELINE, "reference_pair": list(REFERENCE_PAIR),
            "peers": list(PEER_NAMES),
            "peer_models": {name: [m for m in MODELS if in_profile(profile, peer_profile(name, m))]
                            for name in PEER_NAMES},
            "peer_packages_missing": missing_peer_packages(),
            "budget_models": {k: {"label": label, "config": vars(config)}
                              for k, (label, config) in BUDGET_MODELS.items()},
            "step_budget_s": STEP_BUDGET_S, "min_rounds": MIN_ROUNDS,
            "warmup_rounds": WARMUP_ROUNDS, "refresh_rounds": REFRESH_ROUNDS,
            "refresh_budget_s": REFRESH_BUDGET_S,
            "accesses_per_element": ACCESSES, "per_element_accesses": PER_ELEMENT_ACCESSES,
            "other_optimizers_floor": "one pass: param, gradient and state read, param and "
                                      "state written",
            "train_iteration": {"model": "baby", "batch_size": BATCH_SIZE, "block_size": BLOCK,
                                "n_kv_heads": list(KV_HEADS)}}


def floor_bytes(name: str, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the step must move: the method's accesses on the params it reduces over. An
    optimizer without an entry in ACCESSES (the peers) is taken as one pass: it reads the
    param, the gradient and its state and writes the param and its state, the state's bytes
    being its registry formula's."""
    if name not in ACCESSES:
        params = sum(p.numel() * p.element_size()
                     for group in optimizer.param_groups for p in group["params"])
        return 3 * params + 2 * expected_state_bytes(optimizer)
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


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronized call."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def first_step(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[dict, float, int]:
    """Step ``optimizer`` the first time (which makes its state): which code stepped it
    (:func:`bench.common.observe_kernels`), the seconds, and how many graphs torch.compile
    made. Inductor's on-disk caches are off, so a compile is a cold one."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    with torch._inductor.config.patch(force_disable_caches=True):
        path = observe_kernels(optimizer, optimizer.step, device)
    synchronize(device)
    return path, time.perf_counter() - started, counters["stats"]["unique_graphs"] - graphs


@functools.cache
def warm_compiler(device_type: str) -> float:
    """Compile a one-line function once per process, so that the first compiled optimizer
    does not pay alone for what any first compile pays (imports, the C++ compiler's
    probe); returns its seconds."""
    import torch._inductor.config

    started = time.perf_counter()
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device_type))
    torch._dynamo.reset()
    return time.perf_counter() - started


@dataclass
class Stepped:
    """A model with fixed gradients, optimizers over it stepped once, and that first step."""
    model: GPT | None  # None once the block is left
    optimizers: dict[str, torch.optim.Optimizer]
    paths: dict[str, dict]  # observe_kernels per optimizer
    first_step_s: dict[str, float]
    compiled_graphs: dict[str, int]


@contextlib.contextmanager
def stepped_optimizers(config: GPTConfig, names, device: torch.device) -> Iterator[Stepped]:
    """``names``' optimizers over one model with fixed gradients, each stepped once (which
    creates its state, compiles a compiled step and observes which code steps it); all of
    it is freed on leaving the block."""
    if any(compiles(name) for name in names):
        warm_compiler(device.type)
    torch._dynamo.reset()  # a compiled step compiles afresh, as in a new process
    model = model_with_gradients(config, device)
    stepped = Stepped(model, {}, {}, {}, {})
    for name in names:
        optimizer = stepped.optimizers[name] = build_optimizer(name, model, **HPARAMS)
        (stepped.paths[name], stepped.first_step_s[name],
         stepped.compiled_graphs[name]) = first_step(optimizer, device)
    try:
        yield stepped
    finally:  # the caller's name for ``stepped`` outlives the block: empty it
        stepped.optimizers.clear()
        stepped.model = None
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
    medians = interleaved_medians(candidates, rounds, device, warmup=WARMUP_ROUNDS)
    return medians, 3 * probe_target.nbytes / medians["inplace_add"]  # read both, write one


def counted_params(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def refresh_setting(name: str) -> str | None:
    """The setting that spaces ``name``'s projector refreshes, if it has a projector."""
    settings = registry.spec(name).matrix_settings
    return next((k for k in REFRESH_SETTINGS if k in settings), None)


def time_refresh(name: str, model: GPT, device: torch.device) -> dict:
    """Refresh steps of ``name`` over ``model``, timed alone: an optimizer built to refresh
    its projectors on every step, stepped once untimed (its state), then timed; the
    refresh fields of a row (None for an optimizer without a projector)."""
    setting = refresh_setting(name)
    if setting is None:
        return {"refresh_interval": None, "refresh_rounds": None, "refresh_step_median_s": None}
    optimizer = build_optimizer(name, model, **HPARAMS, **{setting: 1})
    first = seconds(optimizer.step, device)  # a refresh too: an estimate of one
    rounds = max(1, min(REFRESH_ROUNDS, int(REFRESH_BUDGET_S / max(first, 1e-9))))
    times = [seconds(optimizer.step, device) for _ in range(rounds)]
    del optimizer
    gc.collect()
    return {"refresh_interval": int(registry.spec(name).matrix_settings[setting]),
            "refresh_rounds": rounds, "refresh_step_median_s": statistics.median(times)}


def fitted_rounds(step_s: float, rounds: int) -> int:
    """The interleaved rounds that keep a step of ``step_s`` within STEP_BUDGET_S (the
    warm-up rounds included), at most ``rounds`` and at least MIN_ROUNDS."""
    fit = int(STEP_BUDGET_S / max(step_s, 1e-9)) - WARMUP_ROUNDS
    return max(MIN_ROUNDS, min(rounds, fit))


def over_budget(step_s: float, rounds: int) -> bool:
    return step_s * (rounds + WARMUP_ROUNDS) > STEP_BUDGET_S


@pytest.fixture(scope="module", params=list(MODELS))
def timed_model(request, device, profile):
    """The model's name, config and rounds, and the reference pair's timings: torch's fused
    AdamW against its foreach form, interleaved with the probe."""
    model_name = request.param
    config, needed, rounds = MODELS[model_name]
    require_profile(profile, needed)
    with stepped_optimizers(config, REFERENCE_PAIR, device) as stepped:
        n_params = counted_params(stepped.optimizers[BASELINE])
        medians, bandwidth = interleaved_pair(stepped.optimizers, n_params, rounds, device)
        first_steps = dict(stepped.first_step_s)
    return dict(name=model_name, config=config, rounds=rounds, n_params=n_params,
                reference=dict(medians=medians, bandwidth=bandwidth, first_step_s=first_steps))


def measure_in(stepped: Stepped, name: str, rounds: int, benchmark, device: torch.device,
               pedantic_rounds: int, medians: dict | None = None,
               bandwidth: float | None = None) -> dict:
    """Everything a row measures of ``name`` among ``stepped``'s optimizers: the interleaved
    medians (or the given ones, of the reference pair), the refresh steps, the peak, the
    floor, the state and pytest-benchmark's uninterleaved steps."""
    if medians is None:
        medians, bandwidth = interleaved_pair(stepped.optimizers,
                                              counted_params(stepped.optimizers[BASELINE]),
                                              rounds, device)
    optimizer = stepped.optimizers[name]
    refresh = time_refresh(name, stepped.model, device)
    peak, peak_method = peak_allocated_bytes(optimizer.step, device)
    benchmark.pedantic(synchronized(optimizer.step, device), rounds=pedantic_rounds,
                       warmup_rounds=0)
    measured = dict(medians=medians, bandwidth=bandwidth, refresh=refresh, peak=peak,
                    peak_method=peak_method, floor=floor_bytes(name, optimizer),
                    state=state_bytes(optimizer), n_params=counted_params(optimizer),
                    path=stepped.paths[name], first_step_s=stepped.first_step_s[name],
                    compiled=stepped.compiled_graphs[name] > 0)
    del optimizer  # the block frees the pair only when nothing else holds it
    return measured


@pytest.mark.benchmark(group="optimizer step")
@pytest.mark.parametrize("name", CANDIDATES)
def test_step_time(benchmark, record, device, profile, timed_model, name):
    model_name, rounds = timed_model["name"], timed_model["rounds"]
    if name in PEER_NAMES:
        require_profile(profile, peer_profile(name, model_name))
        hint = registry.missing_package(name)
        if hint is not None:
            pytest.skip(hint)
    reference = timed_model["reference"]
    foreach_ratio = reference["medians"][FOREACH] / reference["medians"][BASELINE]
    timed_shapes, shape_note, measured = model_name, None, None
    if name in REFERENCE_PAIR:  # timed already: step a fresh copy for the peak and pytest-benchmark
        with stepped_optimizers(timed_model["config"], (name,), device) as stepped:
            measured = measure_in(stepped, name, rounds, benchmark, device, pedantic_rounds=3,
                                  medians=reference["medians"], bandwidth=reference["bandwidth"])
        measured["first_step_s"] = reference["first_step_s"][name]
    else:
        with stepped_optimizers(timed_model["config"], (BASELINE, name), device) as stepped:
            step_s = seconds(stepped.optimizers[name].step, device)  # the first steady step
            if not over_budget(step_s, rounds) or model_name not in BUDGET_MODELS:
                measured = measure_in(stepped, name, rounds, benchmark, device,
                                      pedantic_rounds=1 if over_budget(step_s, rounds) else 3)
    if measured is None:  # timed on the budget shapes, against both AdamW forms there
        timed_shapes, budget_config = BUDGET_MODELS[model_name]
        with stepped_optimizers(budget_config, (BASELINE, FOREACH, name), device) as stepped:
            budget_step_s = seconds(stepped.optimizers[name].step, device)
            budget_rounds = fitted_rounds(budget_step_s, rounds)
            shape_note = (f"timed on {timed_shapes}: a step on {model_name} took {step_s:.1f} s, "
                          f"{rounds} rounds + {WARMUP_ROUNDS} warm-up would pass the "
                          f"{STEP_BUDGET_S:.0f} s budget; {budget_rounds} rounds here")
            measured = measure_in(stepped, name, budget_rounds, benchmark, device,
                                  pedantic_rounds=1)
        rounds = budget_rounds
    medians = measured["medians"]
    median, adamw_median = medians[name], medians[BASELINE]
    ratio = median / adamw_median
    # on the budget shapes foreach AdamW ran in the same rounds; else the reference pair's ratio
    ratio_to_foreach = median / medians[FOREACH] if FOREACH in medians else ratio / foreach_ratio
    refresh = measured["refresh"]
    amortized = median
    if refresh["refresh_interval"] is not None:
        amortized = median + (refresh["refresh_step_median_s"] - median) / refresh["refresh_interval"]
    record(StepRow(
        model=model_name, optimizer=name, peer=name in PEER_NAMES, timed_shapes=timed_shapes,
        shape_note=shape_note, n_params=measured["n_params"],
        interleaved_with=list(medians), interleaved_rounds=rounds,
        interleaved_median_s=median, adamw_median_s=adamw_median,
        ratio_to_adamw=ratio, ratio_to_adamw_foreach=ratio_to_foreach,
        first_step_s=measured["first_step_s"],
        compile_s=(measured["first_step_s"] - median) if measured["compiled"] else None,
        **refresh,
        refresh_ratio_to_adamw=(None if refresh["refresh_step_median_s"] is None
                                else refresh["refresh_step_median_s"] / adamw_median),
        amortized_median_s=amortized, amortized_ratio_to_adamw=amortized / adamw_median,
        state_bytes=measured["state"],
        inplace_add_s=medians["inplace_add"], bandwidth_bytes_per_s=measured["bandwidth"],
        floor_bytes=measured["floor"],
        fraction_of_floor=measured["floor"] / measured["bandwidth"] / median,
        step_peak_bytes=measured["peak"], step_peak_method=measured["peak_method"],
        **measured["path"], cpu_capability=torch.backends.cpu.get_cpu_capability()))


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
                "interleaved_median_s", "kernels", "peer", "amortized_ratio_to_adamw",
                "refresh_ratio_to_adamw", "compile_s", "shape_note")


def summarize(rows: list[dict]) -> dict:
    """``{model: {optimizer: {key: value for key in SUMMARY_KEYS}}}`` from the step rows."""
    steps = [r for r in rows if r["test"].startswith("test_step_time")]
    return {
        model: {r["optimizer"]: {k: r[k] for k in SUMMARY_KEYS}
                for r in steps if r["model"] == model}
        for model in sorted({r["model"] for r in steps})
    }
