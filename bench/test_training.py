"""Final loss on Tiny Shakespeare: nanoGPT's baby config trained with each optimizer.

Every run is ``memeff.train.train`` with the baby config and one row of
:data:`HPARAMS`; runs differ only in optimizer, its learning rate and weight decay, and
(for the GQA and MQA rows) ``n_kv_head``. Each seed is one row; the summary gives the mean
and spread (max - min) over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from bench.common import worker_pool
from memeff.optim.registry import OPTIMIZER_NAMES, REGISTRY
from memeff.sample import sample_text
from memeff.checkpoint import CHECKPOINT_NAME
from memeff.train import (RESULT_NAME, TrainConfig, TrainResult,
                          config_differences, train)

# Peak lr and weight decay per optimizer: the registry's settings tuned by the lr sweep
# (python -m bench.lr_sweep, results/cpu/lr_sweep.json); the schedule and everything else
# is nanoGPT's baby config.
HPARAMS = {name: dict(REGISTRY[name].tuned) for name in OPTIMIZER_NAMES}
# nanoGPT's own settings for the baby config, kept as rows so the earlier fork's table
# (which used them) compares like for like
NANOGPT_LR = dict(learning_rate=1e-3, weight_decay=0.1)


class Run(NamedTuple):
    optimizer: str
    n_kv_head: int | None  # None: n_head (MHA)
    dataset: str
    profiles: tuple[str, ...]  # the profiles that train it
    hparams: dict | None = None  # TrainConfig fields that differ from HPARAMS[optimizer]
    max_seeds: int | None = None  # at most this many of the profile's seeds


# quick trains every char row for 200 iterations; default, which must stay under 15
# minutes on a 2-core CPU (about 2.5 minutes per 2000-iteration run), trains only the
# three headline optimizers. The GPT-2 BPE rows are a suite of their own
# (bench/test_training_bpe.py) and train one seed: their 50257-way output layer makes an
# iteration 14x a char-level one on a CPU (989 vs 72 ms on this project's 2 cores).
EVERY, HEADLINE, FULL = ("quick", "default", "full"), ("quick", "full"), ("full",)
RUNS = {
    "adamw": Run("adamw", None, "char", EVERY),
    "adamsn": Run("adamsn", None, "char", EVERY),
    "adafactor": Run("adafactor", None, "char", EVERY),
    "adamsnsm": Run("adamsnsm", None, "char", HEADLINE),
    "torch_adafactor": Run("torch_adafactor", None, "char", HEADLINE),
    "adamw-gqa2": Run("adamw", 2, "char", HEADLINE),
    "adamw-mqa1": Run("adamw", 1, "char", HEADLINE),
    # the one change that helped AdamSN in the sweep's one-seed ablations (200 warmup
    # iterations instead of nanoGPT's 100), at 3 seeds and for AdamW too
    "adamw-warmup200": Run("adamw", None, "char", FULL, {"warmup_iters": 200}),
    "adamsn-warmup200": Run("adamsn", None, "char", FULL, {"warmup_iters": 200}),
    # the neighbours of AdamW's and AdamSN's tuned lr, at 3 seeds: the sweep chose each
    # from one seed, and its neighbours there were within 0.01
    "adamw-lr6e-3": Run("adamw", None, "char", FULL, {"learning_rate": 6e-3}),
    "adamw-lr1e-2": Run("adamw", None, "char", FULL, {"learning_rate": 1e-2}),
    "adamsn-lr3e-2": Run("adamsn", None, "char", FULL, {"learning_rate": 3e-2}),
    "adamsn-lr6e-2": Run("adamsn", None, "char", FULL, {"learning_rate": 6e-2}),
    "adamw-lr1e-3": Run("adamw", None, "char", FULL, NANOGPT_LR),
    "adamsn-lr1e-3": Run("adamsn", None, "char", FULL, NANOGPT_LR),
    "adafactor-lr1e-3": Run("adafactor", None, "char", FULL, NANOGPT_LR),
    "adamw-bpe": Run("adamw", None, "bpe", FULL, max_seeds=1),
    "adamsn-bpe": Run("adamsn", None, "bpe", FULL, max_seeds=1),
    "adafactor-bpe": Run("adafactor", None, "bpe", FULL, max_seeds=1),
}
# the text sample each run's first seed writes, from its final checkpoint (KV-cache generation)
SAMPLE = dict(prompt="ROMEO:", max_new_tokens=200, temperature=0.8, top_k=200, seed=1337)
ITERATIONS = {"quick": (200, 100), "default": (2000, 250), "full": (2000, 250)}  # iters, eval every


def suite_config(profile: str, dataset: str = "char") -> dict:
    max_iters, eval_interval = ITERATIONS[profile]
    return {"base": {k: v for k, v in vars(TrainConfig()).items()
                     if k not in ("out_dir", "resume", "seed", "optimizer_hparams")},
            "max_iters": max_iters, "eval_interval": eval_interval,
            "hparams": HPARAMS, "sample": SAMPLE,
            "runs": {label: {**run._asdict(), "hparams": hparams_of(run)}
                     for label, run in RUNS.items()
                     if profile in run.profiles and run.dataset == dataset}}


def hparams_of(run: Run) -> dict:
    return {**HPARAMS[run.optimizer], **(run.hparams or {})}


def seeds_of(run: Run, seeds: list[int]) -> list[int]:
    return seeds[:run.max_seeds] if run.max_seeds else seeds


def run_dir(runs_root: Path, label: str, seed: int) -> Path:
    return runs_root / label / f"seed-{seed}"


def config_of(label: str, seed: int, profile: str, device: torch.device,
              runs_root: Path) -> TrainConfig:
    """A run's config; it keeps its checkpoint and result under ``runs_root``."""
    run = RUNS[label]
    max_iters, eval_interval = ITERATIONS[profile]
    out_dir = str(run_dir(runs_root, label, seed))
    return TrainConfig(optimizer=run.optimizer, n_kv_head=run.n_kv_head, dataset=run.dataset,
                       seed=seed, max_iters=max_iters, eval_interval=eval_interval,
                       log_interval=eval_interval, device=device.type, out_dir=out_dir,
                       **hparams_of(run))


def train_or_resume(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg``, picking up what an earlier session left in its ``out_dir`` (with
    ``--runs-dir``): a finished run's result is reused, a checkpoint is resumed.

    The run's progress lines (one per evaluation) go to ``train.log`` in its ``out_dir``.
    """
    out = Path(cfg.out_dir)
    if (out / RESULT_NAME).is_file():
        saved = json.loads((out / RESULT_NAME).read_text(encoding="utf-8"))
        differences = config_differences(  # compared as JSON, as the result was saved
            saved["config"], json.loads(json.dumps(dataclasses.asdict(cfg))))
        if differences:
            raise ValueError(f"{out / RESULT_NAME} is a run with another configuration "
                             f"({differences}); remove {out} or use another --runs-dir")
        missing = [f.name for f in dataclasses.fields(TrainResult) if f.name not in saved]
        if missing:
            raise ValueError(f"{out / RESULT_NAME} was written by an older memeff and lacks "
                             f"{', '.join(missing)}; remove {out} to train the run again, "
                             f"or use another --runs-dir")
        return TrainResult(**saved)
    if (out / CHECKPOINT_NAME).is_file():
        cfg = dataclasses.replace(cfg, resume=True)
    out.mkdir(parents=True, exist_ok=True)
    progress = logging.FileHandler(out / "train.log", encoding="utf-8")
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("memeff.train")
    level = logger.level
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    try:
        return train(cfg)
    finally:
        logger.removeHandler(progress)
        logger.setLevel(level)
        progress.close()


def train_with_threads(cfg: TrainConfig, threads: int) -> TrainResult:
    """One run in a worker process, with its share of the CPU threads."""
    torch.set_num_threads(threads)
    return train_or_resume(cfg)


@pytest.fixture(scope="module")
def runs_root(request, tmp_path_factory) -> Path:
    """Where each run keeps its checkpoint and result: ``--runs-dir``, or a scratch dir."""
    chosen = request.config.getoption("--runs-dir")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("training")


def threads_per_job(jobs: int, workers: int, cores: int) -> list[int]:
    """Each job's share of the cores: ``cores // workers``, except for a last round with
    fewer jobs than workers (3 equal runs on 2 workers: the third runs alone, on both cores).
    """
    last_round = jobs % workers
    return [max(1, cores // (last_round if last_round and k >= jobs - last_round else workers))
            for k in range(jobs)]


@pytest.fixture(scope="module")
def parallel_runs(request, device, profile, seeds, runs_root):
    """With ``--train-workers N`` > 1: every selected run of the profile, submitted at once
    to N worker processes (longest first), as {(label, seed): (AsyncResult, torch threads)};
    else None.

    Losses do not depend on it beyond float rounding; each row's ms/iter and tokens/s are
    then those of a run sharing the CPU with N - 1 others (``concurrent_runs`` says so, and
    ``torch_threads`` gives the run's threads: see :func:`threads_per_job`).
    """
    workers = request.config.getoption("--train-workers")
    if workers == 1:
        yield None
        return
    labels = [item.callspec.params["label"] for item in request.session.items
              if item.module is request.module and profile in RUNS[item.callspec.params["label"]].profiles]
    jobs = [(label, seed) for label in labels for seed in seeds_of(RUNS[label], seeds)]
    jobs.sort(key=lambda job: RUNS[job[0]].dataset == "char")  # BPE runs are the long ones
    threads = threads_per_job(len(jobs), workers, torch.get_num_threads())
    with worker_pool(workers) as pool:  # every test has its results by the teardown
        yield {(label, seed): (pool.apply_async(train_with_threads, (
            config_of(label, seed, profile, device, runs_root), job_threads)), job_threads)
            for (label, seed), job_threads in zip(jobs, threads)}


@pytest.mark.benchmark(group="training")
@pytest.mark.parametrize("label", [label for label, run in RUNS.items() if run.dataset == "char"])
def test_training(benchmark, record, request, device, profile, seeds, label, runs_root,
                  parallel_runs):
    train_and_record(benchmark, record, request, device, profile, seeds, label, runs_root,
                     parallel_runs)


def train_and_record(benchmark, record, request, device, profile, seeds, label, runs_root,
                     parallel_runs):
    """Train ``label``'s seeds (or collect them from the worker pool) and record a row each."""
    run = RUNS[label]
    if profile not in run.profiles:
        pytest.skip(f"runs in the {' and '.join(run.profiles)} profiles: use --profile full")
    run_seeds = seeds_of(run, seeds)
    results, threads = [], []

    def run_all_seeds():
        for seed in run_seeds:
            if parallel_runs is None:
                results.append(train_or_resume(config_of(label, seed, profile, device, runs_root)))
                threads.append(torch.get_num_threads())
            else:
                pending, job_threads = parallel_runs[(label, seed)]
                results.append(pending.get())
                threads.append(job_threads)

    benchmark.pedantic(run_all_seeds, rounds=1, iterations=1)
    sample = sample_text(run_dir(runs_root, label, run_seeds[0]), device=device.type, **SAMPLE)[0]
    hparams = hparams_of(run)
    for seed, result, run_threads in zip(run_seeds, results, threads):
        assert result.final_val_loss < result.evals[0]["val_loss"], "training did not learn"
        record(label=label, optimizer=run.optimizer, n_head=result.config["n_head"],
               n_kv_head=run.n_kv_head or result.config["n_head"], dataset=run.dataset,
               seed=seed, max_iters=result.config["max_iters"],
               warmup_iters=result.config["warmup_iters"],
               learning_rate=hparams["learning_rate"], weight_decay=hparams["weight_decay"],
               optimizer_hparams=hparams.get("optimizer_hparams", {}), evals=result.evals,
               final_train_loss=result.final_train_loss, final_val_loss=result.final_val_loss,
               final_val_loss_whole_split=result.final_val_loss_whole_split,
               median_ms_per_iter=result.median_ms_per_iter, tokens_per_s=result.tokens_per_s,
               optimizer_state_bytes=result.optimizer_state_bytes, n_params=result.n_params,
               concurrent_runs=request.config.getoption("--train-workers"),
               torch_threads=run_threads, iters_timed=result.iters_run,
               sample=sample if seed == run_seeds[0] else None, median_s=None, rounds=None)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "n": len(values)}


def summarize(rows: list[dict]) -> dict:
    """Mean and spread over seeds per run (the whole-split val loss where the rows have it:
    results written before it existed do not)."""
    summary = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        keys = ["final_train_loss", "final_val_loss", "final_val_loss_whole_split",
                "median_ms_per_iter", "tokens_per_s"]
        summary[label] = {key: spread([r[key] for r in runs])
                          for key in keys if all(key in r for r in runs)}
        summary[label]["optimizer_state_bytes"] = runs[0]["optimizer_state_bytes"]
    return summary
