"""Train a GPT on Tiny Shakespeare: ``train(TrainConfig(...))`` or ``python -m memeff.train``.

The defaults are nanoGPT's "baby GPT" CPU run (4 layers, 4 heads, n_embd 128, block 64,
batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warmup iterations, beta2 0.99,
weight decay 0.1 on 2-D weights, grad clip 1.0, dropout 0, eval every 250 iterations).

Iteration ``it`` runs, in order: set the lr, evaluate and checkpoint (every
``eval_interval`` iterations and at ``max_iters``), forward/backward over
``grad_accum_steps`` micro-batches, clip, step, zero the gradients, log. The run ends
with the evaluation at ``max_iters``, after ``max_iters`` optimizer steps, and the final
model's loss over the whole val split (``split_loss``). A checkpoint
holds everything that decides the rest of the run (weights, optimizer state, the batch
generator and the global RNG), so resuming from iteration k reproduces an uninterrupted
run exactly.

``torchrun --standalone --nproc_per_node=N -m memeff.train ...`` trains with
DistributedDataParallel over N processes (gloo on CPU, nccl on CUDA, one GPU per process).
``batch_size`` is then each process's micro-batch: every micro-step, each rank draws the
global batch of ``batch_size * N`` sequences from the same seeded generator and keeps its
own contiguous slice, so N processes with ``batch_size`` B train on exactly the batches
of one process with ``batch_size`` N*B. Without dropout the losses then agree to float
rounding (with dropout they differ: rank r > 0 draws its masks from the seed ``seed + r``).
Gradients are all-reduced only in the last micro-step's backward. Rank 0 alone evaluates
(on global batches), logs and writes the checkpoint (which keeps every rank's RNG state)
and ``result.json``; the optimizer state is replicated on every rank. A single process
makes no collective calls.

``--parallel fsdp`` shards instead (FSDP2, :func:`memeff.distributed.shard_model`): each
rank holds 1/N of every weight, gradient and optimizer state along dim 0 (statistics that
span dim 0 whole), gathering a block's weights for its forward and backward only. The
batches, schedule, clipping and losses are those of DDP, and agree with one process as
DDP's do. Every rank evaluates (the forward is a collective) and writes its shards of a
checkpoint, the directory ``ckpt.dcp`` (``torch.distributed.checkpoint``), which resumes
with the same number of processes; ``memeff.sample`` reads it whole in one process.

A run stops at the first iteration whose loss, gradient norm or evaluation loss is not
finite, before the optimizer step or checkpoint that would keep it, and raises
:class:`TrainingDiverged` (the CLI: one line on stderr and exit status 3). Every rank stops
at the same iteration: under DDP each iteration all-reduces its loss and gradient norm (two
numbers), and rank 0 broadcasts its evaluation's losses. ``out_dir`` then keeps the
checkpoint of the last evaluation, whose weights and losses are finite, and gets no
``result.json``; resuming from it diverges again at the same iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from memeff import checkpoint as checkpoints
from memeff import cli, distributed
from memeff.checkpoint import CHECKPOINT_NAME
from memeff.data import DATASETS, Dataset, check_holds_a_window, get_batch, load_dataset
from memeff.memory import state_bytes
from memeff.model import GPT, GPTConfig
from memeff.io import directory_lock, write_json
from memeff.optim import build_optimizer
from memeff.optim.registry import REGISTRY, spec

log = logging.getLogger(__name__)

RESULT_NAME = "result.json"
EXIT_DIVERGED = 3  # the CLI's exit status when training diverged (2: bad input)
# fields that may differ between a checkpoint and the run that resumes it
RESUME_MAY_CHANGE = ("out_dir", "resume", "log_interval")
PARALLEL_MODES = ("ddp", "fsdp")


def _arg(default: Any, help: str, **kwargs) -> Any:
    """A TrainConfig field with its --help line."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# betas of the Adam family when --beta1/--beta2 are not given: nanoGPT's baby config
BABY_BETAS = (0.9, 0.99)


@dataclass
class TrainConfig:
    # data
    dataset: str = _arg("char", "tokens: characters (65 symbols) or GPT-2 BPE",
                        choices=DATASETS)
    # model
    n_layer: int = _arg(4, "transformer blocks")
    n_head: int = _arg(4, "query heads per attention layer")
    n_kv_head: int | None = _arg(None, "K/V heads (GQA); must divide --n-head "
                                       "(default: --n-head, i.e. MHA; 1 is MQA)")
    n_embd: int = _arg(128, "embedding width; must be a multiple of --n-head")
    block_size: int = _arg(64, "context length in tokens")
    dropout: float = _arg(0.0, "dropout probability")
    bias: bool = _arg(False, "biases in Linear and LayerNorm layers")
    # optimization
    optimizer: str = _arg("adamw", "optimizer, by its name in memeff.optim.registry",
                          choices=tuple(REGISTRY))
    optimizer_hparams: dict[str, Any] = _arg({}, "further optimizer settings as a JSON "
                                                 "object, e.g. '{\"eps\": 1e-10}'")
    batch_size: int = _arg(12, "sequences per micro-batch (per process under torchrun)")
    grad_accum_steps: int = _arg(1, "micro-batches per optimizer step")
    max_iters: int = _arg(2000, "optimizer steps")
    learning_rate: float = _arg(1e-3, "peak learning rate")
    min_lr: float | None = _arg(None, "lr at the end of the cosine (default: a tenth of "
                                      "--learning-rate, the ratio of nanoGPT's baby config)")
    warmup_iters: int = _arg(100, "iterations of linear lr warmup")
    lr_decay_iters: int | None = _arg(None, "iteration the cosine reaches --min-lr "
                                            "(default: --max-iters)")
    beta1: float | None = _arg(None, "first-moment decay: the Adam family's beta1 (default "
                                     "0.9), or our Adafactor's optional first moment")
    beta2: float | None = _arg(None, "the Adam family's second-moment decay (default 0.99); "
                                     "the Adafactors take none")
    weight_decay: float = _arg(0.1, "decoupled weight decay of the 2-D weights")
    grad_clip: float = _arg(1.0, "clip the gradient norm to this; 0 disables clipping")
    # evaluation, logging, checkpoints
    eval_interval: int = _arg(250, "iterations between evaluations (and checkpoints)")
    eval_iters: int = _arg(20, "batches per split in an evaluation")
    log_interval: int = _arg(100, "iterations between progress lines")
    seed: int = _arg(1337, "seed of the weights, batches and dropout")
    device: str = _arg("cpu", "cpu, cuda or cuda:N")
    parallel: str = _arg("ddp", "how torchrun's processes share the model: ddp (each holds "
                                "all weights and optimizer state) or fsdp (FSDP2: each holds "
                                "1/N of them)", choices=PARALLEL_MODES)
    out_dir: str | None = _arg(None, "directory for the checkpoint and result.json "
                                     "(default: write nothing)")
    resume: bool = _arg(False, "continue the run whose checkpoint is in --out-dir")

    def __post_init__(self):
        positive = ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters",
                    "log_interval")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_iters", "warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"TrainConfig.lr_decay_iters ({self.lr_decay_iters}) must exceed "
                             f"warmup_iters ({self.warmup_iters})")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{f.name} must be a finite number, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if self.min_lr is not None and self.min_lr < 0:
            raise ValueError(f"TrainConfig.min_lr must be >= 0, got {self.min_lr!r}")
        for name in ("weight_decay", "grad_clip", "dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"TrainConfig.parallel must be one of {', '.join(PARALLEL_MODES)}, "
                             f"got {self.parallel!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig.dataset must be one of {', '.join(DATASETS)}, "
                             f"got {self.dataset!r}")
        self.optimizer_settings()  # checks the optimizer's name and settings now
        if self.device_type() not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'cpu', 'cuda' or 'cuda:N', "
                             f"got {self.device!r}")
        cli.check_seed(self.seed, "TrainConfig.seed (--seed)")
        if self.resume and self.out_dir is None:
            raise ValueError("TrainConfig.resume needs out_dir, the directory holding the checkpoint")
        self.model_config(vocab_size=1)  # checks the model fields now, before any work

    def device_type(self) -> str | None:
        """``cpu`` or ``cuda`` (or another torch device type), or None if not a device string."""
        try:
            return torch.device(self.device).type
        except (RuntimeError, TypeError):
            return None

    def optimizer_settings(self) -> dict[str, Any]:
        """What ``build_optimizer`` gets besides the name, the model and the lr.

        --beta1/--beta2 become the Adam family's ``betas`` and our Adafactor's ``beta1``;
        an optimizer that takes neither refuses them, and so does ``optimizer_hparams``
        when it repeats a setting that has a flag of its own.
        """
        takes = spec(self.optimizer).settings()
        flagged = {"lr": "--learning-rate", "weight_decay": "--weight-decay",
                   "betas": "--beta1/--beta2", "beta1": "--beta1"}
        repeated = [key for key in self.optimizer_hparams if key in flagged]
        if repeated:
            raise ValueError(f"optimizer_hparams sets {', '.join(repeated)}; use "
                             f"{', '.join(flagged[key] for key in repeated)} instead")
        settings = dict(self.optimizer_hparams, weight_decay=self.weight_decay)
        if "betas" in takes:
            settings["betas"] = tuple(BABY_BETAS[i] if beta is None else beta
                                      for i, beta in enumerate((self.beta1, self.beta2)))
        else:
            for name in ("beta1", "beta2"):
                if getattr(self, name) is None:
                    continue
                if name not in takes:
                    raise ValueError(f"{self.optimizer} takes no {name} (its settings are "
                                     f"{', '.join(takes)}); leave --{name} out")
                settings[name] = getattr(self, name)
        spec(self.optimizer).check_settings(settings)
        return settings

    @property
    def final_lr(self) -> float:
        """The lr the cosine decays to: ``min_lr``, or a tenth of the peak when it is None."""
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                         n_embd=self.n_embd, block_size=self.block_size, vocab_size=vocab_size,
                         dropout=self.dropout, bias=self.bias)


class TrainingDiverged(ArithmeticError):
    """A loss or the gradient norm that is not finite stopped the run at ``iteration``.

    ``what`` names the value ("loss", "gradient norm", "evaluation's val loss", ...) and
    ``value`` is it (nan or inf; under DDP, summed over the ranks).
    """

    def __init__(self, iteration: int, what: str, value: float):
        super().__init__(iteration, what, value)  # as args, so that it pickles
        self.iteration, self.what, self.value = iteration, what, value

    def __str__(self) -> str:
        return (f"training diverged at iteration {self.iteration}: the {self.what} is "
                f"{self.value}; try a lower --learning-rate")


def _stop_unless_finite(iteration: int, values: dict[str, float]) -> None:
    """Raise :class:`TrainingDiverged` for the first of ``values`` (what -> value) not finite."""
    for what, value in values.items():
        if not math.isfinite(value):
            raise TrainingDiverged(iteration, what, value)


@dataclass
class TrainResult:
    config: dict[str, Any]
    n_params: int
    optimizer_state_bytes: int  # held by rank 0; under DDP every rank holds a full replica
    optimizer_state_bytes_per_rank: list[int]  # measured on each rank, in rank order
    world_size: int  # processes that trained (1 without torchrun)
    evals: list[dict[str, float]]  # {"iter", "train_loss", "val_loss"} per evaluation
    final_train_loss: float
    final_val_loss: float  # from the last evaluation: eval_iters batches, as nanoGPT
    final_val_loss_whole_split: float  # the final model over every token of the val split
    # over the optimizer steps this call ran (rank 0's); None when it ran none
    median_ms_per_iter: float | None
    tokens_per_s: float | None  # of the global batch: all ranks together
    iters_run: int  # optimizer steps this call ran (fewer than max_iters after a resume)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """The lr at iteration ``it`` over the peak: linear warmup, then cosine decay to
    ``cfg.final_lr`` at ``lr_decay_iters`` (nanoGPT's schedule)."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    final = cfg.final_lr / cfg.learning_rate
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return final
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return final + coeff * (1.0 - final)


def lr_at(it: int, cfg: TrainConfig) -> float:
    """The peak lr's schedule, as the optimizer's scheduler sets it."""
    return cfg.learning_rate * lr_factor(it, cfg)


@torch.no_grad()
def estimate_loss(model: GPT, data: Dataset, cfg: TrainConfig,
                  batch_size: int | None = None) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches per split; the same batches at every evaluation.

    Batches hold ``batch_size`` sequences (default ``cfg.batch_size``); under DDP rank 0
    evaluates the global batch, ``cfg.batch_size * world_size``.
    """
    batch_size = cfg.batch_size if batch_size is None else batch_size
    model.eval()
    losses = {}
    for split, ids in (("train", data.train), ("val", data.val)):
        generator = torch.Generator().manual_seed(cfg.seed)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = get_batch(ids, batch_size, cfg.block_size, generator)
            _, loss = model(x.to(cfg.device), y.to(cfg.device))
            total += loss.item()
        losses[split] = total / cfg.eval_iters
    model.train()
    return losses


@torch.no_grad()
def split_loss(model: GPT, ids: torch.Tensor, block_size: int, device: str | torch.device,
               batch_size: int = 64) -> float:
    """Mean next-token loss over a whole split, without sampling noise.

    The split is cut into consecutive, non-overlapping windows of ``block_size`` tokens,
    each predicting the tokens that follow it, so every token after the first is a target
    exactly once, at every position of a window in turn as random windows would place it
    (the tail too short for a window is left out). ``estimate_loss`` estimates the same
    mean from ``eval_iters`` random batches.
    """
    check_holds_a_window(ids, block_size)
    windows = (len(ids) - 1) // block_size
    inputs = ids[:windows * block_size].view(windows, block_size)
    targets = ids[1:windows * block_size + 1].view(windows, block_size)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, windows, batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * len(x)  # every window has block_size targets
    model.train(was_training)
    return total / windows


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The fields, other than :data:`RESUME_MAY_CHANGE`, in which two run configurations
    (as dicts) differ, as "name: saved X vs now Y, ..."; empty if they are the same run.
    A field the saved configuration lacks (one added since) counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return ", ".join(f"{name}: saved {saved.get(name, defaults.get(name))!r} vs now {value!r}"
                     for name, value in current.items()
                     if name not in RESUME_MAY_CHANGE
                     and saved.get(name, defaults.get(name)) != value)


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    details = config_differences(saved, asdict(cfg))
    if details:
        raise ValueError(f"cannot resume: the configuration differs from the checkpoint's "
                         f"({details}); use the same settings or another --out-dir")


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured and return the losses, timings and memory of the run.

    The global RNG (weight init, dropout) is seeded from ``cfg.seed`` inside a fork, so
    the caller's RNG state is left as it was and a run depends on its config alone.

    In a process that torchrun started with ``WORLD_SIZE`` > 1, this joins the process
    group (unless the caller already holds one) and leaves it on return or error; every
    rank returns the same result, with rank 0's timings and evaluations.
    """
    cli.check_device(cfg.device)
    if cfg.resume and not _checkpoint_path(cfg).exists():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {_checkpoint_path(cfg)}")
    with distributed.process_group(torch.device(cfg.device).type):
        device = distributed.local_device(torch.device(cfg.device))
        cuda_devices = [device] if device.type == "cuda" else []
        # rank 0 writes the run directory: it holds it for the run
        holds_out_dir = cfg.out_dir is not None and distributed.is_main()
        with (directory_lock(cfg.out_dir) if holds_out_dir else contextlib.nullcontext()), \
                torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
            return _train(cfg, device)


def _checkpoint_path(cfg: TrainConfig) -> Path:
    """``ckpt.pt``, or the ``ckpt.dcp`` directory of a sharded run, in ``cfg.out_dir``."""
    if cfg.parallel == "fsdp":
        return checkpoints.sharded_dir(cfg.out_dir)
    return Path(cfg.out_dir) / CHECKPOINT_NAME


def _train(cfg: TrainConfig, device: torch.device) -> TrainResult:
    rank, world_size = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    sharded = cfg.parallel == "fsdp"
    if sharded and world_size == 1:
        raise ValueError("--parallel fsdp shards the model over torchrun's processes; launch "
                         "with torchrun --nproc_per_node N (N >= 2), or train one process "
                         "without --parallel fsdp")
    checkpoint_path = _checkpoint_path(cfg) if cfg.out_dir else None
    checkpoint = None
    if checkpoint_path is not None and not cfg.resume:
        for existing in (Path(cfg.out_dir) / CHECKPOINT_NAME, checkpoints.sharded_dir(cfg.out_dir)):
            if existing.exists():
                raise ValueError(f"{existing} already exists; pass --resume to continue that "
                                 f"run, or choose another --out-dir")
    if cfg.resume:
        if is_main:
            checkpoints.remove_stale_temporaries(cfg.out_dir)
        if world_size > 1:
            dist.barrier()  # the others read the checkpoint rank 0 may have just restored
        # a sharded checkpoint's weights are read once the model is sharded, below
        checkpoint = (checkpoints.load_sharded_meta(cfg.out_dir) if sharded
                      else checkpoints.load(checkpoint_path))
        _check_resumable(checkpoint["train_config"], cfg)
        saved_world_size = checkpoint.get("world_size", 1)
        if saved_world_size != world_size:
            raise ValueError(f"cannot resume: the checkpoint was written by {saved_world_size} "
                             f"process(es) and this run has {world_size}; resume with "
                             f"--nproc_per_node={saved_world_size}, or use another --out-dir")
        result_path = Path(cfg.out_dir) / RESULT_NAME
        if checkpoint["iter"] >= cfg.max_iters and result_path.is_file():
            if is_main:
                log.info("%s holds a finished run: nothing to train", cfg.out_dir)
            return TrainResult(**json.loads(result_path.read_text(encoding="utf-8")))

    data = load_dataset(cfg.dataset)
    for split, ids in (("train", data.train), ("val", data.val)):  # before any work
        try:
            check_holds_a_window(ids, cfg.block_size)
        except ValueError:
            raise ValueError(f"--block-size {cfg.block_size} is too long for the {split} split, "
                             f"which holds {len(ids)} tokens (--dataset {cfg.dataset}); a window "
                             f"takes block_size + 1 of them: use --block-size {len(ids) - 1} "
                             f"or less") from None
    model = GPT(cfg.model_config(data.vocab_size)).to(device)
    if sharded:  # every rank shards the same initial weights (the same seed)
        distributed.shard_model(model, device.type)
    optimizer = build_optimizer(cfg.optimizer, model, lr=cfg.learning_rate,
                                **cfg.optimizer_settings())
    # every group's lr follows the schedule from its own peak (build_optimizer's group_hparams)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    if rank > 0:  # its own dropout masks; rank 0 continues the single-process stream
        torch.manual_seed((cfg.seed + rank) % 2**64)  # wraps past 2**64 - 1 as torch wraps -1
    batch_generator = torch.Generator().manual_seed(cfg.seed)  # the same on every rank
    evals: list[dict[str, float]] = []
    start_iter = 0
    if checkpoint is not None:
        if sharded:
            checkpoints.load_sharded_weights(cfg.out_dir, model, optimizer)
        else:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        batch_generator.set_state(checkpoint["batch_generator"])
        torch.set_rng_state(checkpoint["rng_states"][rank])  # dropout: one state per rank
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng_states"][rank], device)
        evals = list(checkpoint["evals"])
        start_iter = checkpoint["iter"]
        if is_main:
            log.info("resumed from %s at iteration %d", checkpoint_path, start_iter)
    # Constructing DDP is a collective, so every rank has passed the checks above before
    # rank 0 can write a checkpoint; it also broadcasts rank 0's weights. A sharded model
    # is its own data-parallel wrapper.
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    ) if world_size > 1 and not sharded else model
    # a sharded model's forward is a collective: every rank evaluates (the same batches)
    evaluates = is_main or sharded

    def save_checkpoint(it: int) -> None:
        rng_states = distributed.all_gather(torch.get_rng_state())  # a collective: all ranks
        cuda_rng_states = (distributed.all_gather(torch.cuda.get_rng_state(device))
                           if device.type == "cuda" else None)
        if not (is_main or sharded):
            return
        state = {
            "scheduler": scheduler.state_dict(),
            "iter": it,
            "train_config": asdict(cfg),
            "model_config": asdict(model.config),
            "dataset": cfg.dataset,
            "chars": data.chars,
            "evals": evals,
            "batch_generator": batch_generator.get_state(),
            "world_size": world_size,
            "rng_states": rng_states,
        }
        if cuda_rng_states is not None:
            state["cuda_rng_states"] = cuda_rng_states
        if sharded:  # a collective: every rank writes its shards
            checkpoints.save_sharded(cfg.out_dir, model, optimizer, state)
        else:
            checkpoints.save(checkpoint_path, {"model": model.state_dict(),
                                               "optimizer": optimizer.state_dict(), **state})

    global_batch_size = cfg.batch_size * world_size
    tokens_per_iter = global_batch_size * cfg.block_size * cfg.grad_accum_steps
    rank_rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    step_seconds: list[float] = []
    it = start_iter
    while True:
        due = it % cfg.eval_interval == 0 or it == cfg.max_iters
        if due and not (checkpoint is not None and it == start_iter):  # its eval is in evals
            # rank 0's losses reach every rank, so that on a NaN all stop
            losses = distributed.broadcast_from_main(
                estimate_loss(model, data, cfg, global_batch_size) if evaluates else None)
            # weights that overflow the forward stop here, before they are checkpointed
            _stop_unless_finite(it, {f"evaluation's {split} loss": loss
                                     for split, loss in losses.items()})
            evals.append({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]})
            if is_main:
                log.info("eval %d/%d: train loss %.4f, val loss %.4f", it, cfg.max_iters,
                         losses["train"], losses["val"])
            if checkpoint_path is not None:
                save_checkpoint(it)
        if it >= cfg.max_iters:
            break

        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # over the micro-steps
        for micro_step in range(cfg.grad_accum_steps):
            x, y = get_batch(data.train, global_batch_size, cfg.block_size, batch_generator)
            x, y = x[rank_rows], y[rank_rows]  # (batch_size, block_size): this rank's slice
            last = micro_step == cfg.grad_accum_steps - 1
            # the gradients are averaged over the ranks in the last micro-step's backward only
            if sharded:
                model.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or world_size == 1 or sharded \
                    else ddp_model.no_sync():
                _, loss = ddp_model(x.to(device), y.to(device))
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        # the norm before clipping; max_norm inf leaves the gradients as they are
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if sharded:  # the norm over every rank's shards, held by each
            grad_norm = grad_norm.full_tensor()
        health = torch.stack([loss_sum, grad_norm])
        if world_size > 1:  # the loss is each rank's own: one non-finite makes every sum so
            dist.all_reduce(health)
        loss_total, grad_norm_total = health.tolist()
        _stop_unless_finite(it, {"loss": loss_total, "gradient norm": grad_norm_total})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - t0)

        if it % cfg.log_interval == 0 and is_main:
            recent = statistics.median(step_seconds[-cfg.log_interval:])
            eta = recent * (cfg.max_iters - it - 1)
            log.info("iter %d/%d: loss %.4f, lr %.2e, %.1f ms/iter, %.0f s left", it,
                     cfg.max_iters, loss.item(), lr_at(it, cfg), 1000 * recent, eta)
        it += 1

    whole_split_val_loss = None
    if evaluates:
        whole_split_val_loss = split_loss(model, data.val, cfg.block_size, device)
    if is_main:
        log.info("final val loss over the whole val split (%d tokens): %.4f",
                 len(data.val), whole_split_val_loss)
    whole_split_val_loss = distributed.broadcast_from_main(whole_split_val_loss)
    _stop_unless_finite(cfg.max_iters, {"whole-split val loss": whole_split_val_loss})
    median_s = statistics.median(step_seconds) if step_seconds else None
    state_bytes_per_rank = distributed.all_gather(state_bytes(optimizer))
    result = TrainResult(
        config=asdict(cfg),
        n_params=model.num_params(),
        optimizer_state_bytes=state_bytes_per_rank[0],
        optimizer_state_bytes_per_rank=state_bytes_per_rank,
        world_size=world_size,
        evals=evals,
        final_train_loss=evals[-1]["train_loss"],
        final_val_loss=evals[-1]["val_loss"],
        final_val_loss_whole_split=whole_split_val_loss,
        median_ms_per_iter=None if median_s is None else 1000 * median_s,
        tokens_per_s=None if median_s is None else tokens_per_iter / median_s,
        iters_run=len(step_seconds),
    )
    if cfg.out_dir and is_main:
        write_json(Path(cfg.out_dir) / RESULT_NAME, result.to_dict())
    return result


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field, e.g. --n-kv-head for n_kv_head."""
    parser = cli.ArgumentParser(prog="python -m memeff.train",
                                description="Train a GPT on Tiny Shakespeare (nanoGPT's baby "
                                            "config by default).",
                                epilog=f"Exit status: 0 trained, 2 bad input, {EXIT_DIVERGED} "
                                       f"training diverged (a loss or gradient that is not "
                                       f"finite: --out-dir keeps the checkpoint of the last "
                                       f"evaluation and gets no {RESULT_NAME}).")
    types = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str,
             "float | None": float}
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + (["--lr"] if f.name == "learning_rate" else [])
        help_text = f.metadata["help"]
        if f.name == "optimizer_hparams":
            parser.add_argument(*flags, type=_json_object, default={}, help=help_text)
        elif f.type == "bool":
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{help_text} (default: {'on' if f.default else 'off'})")
        else:
            if f.default is not None:
                help_text += f" (default: {f.default})"
            parser.add_argument(*flags, type=types[f.type], default=f.default, help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    cfg = TrainConfig(**args)
    with distributed.process_group(torch.device(cfg.device).type):  # train() joins this one
        try:
            result = train(cfg)
        except TrainingDiverged as exc:  # an outcome, not bad input: every rank stopped here
            if distributed.is_main():
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        if distributed.is_main():
            summary = {k: v for k, v in result.to_dict().items() if k not in ("config", "evals")}
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
