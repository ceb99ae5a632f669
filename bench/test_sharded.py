"""Optimizers under FSDP2 (``fully_shard``) against one process: per-rank state and memory,
step time and its share in collectives, and whether the sharded steps equal one process's.

Each world size N (1 and 2 in every profile, 3 and 4 from ``default`` on) starts its N
processes once: gloo on the CPU, one thread each; nccl on CUDA, one GPU each (a world size
with more processes than GPUs is skipped, saying how to run it). N = 1 is one plain process
without FSDP. The optimizers are ours and torch's baselines (:data:`OPTIMIZERS`) and every
peer of the registry (:data:`PEERS`); a peer whose package is missing is skipped with the
install hint and never built in the ranks. In every process, for each optimizer:

1. A fresh model, sharded with :func:`memeff.distributed.shard_model` (each transformer
   block and the root one ``fully_shard`` unit) over all ranks, takes a training step on
   this rank's ``batch_per_rank`` sequences (forward, backward, gradient clipping at 1.0,
   optimizer step), which creates the state and says which code stepped it. The state this
   rank holds is counted live (``state_bytes``) and by the formula
   (``expected_state_bytes``; ``state_formula_holds`` says whether they agree, which is
   asserted for ours and recorded for the peers, whose formulas need not know what their
   packages keep of a DTensor). What a rank raises, here or later, is the row's ``error``
   (the first raised, with ``error_rank``; ``works`` false): see below. A second step
   gives the rank's peak memory (CPU: the process's peak resident set, ``VmHWM``, reset
   just before the step, after ``gc.collect`` and glibc's ``malloc_trim``; CUDA: the
   allocator's peak). A third, under ``torch.profiler``, the collective share: the part of
   the step's wall time during which any collective was in flight (the union of the
   intervals of gloo's ``gloo:*`` events on its worker threads, or of nccl's kernels),
   whether or not computation overlapped it, so it bounds from above the time collectives
   add.
2. Equivalence: a fresh sharded model and a plain one-process model from the same seed take
   ``equivalence_steps`` steps, the sharded one on each rank's sequences, rank 0's plain one
   on all of them (the global batch). ``max_param_rel_diff`` is the largest over parameters
   of ||sharded - one process|| / ||one process||; ``max_update_rel_diff`` the same over
   the change from the initial parameters, the stricter measure; ``micro_batch_rel_diff``
   the first for one process that accumulates the global batch over N micro-batches (each
   rank's sequences): what the order of summation alone changes. :func:`is_exact` says
   when a sharded run counts as exact.
3. Step time: the sharded step and the plain model's step on the same local batch (the
   one-process step of the same local size) are timed in turn in every rank
   (``bench.common.interleaved_medians``): ranks that share cores share them in both.
   ``step_time_ratio`` is the slowest rank's sharded median over the slowest rank's
   one-process median.

A rank whose optimizer raises writes what it raised and ends its process at once;
``mp.spawn`` then ends the other ranks wherever they are, in a collective the failed rank
will never enter too, so that no rank waits for :data:`TIMEOUT`, and fresh processes
measure the optimizers still to come, so that a failure never leaves a collective
half-entered for the next optimizer (:func:`run_world`). (A process group torn down in
the failed rank would not do: DTensor's caches and FSDP keep it, and its connections,
alive.) A peer whose step goes through
torch.compile (torchao) is stepped eagerly, as in the optimizer-state suite (the state is
the same; the compiled step is timed by the step-time suite); its row says so
(``eager_instead_of_compiled``).

The data are random tokens; the model's shape depends on the profile (:data:`MODELS`).
Rows (:class:`ShardedRow`) keep one value per rank where ranks differ, and each row's
``classification`` (:func:`classify`): ``exact``, ``runs but differs`` or ``fails``. The
summary says per optimizer how it fares under FSDP2 at each world size above 1 and at
worst.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from bench.common import (compiles, in_profile, interleaved_medians, missing_peer_packages,
                          observe_kernels, peak_allocated_bytes, peak_rss_bytes, require_profile,
                          synchronize)
from bench.results import FSDP_OUTCOMES
from memeff import GPT, GPTConfig, distributed
from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import build_optimizer
from memeff.optim.registry import PEER_NAMES, missing_package

BABY = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False)
# profile -> (model name, config, sequences per rank)
MODELS = {
    "quick": ("baby", BABY, 2),
    "default": ("baby", BABY, 2),
    # GPT-2's vocabulary (50257 rows: padded on 2 and 4 ranks) at a third of GPT-2 small's
    # width and depth: GPT-2 small takes ~4 s a step on one core, too long for 4 ranks on 2.
    # No biases: the key bias's gradient is zero in exact arithmetic, and Adam and Adafactor
    # turn its rounding noise, which differs with any change of summation order (sharded or
    # not), into whole steps, which would hide how exact the sharded step is elsewhere
    "full": ("gpt2-bpe-4L-256", GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64,
                                          vocab_size=50257, bias=False), 2),
}
WORLD_SIZES = {1: "quick", 2: "quick", 3: "default", 4: "default"}  # -> the profile that runs it
OPTIMIZERS = ("adamw", "adamsn", "adamsnsm", "adafactor", "torch_adafactor")
PEERS = PEER_NAMES  # measured beside ours where their packages are installed
NAMES = OPTIMIZERS + PEERS
# a row's classification (classify), from best to worst
EXACT_OUTCOME, DIFFERS, FAILS = OUTCOMES = FSDP_OUTCOMES
HPARAMS = dict(lr=1e-3, weight_decay=0.1)
MODEL_SEED = 0  # every model, sharded or not, starts from the same parameters
GRAD_CLIP = 1.0
EQUIVALENCE_STEPS = 3
ROUNDS = {"quick": 3, "default": 4, "full": 4}
# a sharded run is exact when its max_param_rel_diff is at most EXACT, or at most
# ROUNDING_FACTOR times what splitting the batch into micro-batches changes in one process
# (Adam's per-element normalization scales the rounding of gradients near zero up to
# lr-sized steps: AdamW on the full model's 4 micro-batches differs by ~6e-6)
EXACT = 1e-5
ROUNDING_FACTOR = 10
# every rank, and the one-process step it is compared with, on one thread: ranks do not
# compete for cores while there are enough, and a rank's step is not held up by a thread
# of its own waiting for a core (two threads in one process on a busy 2-core machine)
THREADS_PER_RANK = 1
# a rank left waiting on a collective fails instead of hanging; a rank that raises does not
# leave the others waiting this long (run_world)
TIMEOUT = timedelta(minutes=5)
RSS_METHOD = ("cpu VmHWM: the rank process's peak resident set during the step, reset just "
              "before it (after gc.collect and malloc_trim)")
COLLECTIVE_METHOD = ("union of the intervals of torch.profiler's collective events (gloo:* "
                     "on gloo's threads, nccl kernels on CUDA) over the step's wall time; "
                     "overlap with computation included")
STEP_EVENT = "memeff::sharded_step"
# the steps are timed in the ranks' processes, not by pytest-benchmark in this one
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


@dataclasses.dataclass
class ShardedRow:
    """One optimizer at one world size; lists hold one value per rank, in rank order."""
    model: str
    n_params: int
    optimizer: str
    world_size: int
    backend: str  # gloo, nccl, or "none" (one plain process)
    batch_per_rank: int
    block_size: int
    threads_per_rank: int
    cpu_cores: int  # the ranks share them when world_size * threads_per_rank is larger
    works: bool
    error: str | None  # the first line of what the first sharded step raised
    kernels: str | None  # which code stepped the parameters: bench.common.observe_kernels
    state_bytes_per_rank: list[int] | None  # live tensors
    analytic_state_bytes_per_rank: list[int] | None  # expected_state_bytes
    before_step_bytes_per_rank: list[int | None] | None
    step_peak_bytes_per_rank: list[int | None] | None
    step_peak_method: str | None
    collective_share_per_rank: list[float] | None
    collective_method: str
    interleaved_rounds: int
    step_median_s_per_rank: list[float] | None
    one_process_median_s_per_rank: list[float] | None  # the same local batch, no sharding
    step_time_ratio: float | None  # max of the first over max of the second
    equivalence_steps: int
    max_param_rel_diff: float | None
    max_update_rel_diff: float | None
    micro_batch_rel_diff: float | None  # max_param_rel_diff of one process's micro-batches
    # (with defaults: added after the first published rows)
    peer: bool = False  # an optimizer from another package (registry.PEER_NAMES)
    error_rank: int | None = None  # the rank that raised ``error`` first
    state_formula_holds: bool | None = None  # live state == formula on every rank
    classification: str | None = None  # classify(): exact, runs but differs, fails
    eager_instead_of_compiled: bool = False  # a torch.compile'd step, stepped eagerly here
    measure_s: float | None = None  # rank 0's wall time for all of this row's work


def suite_config(profile: str) -> dict:
    name, config, batch = MODELS[profile]
    world_sizes = [n for n, needed in WORLD_SIZES.items()
                   if in_profile(profile, needed)]
    return {"model": name, "model_config": vars(config), "batch_per_rank": batch,
            "world_sizes": world_sizes, "optimizers": list(OPTIMIZERS),
            "peers": list(PEERS), "peers_measured": [n for n in PEERS if n in measured_names()],
            "peer_packages_missing": missing_peer_packages(),
            "hparams": HPARAMS, "model_seed": MODEL_SEED, "grad_clip": GRAD_CLIP,
            "equivalence_steps": EQUIVALENCE_STEPS, "rounds": ROUNDS[profile],
            "exact_tolerance": EXACT, "exact_rounding_factor": ROUNDING_FACTOR,
            "data": "uniform random tokens, generator seeded per step"}


def measured_names() -> list[str]:
    """The optimizers the ranks build: ours, and each peer whose package is installed."""
    missing = missing_peer_packages()
    return [name for name in NAMES if name not in missing]


# ---- in each rank -----------------------------------------------------------------------

def _train_step(model, optimizer, x, y, micro_batches: int = 1) -> None:
    for x_part, y_part in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        _, loss = model(x_part, y_part)
        (loss / micro_batches).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _build(name: str, config: GPTConfig, device: torch.device, shard: bool,
           build: Callable = build_optimizer):
    torch.manual_seed(MODEL_SEED)
    model = GPT(config).to(device)
    if shard:
        distributed.shard_model(model, device.type)
    return model, build(name, model, **HPARAMS)


def _global_batches(config: GPTConfig, sequences: int, steps: int) -> list[tuple]:
    """The same ``steps`` batches of ``sequences`` random sequences in every process."""
    batches = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        xy = torch.randint(config.vocab_size, (2, sequences, config.block_size),
                           generator=generator)
        batches.append((xy[0], xy[1]))
    return batches


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the system, so the resident set is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peak_memory(step, device: torch.device) -> tuple[int | None, int | None, str]:
    """(bytes held before ``step``, peak bytes while it ran, how they were measured)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        growth, method = peak_allocated_bytes(step, device)
        return before, before + growth, method
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS
        before = _status_bytes("VmRSS")
    except (OSError, KeyError):
        step()
        return None, peak_rss_bytes()["self"], ("cpu ru_maxrss: the process's peak resident "
                                                "set over its life (VmHWM cannot be reset here)")
    step()
    return before, _status_bytes("VmHWM"), RSS_METHOD


def _is_collective(event) -> bool:
    if event.name.startswith("gloo:"):
        return True
    return event.device_type == torch.autograd.DeviceType.CUDA and "nccl" in event.name.lower()


def collective_share(step, device: torch.device) -> float:
    """The part of ``step``'s wall time during which a collective was in flight."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(STEP_EVENT):
            step()
            synchronize(device)
    events = prof.events()
    whole = next(e.time_range for e in events if e.name == STEP_EVENT)
    busy, covered = 0.0, whole.start  # the union of the intervals, clipped to the step
    for start, end in sorted((e.time_range.start, e.time_range.end)
                             for e in events if _is_collective(e)):
        start, end = max(start, covered), min(end, whole.end)
        if end > start:
            busy += end - start
            covered = end
    return busy / (whole.end - whole.start)


def _differences(sharded, plain, initial: dict) -> tuple[float, float]:
    """Largest relative difference of a parameter, and of its change, from one process's."""
    from torch.distributed.tensor import DTensor

    worst_param = worst_update = 0.0
    tiny = torch.finfo(torch.float32).tiny
    expected = dict(plain.named_parameters())
    for key, p in sharded.named_parameters():
        got = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        want = expected[key].detach()
        gap = (got - want).norm().item()
        worst_param = max(worst_param, gap / max(want.norm().item(), tiny))
        worst_update = max(worst_update, gap / max((want - initial[key]).norm().item(), tiny))
    return worst_param, worst_update


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _analytic_state_bytes(name: str, optimizer) -> int | None:
    """``expected_state_bytes``, or None where a peer's formula cannot count a DTensor
    (ours must: their error is the rank's)."""
    try:
        return expected_state_bytes(optimizer)
    except Exception:  # noqa: BLE001 - a peer's row records that its formula does not hold
        if name in OPTIMIZERS:
            raise
        return None


def measure(name: str, config: GPTConfig, batch: int, rounds: int, device: torch.device,
            build: Callable = build_optimizer) -> dict:
    """This rank's measurements of optimizer ``name`` (see the module docstring)."""
    world_size, rank = distributed.world_size(), distributed.rank()
    batches = _global_batches(config, batch * world_size, EQUIVALENCE_STEPS)
    mine = slice(rank * batch, (rank + 1) * batch)
    x, y = (t[mine].to(device) for t in batches[0])

    model, optimizer = _build(name, config, device, world_size > 1, build)
    step = partial(_train_step, model, optimizer, x, y)
    result = {"kernels": observe_kernels(optimizer, step, device)["kernels"],  # creates the state
              "state_bytes": state_bytes(optimizer),
              "analytic_state_bytes": _analytic_state_bytes(name, optimizer)}
    result["before_step_bytes"], result["step_peak_bytes"], result["step_peak_method"] = (
        step_peak_memory(step, device))
    result["collective_share"] = collective_share(step, device)
    del model, optimizer, step

    # rank 0's plain model is the one-process run on the global batch; the other ranks'
    # step their own sequences (they are only timed)
    plain, plain_optimizer = _build(name, config, device, False, build)
    initial = {k: p.detach().clone() for k, p in plain.named_parameters()}
    model, optimizer = _build(name, config, device, world_size > 1, build)
    reference = slice(None) if rank == 0 else mine
    for bx, by in batches:
        _train_step(plain, plain_optimizer, bx[reference].to(device), by[reference].to(device))
        _train_step(model, optimizer, bx[mine].to(device), by[mine].to(device))
    differences = _differences(model, plain, initial)  # gathers the shards: every rank takes part
    if rank == 0:
        result["max_param_rel_diff"], result["max_update_rel_diff"] = differences
        # what the order of summation alone changes: one process, the same global batch
        # accumulated over world_size micro-batches (each rank's sequences)
        accumulated, accumulated_optimizer = _build(name, config, device, False, build)
        for bx, by in batches:
            _train_step(accumulated, accumulated_optimizer, bx.to(device), by.to(device),
                        micro_batches=world_size)
        result["micro_batch_rel_diff"] = _differences(accumulated, plain, initial)[0]
        del accumulated, accumulated_optimizer
    del initial

    medians = interleaved_medians(
        {"sharded": partial(_train_step, model, optimizer, x, y),
         "one_process": partial(_train_step, plain, plain_optimizer, x, y)}, rounds, device,
        warmup=1)  # both have taken their equivalence steps
    result["step_median_s"], result["one_process_median_s"] = (medians["sharded"],
                                                               medians["one_process"])
    return result


def _write_json(path: Path, value) -> None:
    """Whole or not at all: a rank may be ended while it writes."""
    partial_path = path.with_suffix(".partial")
    partial_path.write_text(json.dumps(value))
    os.replace(partial_path, path)


def _rank_main(rank: int, world_size: int, device_type: str, names: list[str],
               config: GPTConfig, batch: int, rounds: int, threads: int, out: str,
               build: Callable) -> None:
    """Measure ``names`` in turn, each into ``out/rank<rank>.<name>.json``. The first that
    raises is written to ``out/failure<rank>.json`` and ends this process at once (see
    :func:`run_world`)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(distributed.BACKENDS[device_type],
                                init_method=f"file://{out}/rendezvous", rank=rank,
                                world_size=world_size, timeout=TIMEOUT)
    for name in names:
        started = time.perf_counter()
        try:
            # torch.compile'd steps run eagerly here (see the module docstring)
            with (torch.compiler.set_stance("force_eager") if name in PEERS and compiles(name)
                  else contextlib.nullcontext()):
                result = measure(name, config, batch, rounds, device, build)
        except Exception as exc:  # noqa: BLE001 - an optimizer that fails sharded is a result
            _write_json(Path(out) / f"failure{rank}.json",
                        {"optimizer": name, "error": _first_line(exc), "error_rank": rank,
                         "failed_at": time.time()})  # one clock: the ranks share a machine
            os._exit(1)  # no teardown: its connections close, mp.spawn ends the other ranks
        result["measure_s"] = time.perf_counter() - started
        _write_json(Path(out) / f"rank{rank}.{name}.json", result)
    if world_size > 1:
        dist.destroy_process_group()


def run_world(world_size: int, device_type: str, names: list[str], config: GPTConfig,
              batch: int, rounds: int, make_dir: Callable[[], Path],
              build: Callable = build_optimizer) -> dict[str, list[dict]]:
    """Every rank's measurements of each optimizer of ``names`` in runs of ``world_size``
    processes: optimizer name -> one dict per rank, in rank order.

    A rank whose optimizer raises ends its process at once; mp.spawn then ends the others,
    wherever they are (in a collective that rank never enters, too), so no rank waits for
    :data:`TIMEOUT`. The optimizer's row is the failure the ranks wrote first (``error``,
    ``error_rank``), or how a rank ended without writing one (a crash). Fresh processes
    (each run in a new ``make_dir()``) measure the optimizers still to come, so one
    optimizer's failure never touches the next one's measurements.
    """
    measured: dict[str, list[dict]] = {}
    remaining = list(names)
    while remaining:
        out = make_dir()
        crash = None
        try:
            mp.spawn(_rank_main, args=(world_size, device_type, remaining, config, batch,
                                       rounds, THREADS_PER_RANK, str(out), build),
                     nprocs=world_size, join=True)
        except ProcessException as ended:  # a rank failed (or crashed)
            crash = ended
        while remaining and all((out / f"rank{r}.{remaining[0]}.json").exists()
                                for r in range(world_size)):
            name = remaining.pop(0)
            measured[name] = [json.loads((out / f"rank{r}.{name}.json").read_text())
                              for r in range(world_size)]
        if crash is None or not remaining:
            continue
        failures = [json.loads(f.read_text()) for f in out.glob("failure*.json")]
        name = remaining.pop(0)  # the one the ranks were measuring
        if failures:
            first = min(failures, key=lambda f: f["failed_at"])
            failure = {"error": first["error"], "error_rank": first["error_rank"]}
        else:  # the last line of a traceback, or "process N terminated with signal S"
            lines = str(crash).strip().splitlines() or [type(crash).__name__]
            failure = {"error": lines[-1], "error_rank": crash.error_index}
        measured[name] = [{**failure} for _ in range(world_size)]
    return measured


# ---- in pytest's process ----------------------------------------------------------------

def selected_names(items, world_size: int) -> list[str]:
    """The optimizers whose test_sharded rows at ``world_size`` are among ``items`` (what
    pytest runs, after ``-k``), in :func:`measured_names`' order."""
    selected = {item.callspec.params["name"] for item in items
                if getattr(item, "originalname", None) == "test_sharded"
                and item.callspec.params["world_size"] == world_size}
    return [name for name in measured_names() if name in selected]


@pytest.fixture(scope="module")
def world(device, profile, tmp_path_factory, request):
    """``world(n)``: every rank's measurements of each selected optimizer in runs of n
    processes (:func:`run_world`), started on first use."""
    runs: dict[int, dict[str, list[dict]]] = {}

    def results(world_size: int) -> dict[str, list[dict]]:
        if world_size not in runs:
            _, config, batch = MODELS[profile]
            runs[world_size] = run_world(
                world_size, device.type, selected_names(request.session.items, world_size),
                config, batch, ROUNDS[profile],
                lambda: tmp_path_factory.mktemp(f"world{world_size}"))
        return runs[world_size]

    return results


def n_params(config: GPTConfig) -> int:
    return GPT(config).num_params(non_embedding=False)


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def per_rank(ranks: list[dict], key: str) -> list | None:
    return [r[key] for r in ranks] if all(key in r for r in ranks) else None


@pytest.mark.benchmark(group="sharded")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"N{n}")
def test_sharded(record, device, profile, world, world_size, name):
    require_profile(profile, WORLD_SIZES[world_size])
    if not dist.is_available():
        pytest.skip("this torch is built without torch.distributed")
    hint = missing_package(name) if name in PEERS else None
    if hint is not None:
        pytest.skip(hint)
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} processes need {world_size} GPUs, torch sees "
                    f"{torch.cuda.device_count()}: run python -m pytest bench/test_sharded.py "
                    f"--benchmark-only --device cuda on a machine with {world_size} or more")
    ranks = world(world_size)[name]
    errors = [r["error"] for r in ranks if r.get("error")]  # run_world: all ranks or none
    model_name, config, batch = MODELS[profile]
    works = not errors
    steps, one_process = per_rank(ranks, "step_median_s"), per_rank(ranks, "one_process_median_s")
    live = per_rank(ranks, "state_bytes")
    analytic = per_rank(ranks, "analytic_state_bytes")
    row = ShardedRow(
        model=model_name, n_params=n_params(config),
        optimizer=name, world_size=world_size,
        backend=distributed.BACKENDS[device.type] if world_size > 1 else "none",
        batch_per_rank=batch, block_size=config.block_size,
        threads_per_rank=THREADS_PER_RANK, cpu_cores=cpu_cores(),
        works=works, error=errors[0] if errors else None,
        kernels=ranks[0]["kernels"] if works else None,
        state_bytes_per_rank=live,
        analytic_state_bytes_per_rank=None if analytic is None or None in analytic else analytic,
        before_step_bytes_per_rank=per_rank(ranks, "before_step_bytes"),
        step_peak_bytes_per_rank=per_rank(ranks, "step_peak_bytes"),
        step_peak_method=ranks[0]["step_peak_method"] if works else None,
        collective_share_per_rank=per_rank(ranks, "collective_share"),
        collective_method=COLLECTIVE_METHOD, interleaved_rounds=ROUNDS[profile],
        step_median_s_per_rank=steps, one_process_median_s_per_rank=one_process,
        step_time_ratio=max(steps) / max(one_process) if works else None,
        equivalence_steps=EQUIVALENCE_STEPS,
        max_param_rel_diff=ranks[0].get("max_param_rel_diff"),
        max_update_rel_diff=ranks[0].get("max_update_rel_diff"),
        micro_batch_rel_diff=ranks[0].get("micro_batch_rel_diff"),
        peer=name in PEERS, error_rank=ranks[0].get("error_rank"),
        state_formula_holds=live == analytic if works else None,
        eager_instead_of_compiled=compiles(name), measure_s=ranks[0].get("measure_s"))
    row.classification = classify(dataclasses.asdict(row))
    record(row)
    if works and not row.peer:  # ours: a formula that disagrees with the live tensors is a
        # bug; a peer's need not know what its package keeps of a DTensor: the row says
        assert row.state_bytes_per_rank == row.analytic_state_bytes_per_rank


def is_exact(row: dict) -> bool:
    """Whether a row's sharded run is as close to one process as rounding explains."""
    return row["max_param_rel_diff"] <= max(EXACT, ROUNDING_FACTOR * row["micro_batch_rel_diff"])


def classify(row: dict) -> str:
    """``fails`` (it raised: the row's ``error``), ``exact`` (:func:`is_exact`) or ``runs but
    differs`` (it steps, further from one process than rounding explains)."""
    if not row["works"]:
        return FAILS
    return EXACT_OUTCOME if is_exact(row) else DIFFERS


DIFFERENCES = ("max_param_rel_diff", "max_update_rel_diff", "micro_batch_rel_diff")


def summarize(rows: list[dict]) -> dict:
    """Per optimizer, over its sharded rows (world size > 1): ``classification``, the worst
    of :func:`classify` over them (in :data:`OUTCOMES`' order); ``works`` (at every world
    size), ``exact`` (and :func:`is_exact` at each), the first ``error``, the largest of
    each of :data:`DIFFERENCES` (None where it fails), the ``world_sizes``, and
    ``by_world_size``: per row, its world size, classification, error, the differences and
    ``state_formula_holds``."""
    summary: dict[str, dict] = {}
    for r in rows:
        if r["world_size"] == 1:
            continue
        entry = summary.setdefault(r["optimizer"], {
            "classification": EXACT_OUTCOME, "works": True, "exact": True, "error": None,
            **dict.fromkeys(DIFFERENCES, 0.0), "world_sizes": [], "by_world_size": []})
        outcome = classify(r)
        entry["classification"] = max(entry["classification"], outcome, key=OUTCOMES.index)
        entry["world_sizes"].append(r["world_size"])
        entry["by_world_size"].append({
            "world_size": r["world_size"], "classification": outcome, "error": r["error"],
            **{key: r[key] for key in DIFFERENCES},
            "state_formula_holds": r.get("state_formula_holds")})
        if not r["works"]:
            entry.update(works=False, exact=False, error=entry["error"] or r["error"],
                         **dict.fromkeys(DIFFERENCES))
        elif entry["works"]:
            entry.update({key: max(entry[key], r[key]) for key in DIFFERENCES})
            entry["exact"] = entry["exact"] and is_exact(r)
    return summary
