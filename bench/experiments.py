"""Training experiments: a table of runs, and one driver that trains those not yet done.

A :class:`Run` is one row of an experiment's table: a name, an optimizer, the
``TrainConfig`` fields it sets over a base config, the profiles that train it and how many
of the session's seeds it takes. :func:`plan` expands runs into :class:`Trial` s, one per
seed, each with its own directory ``<runs_dir>/<name>/seed-<seed>`` for its checkpoint,
``result.json``, ``train.log`` and ``session.json``. The base config is an argument, so a
test substitutes a tiny model and trains in seconds.

:class:`Driver` trains the trials of a plan:

- a trial whose directory holds a ``result.json`` is not trained again: the result is
  reused when its configuration is the trial's, and is a ValueError, raised before
  anything trains, when it is not (likewise a checkpoint of another configuration);
- a trial whose directory holds a checkpoint but no result (an interrupted session)
  resumes from it, which reproduces the uninterrupted run exactly (see memeff.train);
- a trial whose training diverged (memeff.train.TrainingDiverged: a loss or gradient that
  is not finite, e.g. at too high an lr) has that as its outcome, a :class:`Diverged`,
  kept in its directory as ``diverged.json`` and reused like a result;
- ``workers`` > 1 trains that many trials at once, each in its own process with a share
  of the CPU threads (:func:`threads_per_job`); losses do not depend on it beyond float
  rounding, the per-iteration times do;
- each trial's progress lines go to stderr, prefixed with its place in the plan and its
  name (``[3/12] adamsn seed 1338: iter 500/2000: loss ..., 41 s left``), and to
  ``train.log`` in its directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch

from bench.common import worker_pool
from bench.results import PROFILES
from memeff import checkpoint as checkpoints
from memeff.checkpoint import CHECKPOINT_NAME
from memeff.io import write_json
from memeff.train import (RESULT_NAME, TrainConfig, TrainingDiverged, TrainResult,
                          config_differences, train)

SESSION_NAME = "session.json"  # the threads and concurrent runs of the session that trained it
DIVERGED_NAME = "diverged.json"  # the outcome of a run that diverged: it has no result.json
LOG_NAME = "train.log"
# TrainConfig fields a Run may not set: the Run itself and the driver decide them
RESERVED_FIELDS = ("optimizer", "seed", "out_dir", "resume")


@dataclass(frozen=True)
class Run:
    """One training configuration of an experiment, trained at one or more seeds."""

    name: str  # unique in its table: its directory under the runs dir and its rows' label
    optimizer: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields over the base
    profiles: tuple[str, ...] = PROFILES  # the profiles that train it
    max_seeds: int | None = None  # at most this many of the session's seeds

    def __post_init__(self):
        if not self.name or self.name in (".", "..") or "/" in self.name:
            raise ValueError(f"a run's name names a directory: got {self.name!r}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise ValueError(f"run {self.name!r} sets {', '.join(unknown)}, which TrainConfig "
                             f"does not have")
        reserved = sorted(set(self.settings) & set(RESERVED_FIELDS))
        if reserved:
            raise ValueError(f"run {self.name!r} sets {', '.join(reserved)}; a run's optimizer is "
                             f"its own field, its seeds and directory come from the driver")
        unknown = [p for p in self.profiles if p not in PROFILES]
        if unknown:
            raise ValueError(f"run {self.name!r}: unknown profile(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(PROFILES)}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise ValueError(f"run {self.name!r}: max_seeds must be positive, got {self.max_seeds}")

    def seeds_of(self, seeds: Sequence[int]) -> list[int]:
        return list(seeds[:self.max_seeds] if self.max_seeds else seeds)

    def config(self, base: TrainConfig, seed: int, out_dir: str | Path | None = None) -> TrainConfig:
        """``base`` with this run's optimizer and settings, at ``seed``, kept in ``out_dir``."""
        return dataclasses.replace(base, optimizer=self.optimizer, **self.settings, seed=seed,
                                   out_dir=None if out_dir is None else str(out_dir),
                                   resume=False)


@dataclass(frozen=True, eq=False)
class Trial:
    """A run at one seed: one training, in its own directory."""

    run: Run
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.run.name} seed {self.seed}"

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


@dataclass(frozen=True)
class Diverged:
    """The outcome of a trial whose training diverged: a real one (e.g. an lr too high)."""

    iteration: int  # the first iteration whose loss or gradient norm was not finite
    message: str  # TrainingDiverged's, which says what was not finite


def run_dir(runs_dir: str | Path, name: str, seed: int) -> Path:
    return Path(runs_dir) / name / f"seed-{seed}"


def plan(runs: Iterable[Run], seeds: Sequence[int], base: TrainConfig, runs_dir: str | Path,
         profile: str | None = None) -> list[Trial]:
    """Every run (of ``profile``'s, when given) at each of its seeds, in table order."""
    runs = list(runs)
    repeated = sorted(name for name, n in Counter(r.name for r in runs).items() if n > 1)
    if repeated:
        raise ValueError(f"run name(s) {', '.join(repeated)} appear more than once; each run "
                         f"needs a name of its own (it names the run's directory)")
    return [Trial(run, seed, run.config(base, seed, run_dir(runs_dir, run.name, seed)))
            for run in runs if profile is None or profile in run.profiles
            for seed in run.seeds_of(seeds)]


def threads_per_job(jobs: int, workers: int, cores: int) -> list[int]:
    """Each job's share of the cores: ``cores // workers``, except for a last round with
    fewer jobs than workers (3 equal runs on 2 workers: the third runs alone, on both cores).
    """
    last_round = jobs % workers
    return [max(1, cores // (last_round if last_round and k >= jobs - last_round else workers))
            for k in range(jobs)]


def _as_saved(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as ``result.json`` holds it (through JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _saved(path: Path, trial: Trial) -> dict[str, Any]:
    """The JSON file ``path`` of the trial's directory, which must hold the trial's config."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    differences = config_differences(saved.get("config", {}), _as_saved(trial.config))
    if differences:
        raise ValueError(f"{path} is a run with another configuration than {trial.name} "
                         f"({differences}); remove {trial.out_dir} to train it again, or use "
                         f"another runs directory")
    return saved


def saved_result(trial: Trial) -> TrainResult | Diverged | None:
    """The outcome an earlier session left in the trial's directory, or None if it has none.

    A result, divergence or checkpoint there of another configuration is a ValueError
    saying what differs.
    """
    out = trial.out_dir
    result_path, checkpoint_path = out / RESULT_NAME, out / CHECKPOINT_NAME
    if result_path.is_file():
        saved = _saved(result_path, trial)
        missing = [f.name for f in dataclasses.fields(TrainResult) if f.name not in saved]
        if missing:
            raise ValueError(f"{result_path} was written by an older memeff and lacks "
                             f"{', '.join(missing)}; remove {out} to train the run again, "
                             f"or use another runs directory")
        return TrainResult(**saved)
    if (out / DIVERGED_NAME).is_file():
        saved = _saved(out / DIVERGED_NAME, trial)
        return Diverged(saved["iteration"], saved["message"])
    if checkpoint_path.is_file():
        saved_config = checkpoints.load(checkpoint_path)["train_config"]
        differences = config_differences(saved_config, dataclasses.asdict(trial.config))
        if differences:
            raise ValueError(f"{checkpoint_path} is a run with another configuration than "
                             f"{trial.name} ({differences}); remove {out} to train it from "
                             f"the start, or use another runs directory")
    return None


def _session_of(trial: Trial) -> tuple[int | None, int | None]:
    """(torch threads, concurrent runs) of the session that finished the trial; None where
    the directory does not say (a run trained before the driver wrote it)."""
    try:
        session = json.loads((trial.out_dir / SESSION_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    return session.get("torch_threads"), session.get("concurrent_runs")


class _Job(NamedTuple):
    """What a process needs to train one trial (picklable)."""
    config: TrainConfig
    prefix: str  # of its progress lines
    threads: int | None  # torch threads to train with; None: leave the process's as they are
    concurrent_runs: int
    progress: bool


def _train_job(job: _Job) -> TrainResult | Diverged:
    """Train (or resume) one trial, logging its progress to stderr and ``train.log``; a
    divergence is its outcome, kept in ``diverged.json``."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    out = Path(job.config.out_dir)
    cfg = dataclasses.replace(job.config, resume=(out / CHECKPOINT_NAME).is_file())
    out.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(out / LOG_NAME, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [to_file]
    if job.progress:
        to_stderr = logging.StreamHandler(sys.stderr)
        to_stderr.setFormatter(logging.Formatter(job.prefix + "%(message)s"))
        handlers.append(to_stderr)
    logger = logging.getLogger("memeff.train")
    level, propagate = logger.level, logger.propagate
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = not job.progress  # a CLI's root handler would print each line twice
    try:
        result = train(cfg)
    except TrainingDiverged as exc:
        logger.info("%s", exc)
        result = Diverged(exc.iteration, str(exc))
        write_json(out / DIVERGED_NAME, {"config": _as_saved(cfg), **dataclasses.asdict(result)})
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
        logger.propagate = propagate
    write_json(out / SESSION_NAME, {"torch_threads": torch.get_num_threads(),
                                    "concurrent_runs": job.concurrent_runs})
    return result


class Finished(NamedTuple):
    """A trial's result (or divergence), and how the session that trained it ran."""
    trial: Trial
    result: TrainResult | Diverged
    torch_threads: int | None  # of the session that finished it; None: not recorded
    concurrent_runs: int | None  # runs that session trained at once, this one included
    reused: bool  # its result was read from its directory, not trained by this driver


class Driver:
    """Trains the trials of a plan that are not done yet; use it as a context manager.

    With ``workers`` 1 a trial trains in this process when :meth:`result` or
    :meth:`as_completed` asks for it (so a caller can time it). With more, entering the
    block starts every pending trial on ``workers`` processes at once; leaving it stops
    those still going (they resume from their last checkpoint in a later session).
    ``progress`` False keeps the progress lines out of stderr (``train.log`` has them).
    """

    def __init__(self, trials: Sequence[Trial], workers: int = 1, progress: bool = True):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        repeated = sorted(str(d) for d, n in Counter(t.out_dir for t in trials).items() if n > 1)
        if repeated:
            raise ValueError(f"two trials would train in one directory: {', '.join(repeated)}")
        self.trials = list(trials)
        self.workers = workers
        self.progress = progress
        self._position = {t.out_dir: k for k, t in enumerate(self.trials, 1)}
        self._finished: dict[Path, Finished] = {}
        for trial in self.trials:  # every check before any training
            result = saved_result(trial)
            if result is not None:
                self._finished[trial.out_dir] = Finished(trial, result, *_session_of(trial),
                                                         reused=True)
        self._pending = [t for t in self.trials if t.out_dir not in self._finished]
        self._async: dict[Path, Any] = {}  # out_dir -> AsyncResult, with workers > 1
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Driver:
        for trial in self.trials:
            if trial.out_dir in self._finished:
                diverged = isinstance(self._finished[trial.out_dir].result, Diverged)
                saved = DIVERGED_NAME if diverged else RESULT_NAME
                self._say(trial, f"reused {trial.out_dir / saved}")
        if self.workers > 1 and self._pending:
            pool = self._stack.enter_context(worker_pool(min(self.workers, len(self._pending))))
            threads = threads_per_job(len(self._pending), self.workers, torch.get_num_threads())
            concurrent = min(self.workers, len(self._pending))
            for trial, job_threads in zip(self._pending, threads):
                key = trial.out_dir
                self._async[key] = pool.apply_async(
                    _train_job, (self._job(trial, job_threads, concurrent),),
                    callback=lambda result, key=key: self._completions.put((key, result)),
                    error_callback=lambda exc, key=key: self._completions.put((key, exc)))
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def _job(self, trial: Trial, threads: int | None, concurrent_runs: int) -> _Job:
        return _Job(trial.config, self._prefix(trial), threads, concurrent_runs, self.progress)

    def _prefix(self, trial: Trial) -> str:
        return f"[{self._position[trial.out_dir]}/{len(self.trials)}] {trial.name}: "

    def _say(self, trial: Trial, message: str) -> None:
        if self.progress:
            print(self._prefix(trial) + message, file=sys.stderr, flush=True)

    def _record(self, trial: Trial, result: TrainResult | Diverged) -> Finished:
        finished = Finished(trial, result, *_session_of(trial), reused=False)
        self._finished[trial.out_dir] = finished
        done = sum(not f.reused for f in self._finished.values())
        outcome = (f"diverged at iteration {result.iteration}" if isinstance(result, Diverged)
                   else f"done, val loss {result.final_val_loss:.4f}")
        self._say(trial, f"{outcome} ({done} of {len(self._pending)} trained)")
        return finished

    def result(self, trial: Trial) -> Finished:
        """``trial``'s result: reused, awaited from its worker, or trained here and now."""
        key = trial.out_dir
        if key not in self._position:
            raise ValueError(f"{trial.name} ({key}) is not in this driver's plan")
        if key not in self._finished:
            if key in self._async:
                result = self._async[key].get()
            else:
                result = _train_job(self._job(trial, None, 1))
            self._record(trial, result)
        return self._finished[key]

    def as_completed(self) -> Iterator[Finished]:
        """Every trial once: the reused ones first, then each as it finishes."""
        yield from (self._finished[t.out_dir] for t in self.trials
                    if t.out_dir in self._finished and self._finished[t.out_dir].reused)
        trials = {t.out_dir: t for t in self._pending}
        if not self._async:
            for trial in self._pending:
                yield self.result(trial)
            return
        for _ in self._pending:
            key, outcome = self._completions.get()
            if isinstance(outcome, BaseException):
                raise outcome
            yield self._finished.get(key) or self._record(trials[key], outcome)


def train_all(trials: Sequence[Trial], workers: int = 1, progress: bool = True) -> list[Finished]:
    """Train the trials not yet done; every trial's :class:`Finished`, in plan order."""
    with Driver(trials, workers, progress) as driver:
        finished = {f.trial.out_dir: f for f in driver.as_completed()}
    return [finished[t.out_dir] for t in trials]
