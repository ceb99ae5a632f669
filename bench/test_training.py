"""Final loss on Tiny Shakespeare: nanoGPT's baby config trained with each optimizer.

Every run is a row of :data:`RUNS`, trained by :mod:`bench.experiments` from the baby
config: runs differ only in optimizer, its learning rate and weight decay (its tuned
settings unless the row says otherwise), and for some rows ``n_kv_head`` (GQA, MQA), the
warmup or the tokens. Each seed is one row of the results; the summary gives the mean and
spread (max - min) over seeds.

The rows with GPT-2's BPE tokens and the peers' rows (optimizers from other packages) are
suites of their own, ``bench/test_training_bpe.py`` and ``bench/test_training_peers.py``
(:func:`suite_of`), trained the same way from the same :data:`RUNS`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.experiments import Diverged, Driver, Run, plan
from memeff.optim.registry import OPTIMIZER_NAMES, PEER_NAMES, REGISTRY, missing_package
from memeff.sample import sample_text
from memeff.train import TrainConfig

# Peak lr and weight decay per optimizer: the registry's settings tuned by the lr sweep
# (python -m bench.lr_sweep); the schedule and everything else is nanoGPT's baby config.
HPARAMS = {name: dict(REGISTRY[name].tuned) for name in OPTIMIZER_NAMES + PEER_NAMES}
# nanoGPT's own settings for the baby config, kept as rows so the earlier fork's table
# (which used them) compares like for like
NANOGPT_LR = dict(learning_rate=1e-3, weight_decay=0.1)
# fields of a run's settings that the results list apart from its hparams
MODEL_AND_DATA = ("n_kv_head", "dataset")


def tuned(name: str, optimizer: str, profiles: tuple[str, ...], max_seeds: int | None = None,
          **changes) -> Run:
    """A run at ``optimizer``'s tuned settings, with ``changes`` (TrainConfig fields) over them."""
    return Run(name, optimizer, {**HPARAMS[optimizer], **changes}, profiles, max_seeds)


# quick trains every char row for 200 iterations; default, which must stay under 15
# minutes on a 2-core CPU, trains only the three headline optimizers. The GPT-2 BPE rows
# are a suite of their own (bench/test_training_bpe.py) and train one seed: their
# 50257-way output layer makes an iteration many times a char-level one on a CPU.
EVERY, HEADLINE, FULL = ("quick", "default", "full"), ("quick", "full"), ("full",)
RUNS = {run.name: run for run in (
    tuned("adamw", "adamw", EVERY),
    tuned("adamsn", "adamsn", EVERY),
    tuned("adafactor", "adafactor", EVERY),
    tuned("adamsnsm", "adamsnsm", HEADLINE),
    tuned("torch_adafactor", "torch_adafactor", HEADLINE),
    tuned("adamw-gqa2", "adamw", HEADLINE, n_kv_head=2),
    tuned("adamw-mqa1", "adamw", HEADLINE, n_kv_head=1),
    # 200 warmup iterations instead of nanoGPT's 100 (an AdamSN ablation of the lr sweep),
    # at 3 seeds and for AdamW too
    tuned("adamw-warmup200", "adamw", FULL, warmup_iters=200),
    tuned("adamsn-warmup200", "adamsn", FULL, warmup_iters=200),
    # the neighbours of AdamW's and AdamSN's tuned lr, at 3 seeds (the sweep trains one)
    tuned("adamw-lr6e-3", "adamw", FULL, learning_rate=6e-3),
    tuned("adamw-lr1e-2", "adamw", FULL, learning_rate=1e-2),
    tuned("adamsn-lr3e-2", "adamsn", FULL, learning_rate=3e-2),
    tuned("adamsn-lr6e-2", "adamsn", FULL, learning_rate=6e-2),
    tuned("adamw-lr1e-3", "adamw", FULL, **NANOGPT_LR),
    tuned("adamsn-lr1e-3", "adamsn", FULL, **NANOGPT_LR),
    tuned("adafactor-lr1e-3", "adafactor", FULL, **NANOGPT_LR),
    tuned("adamw-bpe", "adamw", FULL, max_seeds=1, dataset="bpe"),
    tuned("adamsn-bpe", "adamsn", FULL, max_seeds=1, dataset="bpe"),
    tuned("adafactor-bpe", "adafactor", FULL, max_seeds=1, dataset="bpe"),
    # the peers at the best point of their lr sweep
    *(tuned(name, name, HEADLINE) for name in PEER_NAMES),
)}
# the text sample each run's first seed writes, from its final checkpoint (KV-cache generation)
SAMPLE = dict(prompt="ROMEO:", max_new_tokens=200, temperature=0.8, top_k=200, seed=1337)
ITERATIONS = {"quick": (200, 100), "default": (2000, 250), "full": (2000, 250)}  # iters, eval every


def dataset_of(run: Run) -> str:
    return run.settings.get("dataset", TrainConfig.dataset)


def suite_of(run: Run) -> str:
    """The suite that trains ``run``: ``training_bpe`` for GPT-2 BPE tokens (each run over
    half an hour on a CPU), ``training_peers`` for another package's optimizer (installed
    with the ``peers`` extra), ``training`` for the rest; each publishes on its own."""
    if dataset_of(run) == "bpe":
        return "training_bpe"
    return "training_peers" if REGISTRY[run.optimizer].package is not None else "training"


def not_trainable(run: Run) -> str | None:
    """Why ``run`` cannot train here (its package is missing, or its optimizer has no swept
    lr yet: it would train at an lr nobody chose), or None."""
    hint = missing_package(run.optimizer)
    if hint:
        return hint
    if "learning_rate" not in HPARAMS[run.optimizer]:
        return (f"{run.optimizer} has no tuned lr yet: sweep it (python -m bench.lr_sweep "
                f"--optimizers {run.optimizer}) and set its tuned settings in "
                f"memeff/optim/registry.py")
    return None


def hparams_of(run: Run) -> dict:
    """The run's settings other than the model and the data: its optimizer's, and the
    schedule's where it changes them."""
    return {k: v for k, v in run.settings.items() if k not in MODEL_AND_DATA}


def base_config(profile: str, device: torch.device) -> TrainConfig:
    """The baby config at the profile's length, with a progress line at every evaluation."""
    max_iters, eval_interval = ITERATIONS[profile]
    return TrainConfig(max_iters=max_iters, eval_interval=eval_interval,
                       log_interval=eval_interval, device=device.type)


def suite_config(profile: str, suite: str = "training") -> dict:
    max_iters, eval_interval = ITERATIONS[profile]
    return {"base": {k: v for k, v in vars(TrainConfig()).items()
                     if k not in ("out_dir", "resume", "seed", "optimizer_hparams")},
            "max_iters": max_iters, "eval_interval": eval_interval,
            "hparams": HPARAMS, "sample": SAMPLE,
            "runs": {name: {"optimizer": run.optimizer,
                            "n_kv_head": run.settings.get("n_kv_head"),
                            "dataset": dataset_of(run),
                            "profiles": run.profiles, "hparams": hparams_of(run),
                            "max_seeds": run.max_seeds}
                     for name, run in RUNS.items()
                     if profile in run.profiles and suite_of(run) == suite}}


@pytest.fixture(scope="module")
def runs_root(request, tmp_path_factory) -> Path:
    """Where each run keeps its checkpoint and result: ``--runs-dir``, or a scratch dir."""
    chosen = request.config.getoption("--runs-dir")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def driver(request, device, profile, seeds, runs_root):
    """The module's selected runs of the profile, at their seeds, in one Driver.

    With ``--train-workers N`` > 1 every one starts at once on N worker processes, and each
    row's ms/iter and tokens/s are then those of a run sharing the CPU with others
    (``concurrent_runs`` and ``torch_threads`` say how). With 1, each test trains its own
    runs when it runs, so the benchmark times them.
    """
    names = dict.fromkeys(item.callspec.params["label"] for item in request.session.items
                          if item.module is request.module)
    names = [name for name in names if not_trainable(RUNS[name]) is None]
    trials = plan([RUNS[name] for name in names], seeds, base_config(profile, device), runs_root,
                  profile)
    with Driver(trials, request.config.getoption("--train-workers")) as running:
        yield running  # every test has its results by the teardown


@pytest.mark.benchmark(group="training")
@pytest.mark.parametrize("label", [name for name, run in RUNS.items() if suite_of(run) == "training"])
def test_training(benchmark, record, device, profile, label, driver):
    train_and_record(benchmark, record, device, profile, label, driver)


def train_and_record(benchmark, record, device, profile, label, driver):
    """Train ``label``'s seeds (or collect them from the driver's workers) and record a row each."""
    run = RUNS[label]
    if profile not in run.profiles:
        pytest.skip(f"in the {' and '.join(run.profiles)} "
                    f"profile{'s' if len(run.profiles) > 1 else ''}: run with --profile full")
    reason = not_trainable(run)
    if reason:
        pytest.skip(reason)
    trials = [t for t in driver.trials if t.run.name == label]
    finished = []
    benchmark.pedantic(lambda: finished.extend(driver.result(t) for t in trials),
                       rounds=1, iterations=1)
    diverged = [f"seed {f.trial.seed}: {f.result.message}" for f in finished
                if isinstance(f.result, Diverged)]
    if diverged:  # at its tuned settings a run must train: its row would hold no losses
        pytest.fail(f"{label} diverged ({'; '.join(diverged)}); its tuned settings in the "
                    f"registry need a lower lr", pytrace=False)
    sample = sample_text(trials[0].out_dir, device=device.type, **SAMPLE)[0]
    for trial, (_, result, threads, concurrent_runs, _) in zip(trials, finished):
        assert result.final_val_loss < result.evals[0]["val_loss"], "training did not learn"
        config = result.config
        record(TrainingRow(
            label=label, optimizer=run.optimizer, n_head=config["n_head"],
            n_kv_head=config["n_kv_head"] or config["n_head"], dataset=config["dataset"],
            seed=trial.seed, max_iters=config["max_iters"], warmup_iters=config["warmup_iters"],
            learning_rate=config["learning_rate"], weight_decay=config["weight_decay"],
            optimizer_hparams=config["optimizer_hparams"], evals=result.evals,
            final_train_loss=result.final_train_loss, final_val_loss=result.final_val_loss,
            final_val_loss_whole_split=result.final_val_loss_whole_split,
            median_ms_per_iter=result.median_ms_per_iter, tokens_per_s=result.tokens_per_s,
            optimizer_state_bytes=result.optimizer_state_bytes, n_params=result.n_params,
            concurrent_runs=concurrent_runs, torch_threads=threads,
            iters_timed=result.iters_run, sample=sample if trial is trials[0] else None))


@dataclass
class TrainingRow:
    """One seed of one run: its losses, speed and optimizer memory."""
    label: str
    optimizer: str
    n_head: int
    n_kv_head: int
    dataset: str
    seed: int
    max_iters: int
    warmup_iters: int
    learning_rate: float
    weight_decay: float
    optimizer_hparams: dict
    evals: list[dict]  # {"iter", "train_loss", "val_loss"} per evaluation
    final_train_loss: float
    final_val_loss: float
    final_val_loss_whole_split: float
    median_ms_per_iter: float | None
    tokens_per_s: float | None
    optimizer_state_bytes: int
    n_params: int
    concurrent_runs: int
    torch_threads: int
    iters_timed: int
    sample: str | None  # the first seed's text from its final checkpoint
    # a run is timed by its own iterations, not by pytest-benchmark's round
    median_s: None = None
    rounds: None = None


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
