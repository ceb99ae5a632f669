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

from memeff import cli
from memeff.optim import OPTIMIZER_NAMES
from memeff.results import environment, read_results, results_document, write_json
from memeff.train import TrainConfig, train

log = logging.getLogger("bench.lr_sweep")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "cpu" / "lr_sweep.json"
# (learning rates, weight decays) per optimizer. Centres: AdamW's best in a one-seed trial
# with nanoGPT's train.py was 3e-3 (1e-3 is nanoGPT's default); AdamSN's 2e-2 to 3e-2;
# torch Adafactor's 3e-2 to 1e-1 (see bench/test_training.py).
ADAM_LRS = (3e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2, 3e-2)
SUBSET_NORM_LRS = (3e-3, 1e-2, 2e-2, 3e-2, 6e-2, 1e-1, 3e-1)
ADAFACTOR_LRS = (3e-3, 1e-2, 3e-2, 6e-2, 1e-1, 3e-1)
GRID = {
    "adamw": (ADAM_LRS, (0.1,)),
    "adamsn": (SUBSET_NORM_LRS, (0.0, 0.01, 0.1)),
    "adamsnsm": (SUBSET_NORM_LRS, (0.0, 0.01, 0.1)),
    "adafactor": (ADAFACTOR_LRS, (0.0, 0.1)),
    "torch_adafactor": (ADAFACTOR_LRS, (0.0, 0.1)),
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


def sweep(optimizers: Sequence[str], out: Path, max_iters: int, seed: int,
          lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None) -> dict:
    """Train every missing grid point, writing ``out`` after each run; return the document."""
    rows: list[dict] = read_results(out)["rows"] if out.exists() else []
    done = {run_key(r) for r in rows}
    plan = []
    for name in optimizers:
        grid_lrs, grid_wds = GRID[name]
        for lr in lrs or grid_lrs:
            for wd in weight_decays if weight_decays is not None else grid_wds:
                plan.append((name, lr, wd))
    env = environment("cpu")
    config = {"grid": {k: [list(v[0]), list(v[1])] for k, v in GRID.items()},
              "optimizer_hparams": OPTIMIZER_HPARAMS, "max_iters": max_iters,
              "base": {k: v for k, v in vars(TrainConfig()).items()
                       if k not in ("out_dir", "resume", "optimizer_hparams")}}
    document = None
    for i, (name, lr, wd) in enumerate(plan, start=1):
        hparams = OPTIMIZER_HPARAMS.get(name, {})
        row = dict(optimizer=name, learning_rate=lr, weight_decay=wd, optimizer_hparams=hparams,
                   seed=seed, max_iters=max_iters)
        if run_key(row) in done:
            continue
        log.info("run %d/%d: %s, lr %g, weight decay %g", i, len(plan), name, lr, wd)
        result = train(TrainConfig(optimizer=name, learning_rate=lr, weight_decay=wd,
                                   optimizer_hparams=hparams, seed=seed, max_iters=max_iters,
                                   log_interval=500))
        rows.append({**row, "git_commit": env["git_commit"], "git_dirty": env["git_dirty"],
                     "final_train_loss": result.final_train_loss,
                     "final_val_loss": result.final_val_loss, "evals": result.evals,
                     "median_ms_per_iter": result.median_ms_per_iter,
                     "optimizer_state_bytes": result.optimizer_state_bytes})
        done.add(run_key(row))
        document = results_document("lr_sweep", "full", env, [seed], config, rows)
        document["summary"] = {"best": best_per_optimizer(rows)}
        write_json(out, document)
    if document is None:
        if not rows:
            raise ValueError("the sweep's grid is empty: check --lrs and --weight-decays")
        document = read_results(out)
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.lr_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(GRID),
                        help=f"comma-separated, from {', '.join(GRID)} (default: all)")
    parser.add_argument("--lrs", default=None, help="comma-separated lrs instead of the grid's")
    parser.add_argument("--weight-decays", default=None,
                        help="comma-separated weight decays instead of the grid's")
    parser.add_argument("--max-iters", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
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
                     floats(args.lrs, "--lrs"), floats(args.weight_decays, "--weight-decays"))
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
