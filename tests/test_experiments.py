"""The experiment driver on a tiny model: finished runs reused, changed configs refused,
interrupted runs resumed exactly, worker processes, progress lines."""

import dataclasses
import json

import pytest
import torch

from bench import experiments
from bench.experiments import Diverged, Driver, Run, plan, threads_per_job, train_all
from memeff import checkpoint
from memeff.train import TrainConfig

# evaluations (and checkpoints) at iterations 0, 2, 4, 6, 8
TINY = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=1,
                   max_iters=8, eval_interval=2, warmup_iters=2, log_interval=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_finished_run_is_reused(tmp_path, monkeypatch, capsys):
    runs = [Run("adamw", "adamw", {"learning_rate": 3e-3})]
    first = train_all(plan(runs, [1, 2], TINY, tmp_path))
    assert [(f.trial.seed, f.reused, f.concurrent_runs) for f in first] == [(1, False, 1),
                                                                            (2, False, 1)]
    assert (tmp_path / "adamw" / "seed-2" / "result.json").is_file()

    monkeypatch.setattr(experiments, "train", lambda cfg: pytest.fail("a finished run was retrained"))
    again = train_all(plan(runs, [1, 2], TINY, tmp_path))
    assert [f.reused for f in again] == [True, True]
    assert [f.result for f in again] == [f.result for f in first]
    assert [f.torch_threads for f in again] == [f.torch_threads for f in first]
    assert "[2/2] adamw seed 2: reused" in capsys.readouterr().err


def test_a_changed_config_is_a_clear_error_before_anything_trains(tmp_path, monkeypatch):
    train_all(plan([Run("adamw", "adamw", {"learning_rate": 1e-3})], [1], TINY, tmp_path),
              progress=False)
    changed = plan([Run("adamw", "adamw", {"learning_rate": 3e-3}), Run("other", "adamw")], [1],
                   TINY, tmp_path)
    monkeypatch.setattr(experiments, "train", lambda cfg: pytest.fail("trained despite the error"))
    with pytest.raises(ValueError, match=r"another configuration than adamw seed 1 "
                                         r"\(learning_rate: saved 0.001 vs now 0.003\)"):
        Driver(changed)
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_of_another_config_is_a_clear_error(tmp_path, interrupt_at_eval):
    interrupt_at_eval(2)
    with pytest.raises(KeyboardInterrupt):
        train_all(plan([Run("adamw", "adamw")], [1], TINY, tmp_path), progress=False)
    assert (tmp_path / "adamw" / "seed-1" / "ckpt.pt").is_file()
    with pytest.raises(ValueError, match=r"ckpt.pt is a run with another configuration .*"
                                         r"warmup_iters: saved 2 vs now 3"):
        Driver(plan([Run("adamw", "adamw", {"warmup_iters": 3})], [1], TINY, tmp_path))


def test_an_interrupted_run_resumes_bit_exactly(tmp_path, interrupt_at_eval, capsys):
    runs = [Run("adamsn", "adamsn", {"learning_rate": 1e-2})]
    (whole,) = train_all(plan(runs, [1], TINY, tmp_path / "whole"), progress=False)

    interrupted = plan(runs, [1], TINY, tmp_path / "interrupted")
    disarm = interrupt_at_eval(4)  # evaluations at 0, 2 and 4 ran and were checkpointed
    with pytest.raises(KeyboardInterrupt):
        train_all(interrupted)
    disarm()
    assert checkpoint.load(interrupted[0].out_dir)["iter"] == 4
    (resumed,) = train_all(interrupted)

    assert resumed.result.iters_run == 4 and not resumed.reused
    assert resumed.result.evals == whole.result.evals
    assert resumed.result.final_val_loss_whole_split == whole.result.final_val_loss_whole_split
    resumed_weights = checkpoint.load(resumed.trial.out_dir)["model"]
    for name, tensor in checkpoint.load(whole.trial.out_dir)["model"].items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert "[1/1] adamsn seed 1: resumed from" in capsys.readouterr().err
    log = (resumed.trial.out_dir / "train.log").read_text()
    assert "eval 2/8" in log and "eval 8/8" in log  # both sessions


def test_progress_lines_name_the_run_its_place_and_the_time_left(tmp_path, capsys):
    train_all(plan([Run("adamw", "adamw"), Run("adafactor", "adafactor", {"learning_rate": 1e-2,
                                                                          "weight_decay": 0.0})],
                   [7], TINY, tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert "[1/2] adamw seed 7: eval 0/8: train loss" in err[0]
    iters = [line for line in err if line.startswith("[2/2] adafactor seed 7: iter ")]
    assert [line.split(":")[1] for line in iters] == [f" iter {k}/8" for k in (0, 2, 4, 6)]
    assert all(line.endswith(" s left") for line in iters)
    assert err[-1].startswith("[2/2] adafactor seed 7: done, val loss ")
    assert "eval 8/8" in (tmp_path / "adafactor" / "seed-7" / "train.log").read_text()


def test_progress_false_keeps_stderr_quiet(tmp_path, capsys):
    train_all(plan([Run("adamw", "adamw")], [1], dataclasses.replace(TINY, max_iters=2), tmp_path),
              progress=False)
    assert capsys.readouterr().err == ""


def test_workers_train_in_processes_of_their_own_with_the_same_losses(tmp_path, capfd):
    runs = [Run("adamw", "adamw"), Run("adamsn", "adamsn", {"learning_rate": 1e-2})]
    serial = train_all(plan(runs, [1], TINY, tmp_path / "serial"), progress=False)
    trials = plan(runs, [1], TINY, tmp_path / "parallel")
    with Driver(trials, workers=2) as driver:
        second = driver.result(trials[1])  # awaited from its worker
        completed = list(driver.as_completed())
    assert sorted(f.trial.run.name for f in completed) == ["adamsn", "adamw"]
    assert [f for f in completed if f.trial is trials[1]] == [second]
    threads = threads_per_job(2, 2, torch.get_num_threads())
    for before, after in zip(serial, (driver.result(t) for t in trials)):
        assert after.result.final_val_loss == pytest.approx(before.result.final_val_loss, rel=1e-5)
        assert after.concurrent_runs == 2 and after.torch_threads == threads[0]
    err = capfd.readouterr().err
    assert "[1/2] adamw seed 1: iter 6/8" in err and "[2/2] adamsn seed 1: iter 6/8" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a failing run: one on a missing GPU")
def test_a_failing_worker_stops_the_driver(tmp_path):
    trials = plan([Run("gpu", "adamw", {"device": "cuda"})], [1], TINY, tmp_path)
    with pytest.raises((RuntimeError, ValueError), match="torch sees no GPU"):
        train_all(trials, workers=2, progress=False)


def test_plan_takes_each_runs_profiles_and_seeds(tmp_path):
    runs = [Run("everywhere", "adamw"), Run("full-only", "adamw", profiles=("full",)),
            Run("one-seed", "adamw", {"dataset": "char"}, max_seeds=1)]
    trials = plan(runs, [5, 6], TINY, tmp_path, profile="quick")
    assert [(t.run.name, t.seed) for t in trials] == [("everywhere", 5), ("everywhere", 6),
                                                     ("one-seed", 5)]
    assert trials[1].out_dir == tmp_path / "everywhere" / "seed-6"
    assert (trials[1].config.seed, trials[1].config.n_layer, trials[1].config.resume) == (6, 1, False)
    assert len(plan(runs, [5, 6], TINY, tmp_path)) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="a/b"), "names a directory"),
    (dict(name=""), "names a directory"),
    (dict(settings={"learning_rte": 1e-3}), "sets learning_rte, which TrainConfig does not have"),
    (dict(settings={"seed": 3}), "sets seed; a run's optimizer is its own field"),
    (dict(settings={"out_dir": "x"}), "sets out_dir"),
    (dict(profiles=("nightly",)), "unknown profile"),
    (dict(max_seeds=0), "max_seeds must be positive"),
])
def test_a_bad_run_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Run(**{"name": "run", "optimizer": "adamw", **kwargs})


def test_plans_that_would_train_twice_in_one_directory_are_refused(tmp_path):
    with pytest.raises(ValueError, match="run name.* adamw appear more than once"):
        plan([Run("adamw", "adamw"), Run("adamw", "adamsn")], [1], TINY, tmp_path)
    (trial,) = plan([Run("adamw", "adamw")], [1], TINY, tmp_path)
    with pytest.raises(ValueError, match="two trials would train in one directory"):
        Driver([trial, trial])


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_integer(workers, tmp_path):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        Driver(plan([Run("adamw", "adamw")], [1], TINY, tmp_path), workers=workers)


@pytest.mark.parametrize("jobs, workers, cores, expected", [
    (30, 2, 2, [1] * 30),  # two at a time on a core each
    (3, 2, 2, [1, 1, 2]),  # the third runs alone, on both cores
    (1, 2, 2, [2]),
    (5, 2, 8, [4, 4, 4, 4, 8]),
    (4, 3, 2, [1, 1, 1, 2]),
])
def test_jobs_share_the_cores(jobs, workers, cores, expected):
    assert threads_per_job(jobs, workers, cores) == expected


def test_a_result_from_an_older_memeff_is_a_clear_error(tmp_path):
    (finished,) = train_all(plan([Run("adamw", "adamw")], [1], dataclasses.replace(TINY, max_iters=2),
                                 tmp_path), progress=False)
    path = finished.trial.out_dir / "result.json"
    saved = json.loads(path.read_text())
    del saved["final_val_loss_whole_split"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="older memeff and lacks final_val_loss_whole_split"):
        Driver([finished.trial])


# lr 1e6: the first step overflows the next forward, whose loss is nan (iteration 1)
TOO_FAST = Run("too-fast", "adamw", {"learning_rate": 1e6, "warmup_iters": 0})
DIVERGED = Diverged(iteration=1, message="training diverged at iteration 1: the loss is nan; try "
                                         "a lower --learning-rate")


def test_a_diverged_run_is_an_outcome_kept_in_its_directory(tmp_path, monkeypatch, capsys):
    (finished,) = train_all(plan([TOO_FAST], [1], TINY, tmp_path))
    assert finished.result == DIVERGED and not finished.reused
    err = capsys.readouterr().err
    assert "[1/1] too-fast seed 1: diverged at iteration 1 (1 of 1 trained)" in err
    out = finished.trial.out_dir
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.pt", "diverged.json",
                                                     "session.json", "train.log"]
    saved = json.loads((out / "diverged.json").read_text())  # strict JSON: no NaN
    assert (saved["iteration"], saved["message"]) == (1, DIVERGED.message)
    assert "training diverged at iteration 1" in (out / "train.log").read_text()

    monkeypatch.setattr(experiments, "train", lambda cfg: pytest.fail("retrained a diverged run"))
    (again,) = train_all(plan([TOO_FAST], [1], TINY, tmp_path))
    assert again.result == DIVERGED and again.reused
    assert "[1/1] too-fast seed 1: reused " in capsys.readouterr().err
    changed = Run("too-fast", "adamw", {"learning_rate": 1e5, "warmup_iters": 0})
    with pytest.raises(ValueError, match=r"diverged.json is a run with another configuration"):
        Driver(plan([changed], [1], TINY, tmp_path))


def test_a_worker_returns_a_diverged_run_like_a_finished_one(tmp_path):
    trials = plan([TOO_FAST, Run("adamw", "adamw")], [1], TINY, tmp_path)
    diverged, finished = train_all(trials, workers=2, progress=False)
    assert diverged.result == DIVERGED and finished.result.iters_run == 8
