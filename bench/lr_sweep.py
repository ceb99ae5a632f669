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
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import torch

from memeff import cli
from memeff.optim import OPTIMIZER_NAMES
from memeff.results import environment, read_results, results_document, write_json
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
    "adamsn": {0.0: SUBSET_NORM_LRS, 0.01: SUBSET_NORM_LRS[2:5], 0.1: SUBSET_NORM_LRS[2:5]},
    "adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
    "adamsnsm": {0.0: SUBSET_NORM_LRS, 0.1: SUBSET_NORM_LRS[2:5]},
    "torch_adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
}
# extra optimizer arguments per optimizer (rank 128 would be full rank at n_embd 128)
OPTIMIZER_HPARAMS = {"adamsnsm": {"rank": 32}}


def run_key(row: dict) -> str:
    return json.dumps([row["optimizer"], row["learning_rate"], row["weight_decay"],
                       row["optimizer_hparams"], row["seed"], row["max_iters"]])


def best_per_optimizer(rows: list[dict]) -> dict:
    best = {}
    for row in rows:
        current = best.get(row["optimizer"])
        if current is None or row["final_val_loss"] < current["final_val_loss"]:
            best[row["optimizer"]] = {k: row[k] for k in ("learning_rate", "weight_decay",
                                                            "final_train_loss", "final_val_loss")}
    return best


def run_one(name: str, lr: float, wd: float, hparams: dict, seed: int, max_iters: int,
            threads: int | None = None) -> dict:
    """Train one grid point; the measured part of its row."""
    if threads is not None:
        torch.set_num_threads(threads)
    result = train(TrainConfig(optimizer=name, learning_rate=lr, weight_decay=wd,
                               optimizer_hparams=hparams, seed=seed, max_iters=max_iters,
                               log_interval=500))
    return {"final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
            "evals": result.evals, "median_ms_per_iter": result.median_ms_per_iter,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "torch_threads": torch.get_num_threads()}


def sweep(optimizers: Sequence[str], out: Path, max_iters: int, seed: int,
          lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
          workers: int = 1) -> dict:
    """Train every missing grid point, writing ``out`` after each run; return the document.

    ``workers`` > 1 trains that many runs at once in separate processes, splitting this
    process's torch threads between them (on a 2-core CPU, two 1-thread runs finish about
    1.5x sooner than two 2-thread runs one after the other). Losses do not depend on it
    beyond float rounding; the per-iteration times in the rows do.
    """
    if workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    rows: list[dict] = read_results(out)["rows"] if out.exists() else []
    done = {run_key(r) for r in rows}
    plan = []
    for name in optimizers:
        grid = GRID[name]
        for wd in weight_decays if weight_decays is not None else grid:
            for lr in lrs or grid.get(wd, max(grid.values(), key=len)):
                row = dict(optimizer=name, learning_rate=lr, weight_decay=wd,
                           optimizer_hparams=OPTIMIZER_HPARAMS.get(name, {}), seed=seed,
                           max_iters=max_iters)
                if run_key(row) not in done:
                    plan.append(row)
    if not plan and not rows:
        raise ValueError("the sweep's grid is empty: check --lrs and --weight-decays")
    env = environment("cpu")
    config = {"grid": {name: {str(wd): list(lrs) for wd, lrs in grid.items()}
                       for name, grid in GRID.items()},
              "optimizer_hparams": OPTIMIZER_HPARAMS, "max_iters": max_iters,
              "base": {k: v for k, v in vars(TrainConfig()).items()
                       if k not in ("out_dir", "resume", "optimizer_hparams")}}

    total = len(rows) + len(plan)

    def finished(row: dict, measured: dict) -> None:
        rows.append({**row, "git_commit": env["git_commit"], "git_dirty": env["git_dirty"],
                     **measured})
        document = results_document("lr_sweep", "full", env, [seed], config, rows)
        document["summary"] = {"best": best_per_optimizer(rows)}
        write_json(out, document)
        log.info("%d/%d runs done: %s, lr %g, weight decay %g: val loss %.4f", len(rows), total,
                 row["optimizer"], row["learning_rate"], row["weight_decay"],
                 measured["final_val_loss"])

    args = [(r["optimizer"], r["learning_rate"], r["weight_decay"], r["optimizer_hparams"],
             seed, max_iters) for r in plan]
    if workers == 1:
        for row, arg in zip(plan, args):
            log.info("training %s, lr %g, weight decay %g", *arg[:3])
            finished(row, run_one(*arg))
    else:
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_one, *arg, threads): row for row, arg in zip(plan, args)}
            for future in as_completed(futures):
                finished(futures[future], future.result())
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

    document = sweep(optimizers, args.out, args.max_iters, args.seed,
                     floats(args.lrs, "--lrs"), floats(args.weight_decays, "--weight-decays"), args.workers)
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
