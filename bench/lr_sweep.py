"""Learning-rate sweep on the baby config: ``python -m bench.lr_sweep``.

Trains nanoGPT's baby config (2000 iterations, one seed) for each optimizer over a log
grid of peak learning rates spanning 100x around the expected best, and, for the
optimizers whose lr scale differs from AdamW's, with and without weight decay (decoupled
decay scales with the lr, so a 10x lr wants about a 10x smaller decay). Everything else,
the schedule's shape included, is the baby config. ``--variants`` trains ablations of
AdamSN at the best point of its grid instead.

Runs train through :mod:`bench.experiments`: each keeps its checkpoint and result under
``--runs-dir``, so a sweep started again with the same arguments continues where it
stopped, mid-run included. The rows go to the results file after each run, atomically:
``--out`` (default ``runs/lr_sweep.json``, a scratch file git ignores), or with
``--publish`` the committed ``results/cpu/lr_sweep.json`` that the report and the README
read. A run whose row the file holds already is not trained again (rows are matched by
optimizer, lr, weight decay, settings, seed and iterations, so a results file is for one
base configuration). A full sweep takes hours on a 2-core CPU.

A run that diverges (a loss or gradient that is not finite, as at too high an lr) is a row
too: ``diverged`` true, ``diverged_at`` the iteration, and null losses, evals, timing and
state bytes; the best point and the ablations' summary leave it out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import sys
from pathlib import Path
from typing import Sequence

from bench import experiments
from bench.experiments import Diverged, Driver, Run
from bench.results import environment, read_results, results_document
from memeff import cli
from memeff.io import write_json
from memeff.optim.registry import REGISTRY, missing_package
from memeff.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = REPO_ROOT / "results" / "cpu" / "lr_sweep.json"
SCRATCH = REPO_ROOT / "runs" / "lr_sweep.json"  # runs/ is git-ignored
RUNS_DIR = REPO_ROOT / "runs" / "lr_sweep"
BABY = TrainConfig(log_interval=250)  # nanoGPT's baby config; progress at every evaluation

# weight decay -> peak learning rates, per optimizer. Each optimizer's main grid is 6 lrs
# spanning 100x around its expected best, at one weight decay; the optimizers whose lr
# scale differs from AdamW's also train at 0.1 (and AdamSN at 0.01, on a finer grid) over
# the middle of theirs. Headline optimizers come first.
ADAM_LRS = (3e-4, 1e-3, 3e-3, 6e-3, 1e-2, 3e-2)
SUBSET_NORM_LRS = (1e-3, 3e-3, 1e-2, 2e-2, 4e-2, 1e-1)
ADAFACTOR_LRS = (3e-3, 1e-2, 3e-2, 6e-2, 1e-1, 3e-1)
PEER_ADAM_LRS = (1e-3, 3e-3, 1e-2)
PEER_LOW_RANK_LRS = (3e-3, 1e-2, 3e-2)
GRID = {
    "adamw": {0.1: ADAM_LRS},
    "adamsn": {0.0: SUBSET_NORM_LRS, 0.01: (1e-2, 2e-2, 3e-2, 4e-2, 6e-2), 0.1: SUBSET_NORM_LRS[2:5]},
    "adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
    "adamsnsm": {0.0: SUBSET_NORM_LRS, 0.1: SUBSET_NORM_LRS[2:5]},
    "torch_adafactor": {0.0: ADAFACTOR_LRS, 0.1: ADAFACTOR_LRS[1:4]},
    # the peers: lrs spanning 10x around their family's best, at its weight decay (AdamW's
    # for the AdamW-based ones, AdamSN's for AdamWSN), widened where the best was at an edge;
    # Lion's paper advises a 3-10x smaller lr than AdamW's and as much larger a decay: its
    # grid spans 100x from there
    **{name: {0.1: PEER_ADAM_LRS} for name in ("torchao_adamw4bit", "adam_mini", "torch_muon")},
    # the 8-bit AdamWs' best is at 1e-2, the 3-point grid's edge
    **{name: {0.1: PEER_ADAM_LRS + (3e-2,)} for name in ("bnb_adamw8bit", "torchao_adamw8bit")},
    # GaLore and APOLLO scale their projected update (0.25 and 1.0; APOLLO-Mini 128)
    "apollo": {0.1: PEER_LOW_RANK_LRS + (1e-1,)},  # its best is at 3e-2, the grid's edge
    "apollo_mini": {0.1: PEER_LOW_RANK_LRS},
    "galore_adamw": {0.1: PEER_LOW_RANK_LRS + (1e-1,)},  # its scale 0.25 takes a larger lr
    "lion_pytorch": {1.0: (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
    "adamwsn": {0.01: (1e-2, 4e-2, 1e-1)},
}
# the settings each optimizer keeps throughout its sweep: its tuned ones other than lr and decay
OPTIMIZER_HPARAMS = {name: REGISTRY[name].tuned["optimizer_hparams"] for name in GRID
                     if "optimizer_hparams" in REGISTRY[name].tuned}


# Ablations of AdamSN, each trained at the lr and weight decay of the best point of AdamSN's
# grid unless its TrainConfig fields give another learning_rate or weight_decay:
# name -> (optimizer_hparams, TrainConfig fields).
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
    # less momentum, as the optimizers without a full first moment have (Adafactor none,
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
    # weight decays between the grid's 0.01 and 0.1
    "wd-2e-2": ({}, {"weight_decay": 2e-2}),
    "wd-3e-2": ({}, {"weight_decay": 3e-2}),
    # per-element second moments at AdamSN's lr take (AdamSN's lr / AdamW's lr) times
    # AdamW's step: the tied weight per-element at AdamW's lr ("tied-per-element" keeps
    # AdamSN's), and the parameters that are per-element anyway (position embedding,
    # LayerNorm gains) likewise
    "tied-per-element-lr3e-3": ({"tied_weight_as_linear": False,
                                 "group_hparams": {"tied": {"lr": 3e-3}}}, {}),
    "per-element-lr3e-3": ({"group_hparams": {"other_weights": {"lr": 3e-3},
                                              "no_decay": {"lr": 3e-3}}}, {}),
}
VARIANT_OF = "adamsn"


@dataclass
class GridRow:
    """One trained grid point of the sweep."""
    optimizer: str
    learning_rate: float
    weight_decay: float
    optimizer_hparams: dict
    seed: int
    max_iters: int
    git_commit: str | None  # the code that trained it (rows of a file come from many runs)
    git_dirty: bool | None
    diverged: bool  # it stopped at a non-finite loss or gradient: no losses, evals or timing
    diverged_at: int | None  # the iteration it stopped at
    final_train_loss: float | None
    final_val_loss: float | None
    final_val_loss_whole_split: float | None
    evals: list[dict]
    median_ms_per_iter: float | None
    optimizer_state_bytes: int | None
    torch_threads: int


@dataclass
class AblationRow(GridRow):
    """One of AdamSN's ablations at the best point of its grid."""
    variant: str
    train_overrides: dict  # TrainConfig fields it changes


def run_key(row: dict) -> str:
    return json.dumps([row["optimizer"], row["learning_rate"], row["weight_decay"],
                       row["optimizer_hparams"], row["seed"], row["max_iters"],
                       row.get("variant"), row.get("train_overrides", {})])


def best_per_optimizer(rows: list[dict]) -> dict:
    """The grid row with the lowest final val loss per optimizer (ablations and runs that
    diverged left out)."""
    best = {}
    for row in rows:
        if row.get("variant") or row.get("diverged"):
            continue
        current = best.get(row["optimizer"])
        if current is None or row["final_val_loss"] < current["final_val_loss"]:
            best[row["optimizer"]] = {k: row[k] for k in ("learning_rate", "weight_decay",
                                                            "final_train_loss", "final_val_loss")}
    return best


def summary(rows: list[dict]) -> dict:
    best = best_per_optimizer(rows)
    base = best.get(VARIANT_OF)
    variants = {r["variant"]: {"learning_rate": r["learning_rate"], "weight_decay": r["weight_decay"],
                               "final_train_loss": r["final_train_loss"],
                               "final_val_loss": r["final_val_loss"],
                               "val_loss_change": r["final_val_loss"] - base["final_val_loss"]}
                for r in rows if r.get("variant") and not r.get("diverged") and base is not None}
    return {"best": best, "variants": variants}


def grid_plan(optimizers: Sequence[str], seed: int, max_iters: int,
              lrs: Sequence[float] | None = None,
              weight_decays: Sequence[float] | None = None) -> list[dict]:
    """The rows' identifying fields of every grid point: each weight decay of the grid (or
    ``weight_decays``) with its lrs (or ``lrs``; a weight decay the grid lacks takes the
    optimizer's main lrs). A point named twice is planned once."""
    unknown = [o for o in optimizers if o not in GRID]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(GRID)}")
    missing = [hint for hint in map(missing_package, optimizers) if hint is not None]
    if missing:  # said before anything trains, not when the run reaches the driver
        raise ValueError("; ".join(missing))
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
    return list({run_key(row): row for row in plan}.values())


def ablation_plan(variants: Sequence[str], rows: list[dict], seed: int, max_iters: int) -> list[dict]:
    """The rows' identifying fields of each of AdamSN's ``variants``, at the best point of
    its grid among ``rows`` (of ``seed`` and ``max_iters``)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    best = best_per_optimizer([r for r in rows if r["seed"] == seed and r["max_iters"] == max_iters])
    if VARIANT_OF not in best:
        raise ValueError(f"the results file has no {VARIANT_OF} grid runs with seed {seed} and "
                         f"{max_iters} iterations: run the sweep with --optimizers {VARIANT_OF} "
                         f"first")
    plan = []
    for v in dict.fromkeys(variants):
        optimizer_hparams, fields = VARIANTS[v]
        overrides = dict(fields)
        plan.append(dict(optimizer=VARIANT_OF,
                         learning_rate=overrides.pop("learning_rate", best[VARIANT_OF]["learning_rate"]),
                         weight_decay=overrides.pop("weight_decay", best[VARIANT_OF]["weight_decay"]),
                         optimizer_hparams={**OPTIMIZER_HPARAMS.get(VARIANT_OF, {}), **optimizer_hparams},
                         seed=seed, max_iters=max_iters, variant=v, train_overrides=overrides))
    return plan


def run_of(row: dict) -> Run:
    """The experiment run of a planned row; its name says what it is and tells its
    directory apart from every other point's."""
    variant = f"-{row['variant']}" if row.get("variant") else ""
    name = (f"{row['optimizer']}{variant}-lr{row['learning_rate']:g}-wd{row['weight_decay']:g}"
            f"-{row['max_iters']}it")
    return Run(name, row["optimizer"], {"learning_rate": row["learning_rate"],
                                        "weight_decay": row["weight_decay"],
                                        "optimizer_hparams": row["optimizer_hparams"],
                                        "max_iters": row["max_iters"],
                                        **row.get("train_overrides", {})})


def sweep(optimizers: Sequence[str], out: Path, seed: int = 1337,
          lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
          workers: int = 1, base: TrainConfig = BABY, runs_dir: Path = RUNS_DIR,
          progress: bool = True) -> dict:
    """Train every grid point not yet in ``out``, rewriting ``out`` after each; return the
    document. ``base`` is the config every run starts from (the baby config)."""
    plan = grid_plan(optimizers, seed, base.max_iters, lrs, weight_decays)
    return _train_missing(plan, _rows(out), out, seed, base, runs_dir, workers, progress)


def ablate(variants: Sequence[str], out: Path, seed: int = 1337, workers: int = 1,
           base: TrainConfig = BABY, runs_dir: Path = RUNS_DIR, progress: bool = True) -> dict:
    """Train each of AdamSN's ``variants`` at the best lr and weight decay of its grid in ``out``."""
    rows = _rows(out)
    plan = ablation_plan(variants, rows, seed, base.max_iters)
    return _train_missing(plan, rows, out, seed, base, runs_dir, workers, progress)


def _rows(out: Path) -> list[dict]:
    return read_results(out)["rows"] if out.exists() else []


def _train_missing(plan: list[dict], rows: list[dict], out: Path, seed: int, base: TrainConfig,
                   runs_dir: Path, workers: int, progress: bool) -> dict:
    """Train the runs of ``plan`` not yet in ``rows``, rewriting ``out`` after each."""
    done = {run_key(r) for r in rows}
    plan = [row for row in plan if run_key(row) not in done]
    runs = [run_of(row) for row in plan]
    trials = experiments.plan(runs, [seed], base, runs_dir)
    env = environment("cpu")
    config = {"grid": {name: {str(wd): list(lrs) for wd, lrs in grid.items()}
                       for name, grid in GRID.items()},
              "optimizer_hparams": OPTIMIZER_HPARAMS, "variants": VARIANTS,
              "variant_of": VARIANT_OF, "max_iters": base.max_iters,
              "base": {k: v for k, v in dataclasses.asdict(base).items()
                       if k not in ("out_dir", "resume", "optimizer_hparams")}}
    row_of = {run.name: row for run, row in zip(runs, plan)}
    with Driver(trials, workers, progress) as driver:
        for finished in driver.as_completed():
            result = finished.result
            planned = row_of[finished.trial.run.name]
            row_type = AblationRow if "variant" in planned else GridRow
            if isinstance(result, Diverged):
                outcome = dict(diverged=True, diverged_at=result.iteration, final_train_loss=None,
                               final_val_loss=None, final_val_loss_whole_split=None, evals=[],
                               median_ms_per_iter=None, optimizer_state_bytes=None)
            else:
                outcome = dict(diverged=False, diverged_at=None,
                               final_train_loss=result.final_train_loss,
                               final_val_loss=result.final_val_loss,
                               final_val_loss_whole_split=result.final_val_loss_whole_split,
                               evals=result.evals, median_ms_per_iter=result.median_ms_per_iter,
                               optimizer_state_bytes=result.optimizer_state_bytes)
            rows.append(dataclasses.asdict(row_type(
                **planned, git_commit=env["git_commit"], git_dirty=env["git_dirty"], **outcome,
                torch_threads=finished.torch_threads)))
            document = results_document("lr_sweep", "full", env, [seed], config, rows)
            document["summary"] = summary(rows)
            write_json(out, document)
    if not out.exists():
        raise ValueError("nothing to train and no results file yet")
    return read_results(out)


def _shown(path: Path) -> str:
    """``path`` as --help shows it: from the repository root when it is inside it."""
    return str(path.relative_to(REPO_ROOT)) if REPO_ROOT in path.parents else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.lr_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, from {', '.join(GRID)} (default: all whose "
                             f"package is installed)")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated lrs instead of the grid's, at each weight decay")
    parser.add_argument("--weight-decays", default=None,
                        help="comma-separated weight decays instead of the grid's (each with the "
                             "grid's lrs for it, or its main lrs)")
    parser.add_argument("--variants", default=None,
                        help=f"instead of the grid, train these AdamSN ablations (comma-separated, "
                             f"from {', '.join(VARIANTS)}, or 'all') at AdamSN's best grid point "
                             f"in the results file")
    parser.add_argument("--max-iters", type=int, default=BABY.max_iters,
                        help=f"(default: {BABY.max_iters})")
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at once, each in its own process (default: 1)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR,
                        help=f"each run's checkpoint, result and train.log, kept to resume from "
                             f"(default: {_shown(RUNS_DIR)})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help=f"the results file (default: {_shown(SCRATCH)})")
    where.add_argument("--publish", action="store_true",
                       help=f"write the rows to {_shown(PUBLISHED)}, the file the "
                            f"report and the README read, keeping the rows it holds")
    args = parser.parse_args(argv)
    out = PUBLISHED if args.publish else args.out or SCRATCH
    base = dataclasses.replace(BABY, max_iters=args.max_iters)

    def floats(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None

    if args.variants is not None:
        variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        document = ablate(variants, out, args.seed, args.workers, base, args.runs_dir)
    else:
        if args.optimizers is None:
            hints = {name: missing_package(name) for name in GRID}
            optimizers = [name for name, hint in hints.items() if hint is None]
            for hint in filter(None, hints.values()):
                print(f"skipping {hint}", file=sys.stderr)
        else:
            optimizers = args.optimizers.split(",")
        document = sweep(optimizers, out, args.seed, floats(args.lrs, "--lrs"),
                         floats(args.weight_decays, "--weight-decays"), args.workers, base,
                         args.runs_dir)
    print(json.dumps(document["summary"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
