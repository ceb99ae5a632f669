"""Learning-rate sweep on the baby config: ``python -m bench.lr_sweep``.

Trains nanoGPT's baby config (2000 iterations, one seed) for each optimizer over a log
grid of peak learning rates spanning 100x around the expected best, and, for the
optimizers whose lr scale differs from AdamW's, with and without weight decay (decoupled
decay scales with the lr, so a 10x lr wants about a 10x smaller decay). Everything else,
the schedule's shape included, is the baby config.

Each finished run is added to the results file at once (atomically), and a run already
in the file is not trained again: an interrupted sweep continues where it stopped when
started again with the same arguments. A full sweep takes hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from bench.common import worker_pool
from memeff import cli
from memeff.optim.registry import OPTIMIZER_NAMES
from bench.results import environment, read_results, results_document
from memeff.io import write_json
from memeff.train import TrainConfig, train

log = logging.getLogger("bench.lr_sweep")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "cpu" / "lr_sweep.json"
# weight decay -> learning rates, per optimizer. Each optimizer's main grid (6 lrs spanning
# 100x) is at one weight decay; the optimizers whose lr scale differs from AdamW's also try
# 0.1 (and AdamSN 0.01) at the three lrs in the middle of the grid. Centres: AdamW's best in
# a one-seed trial with nanoGPT's train.py was 3e-3 (1e-3 is nanoGPT's default); AdamSN's
# 2e-2 to 3e-2, best with weight decay 0.01; torch Adafactor's 3e-2 to 1e-1 without weight
# decay (see bench/test_training.py). Headline optimizers come first.
ADAM_LRS = (3e-4, 1e-3, 3e-3, 6e-3, 1e-2, 3e-2)
SUBSET_NORM_LRS = (1e-3, 3e-3, 1e-2, 2e-2, 4e-2, 1e-1)
ADAFACTOR_LRS = (3e-3, 1e-2, 3e-2, 6e-2, 1e-1, 3e-1)
GRID = {
    "adamw": {0.1: ADAM_LRS},
    # weight decay 0.01 was best at 4e-2, the edge of its first three lrs: 3e-2 and 6e-2 refine it
    "adamsn": {0.0: SUBSET_NORM_LRS, 0.01: (1e-2, 2e-2, 3e-2, 4e-2, 6e-2), 0.1: SUBSET_NORM_LRS[2:5]},
    "adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
    "adamsnsm": {0.0: SUBSET_NORM_LRS, 0.1: SUBSET_NORM_LRS[2:5]},
    "torch_adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
}
# extra optimizer arguments per optimizer (rank 128 would be full rank at n_embd 128)
OPTIMIZER_HPARAMS = {"adamsnsm": {"rank": 32}}


# Ablations of AdamSN (why does it trail AdamW, if it does?), each trained at the lr and
# weight decay AdamSN's grid found best unless its TrainConfig fields give another
# learning_rate or weight_decay: name -> (optimizer_hparams, TrainConfig fields).
VARIANTS = {
    # no change: the best grid point again, so that ablations trained on another machine than
    # the grid compare with a run from their own (float results differ between hosts)
    "baseline": ({}, {}),
    "tied-per-element": ({"tied_weight_as_linear": False}, {}),  # wte/lm_head not subset-norm
    "warmup-200": ({}, {"warmup_iters": 200}),
    "eps-1e-12": ({"eps": 1e-12}, {}),
    "subset-32": ({"subset_size": 32}, {}),  # 32-element subsets instead of whole rows
    # the same at the same step size: a subset's summed squares scale with its size k, so
    # the update scales with 1/sqrt(k), and 4x smaller subsets take 2x the step at one lr
    "subset-32-lr2e-2": ({"subset_size": 32}, {"learning_rate": 2e-2}),
    "subset-8-lr1e-2": ({"subset_size": 8}, {"learning_rate": 1e-2}),
    # less momentum: the optimizers that beat AdamSN here have less of it (Adafactor none,
    # AdamSN+SM none outside its rank-32 subspace)
    "beta1-0.8": ({}, {"beta1": 0.8}),
    # a subset's second moment averages many squared gradients, so its best averaging
    # time may differ from AdamW's 0.99 (the subset-norm paper's LLaMA runs use 0.999)
    "beta2-0.999": ({}, {"beta2": 0.999}),
    "beta2-0.95": ({}, {"beta2": 0.95}),
    # the tied embedding/head (65 tokens x 128): "auto" sums each of its 128 columns over
    # all 65 tokens, so frequent tokens set the step of rare ones; one subset per token
    # (a row) holds 65 values instead of 128
    "tied-rows": ({"group_hparams": {"tied": {"subset_size": 128}}}, {}),
    # the grid's weight decays 0, 0.01 and 0.1 leave a 10x gap above its best, 0.01
    "wd-2e-2": ({}, {"weight_decay": 2e-2}),
    "wd-3e-2": ({}, {"weight_decay": 3e-2}),
    # per-element second moments at AdamSN's lr take ~13x AdamW's step: the tied weight
    # per-element at AdamW's lr (the matched step "tied-per-element" lacked), and the
    # parameters that are per-element anyway (position embedding, LayerNorm gains) likewise
    "tied-per-element-lr3e-3": ({"tied_weight_as_linear": False,
                                 "group_hparams": {"tied": {"lr": 3e-3}}}, {}),
    "per-element-lr3e-3": ({"group_hparams": {"other_weights": {"lr": 3e-3},
                                              "no_decay": {"lr": 3e-3}}}, {}),
}
VARIANT_OF = "adamsn"


def run_key(row: dict) -> str:
    return json.dumps([row["optimizer"], row["learning_rate"], row["weight_decay"],
                       row["optimizer_hparams"], row["seed"], row["max_iters"],
                       row.get("variant"), row.get("train_overrides", {})])


def best_per_optimizer(rows: list[dict]) -> dict:
    """The grid row with the lowest final val loss per optimizer (ablations left out)."""
    best = {}
    for row in rows:
        if row.get("variant"):
            continue
        current = best.get(row["optimizer"])
        if current is None or row["final_val_loss"] < current["final_val_loss"]:
            best[row["optimizer"]] = {k: row[k] for k in ("learning_rate", "weight_decay",
                                                            "final_train_loss", "final_val_loss")}
    return best


def run_one(name: str, lr: float, wd: float, hparams: dict, seed: int, max_iters: int,
            overrides: dict | None = None, threads: int | None = None) -> dict:
    """Train one grid point; the measured part of its row."""
    if threads is not None:
        torch.set_num_threads(threads)
    result = train(TrainConfig(optimizer=name, learning_rate=lr, weight_decay=wd,
                               optimizer_hparams=hparams, seed=seed, max_iters=max_iters,
                               log_interval=500, **(overrides or {})))
    return {"final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
            "final_val_loss_whole_split": result.final_val_loss_whole_split,
            "evals": result.evals, "median_ms_per_iter": result.median_ms_per_iter,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "torch_threads": torch.get_num_threads()}


def _run_numbered(job: tuple[int, tuple]) -> tuple[int, dict]:
    """``run_one`` in a worker process, with the job's number to match it to its row."""
    index, args = job
    return index, run_one(*args)


def sweep(optimizers: Sequence[str], out: Path, max_iters: int, seed: int,
          lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
          workers: int = 1) -> dict:
    """Train every missing grid point, writing ``out`` after each run; return the document.

    ``workers`` > 1 trains that many runs at once in separate processes, splitting this
    process's torch threads between them (on a 2-core CPU, two 1-thread runs finish about
    1.4x sooner than two 2-thread runs one after the other). Losses do not depend on it
    beyond float rounding; the per-iteration times in the rows do.
    """
    rows: list[dict] = read_results(out)["rows"] if out.exists() else []
    plan = []
    for name in optimizers:
        grid = GRID[name]
        for wd in weight_decays if weight_decays is not None else grid:
            for lr in lrs or grid.get(wd, max(grid.values(), key=len)):
                plan.append(dict(optimizer=name, learning_rate=lr, weight_decay=wd,
                                 optimizer_hparams=OPTIMIZER_HPARAMS.get(name, {}), seed=seed,
                                 max_iters=max_iters))
    if not plan:
        raise ValueError("the sweep's grid is empty: check --lrs and --weight-decays")
    return _train_missing(plan, rows, out, seed, max_iters, workers)


def ablate(variants: Sequence[str], out: Path, max_iters: int, seed: int, workers: int = 1) -> dict:
    """Train each of AdamSN's ``variants`` at the best lr and weight decay of its grid in ``out``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rows: list[dict] = read_results(out)["rows"] if out.exists() else []
    best = best_per_optimizer([r for r in rows if r["seed"] == seed and r["max_iters"] == max_iters])
    if VARIANT_OF not in best:
        raise ValueError(f"{out} has no {VARIANT_OF} grid runs with seed {seed} and {max_iters} "
                         f"iterations: run the sweep with --optimizers {VARIANT_OF} first")
    plan = []
    for v in variants:
        overrides = dict(VARIANTS[v][1])
        plan.append(dict(optimizer=VARIANT_OF,
                         learning_rate=overrides.pop("learning_rate", best[VARIANT_OF]["learning_rate"]),
                         weight_decay=overrides.pop("weight_decay", best[VARIANT_OF]["weight_decay"]),
                         optimizer_hparams={**OPTIMIZER_HPARAMS.get(VARIANT_OF, {}), **VARIANTS[v][0]},
                         seed=seed, max_iters=max_iters, variant=v, train_overrides=overrides))
    return _train_missing(plan, rows, out, seed, max_iters, workers)


def summary(rows: list[dict]) -> dict:
    best = best_per_optimizer(rows)
    base = best.get(VARIANT_OF)
    variants = {r["variant"]: {"learning_rate": r["learning_rate"], "weight_decay": r["weight_decay"],
                               "final_train_loss": r["final_train_loss"],
                               "final_val_loss": r["final_val_loss"],
                               "val_loss_change": r["final_val_loss"] - base["final_val_loss"]}
                for r in rows if r.get("variant") and base is not None}
    return {"best": best, "variants": variants}


def _train_missing(plan: list[dict], rows: list[dict], out: Path, seed: int, max_iters: int,
                   workers: int) -> dict:
    """Train the runs of ``plan`` not yet in ``rows``, rewriting ``out`` after each."""
    if workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    done = {run_key(r) for r in rows}
    plan = [row for row in plan if run_key(row) not in done]
    env = environment("cpu")
    config = {"grid": {name: {str(wd): list(lrs) for wd, lrs in grid.items()}
                       for name, grid in GRID.items()},
              "optimizer_hparams": OPTIMIZER_HPARAMS, "variants": VARIANTS,
              "variant_of": VARIANT_OF, "max_iters": max_iters,
              "base": {k: v for k, v in vars(TrainConfig()).items()
                       if k not in ("out_dir", "resume", "optimizer_hparams")}}
    total = len(rows) + len(plan)

    def finished(row: dict, measured: dict) -> None:
        rows.append({**row, "git_commit": env["git_commit"], "git_dirty": env["git_dirty"],
                     **measured})
        document = results_document("lr_sweep", "full", env, [seed], config, rows)
        document["summary"] = summary(rows)
        write_json(out, document)
        log.info("%d/%d runs done: %s%s, lr %g, weight decay %g: val loss %.4f", len(rows), total,
                 row["optimizer"], f" ({row['variant']})" if row.get("variant") else "",
                 row["learning_rate"], row["weight_decay"], measured["final_val_loss"])

    args = [(r["optimizer"], r["learning_rate"], r["weight_decay"], r["optimizer_hparams"],
             seed, max_iters, r.get("train_overrides")) for r in plan]
    if workers == 1:
        for row, arg in zip(plan, args):
            log.info("training %s, lr %g, weight decay %g", *arg[:3])
            finished(row, run_one(*arg))
    else:
        threads = max(1, torch.get_num_threads() // workers)
        with worker_pool(workers) as pool:
            jobs = [(index, arg + (threads,)) for index, arg in enumerate(args)]
            for index, measured in pool.imap_unordered(_run_numbered, jobs):
                finished(plan[index], measured)
    if not out.exists():
        raise ValueError("nothing to train and no results file yet")
    return read_results(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.lr_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(GRID),
                        help=f"comma-separated, from {', '.join(GRID)} (default: all)")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated lrs instead of the grid's, at each weight decay")
    parser.add_argument("--weight-decays", default=None,
                        help="comma-separated weight decays instead of the grid's (each with the "
                             "grid's lrs for it, or its main lrs)")
    parser.add_argument("--variants", default=None,
                        help=f"instead of the grid, train these AdamSN ablations (comma-separated, "
                             f"from {', '.join(VARIANTS)}, or 'all') at AdamSN's best grid point")
    parser.add_argument("--max-iters", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at once, each in its own process (default: 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"(default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    optimizers = args.optimizers.split(",")
    unknown = [o for o in optimizers if o not in GRID]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(OPTIMIZER_NAMES)}")

    def floats(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None

    if args.variants is not None:
        variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        document = ablate(variants, args.out, args.max_iters, args.seed, args.workers)
    else:
        document = sweep(optimizers, args.out, args.max_iters, args.seed, floats(args.lrs, "--lrs"),
                         floats(args.weight_decays, "--weight-decays"), args.workers)
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
