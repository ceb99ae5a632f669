"""The learning-rate sweep's bookkeeping on a tiny model: rows written as runs finish,
finished runs never redone, interrupted ones resumed, the ablation plan, where it writes."""

import json
import subprocess

import pytest

import bench.lr_sweep as lr_sweep
from bench import experiments
from bench.results import read_results
from memeff.train import TrainConfig

# evaluations at iterations 0, 2 and 4
TINY = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=1,
                   max_iters=4, eval_interval=2, warmup_iters=1, log_interval=2)
GRID = dict(seed=1, lrs=[1e-3, 3e-3], weight_decays=[0.1])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def where(tmp_path):
    """The tiny base config and scratch places for the runs (progress lines off)."""
    return dict(base=TINY, runs_dir=tmp_path / "runs", progress=False)


@pytest.fixture
def trainings(monkeypatch):
    """The configs ``train`` is called with from here on."""
    calls = []
    real_train = experiments.train

    def counting(cfg):
        calls.append(cfg)
        return real_train(cfg)

    monkeypatch.setattr(experiments, "train", counting)
    return calls


def test_sweep_writes_each_run_and_never_trains_one_twice(tmp_path, where, trainings):
    out = tmp_path / "lr_sweep.json"
    document = lr_sweep.sweep(["adamw"], out, **GRID, **where)
    assert [r["learning_rate"] for r in document["rows"]] == [1e-3, 3e-3]
    written = read_results(out)
    assert written["suite"] == "lr_sweep" and written["rows"] == document["rows"]
    assert written["config"]["base"]["n_layer"] == 1 and written["config"]["max_iters"] == 4
    best = written["summary"]["best"]["adamw"]
    assert best["final_val_loss"] == min(r["final_val_loss"] for r in written["rows"])
    assert len(trainings) == 2

    again = lr_sweep.sweep(["adamw"], out, **GRID, **where)  # rows in the file
    assert again["rows"] == written["rows"]
    out.unlink()  # the runs directory still holds their results
    rebuilt = lr_sweep.sweep(["adamw"], out, **GRID, **where)
    assert [r["evals"] for r in rebuilt["rows"]] == [r["evals"] for r in written["rows"]]
    wider = lr_sweep.sweep(["adamw"], out, seed=1, lrs=[1e-3, 1e-3, 1e-2], weight_decays=[0.1],
                           **where)
    assert sorted(r["learning_rate"] for r in wider["rows"]) == [1e-3, 3e-3, 1e-2]
    assert [cfg.learning_rate for cfg in trainings] == [1e-3, 3e-3, 1e-2]


def test_an_interrupted_sweep_resumes_mid_run_as_if_never_stopped(tmp_path, where,
                                                                  interrupt_at_eval):
    whole = lr_sweep.sweep(["adamw"], tmp_path / "whole.json", **GRID, base=TINY,
                           runs_dir=tmp_path / "whole", progress=False)
    out = tmp_path / "lr_sweep.json"
    disarm = interrupt_at_eval(5)  # the second run's evaluation at iteration 2
    with pytest.raises(KeyboardInterrupt):
        lr_sweep.sweep(["adamw"], out, **GRID, **where)
    disarm()
    assert len(read_results(out)["rows"]) == 1
    resumed = lr_sweep.sweep(["adamw"], out, **GRID, **where)
    assert [r["evals"] for r in resumed["rows"]] == [r["evals"] for r in whole["rows"]]
    assert ([r["final_val_loss_whole_split"] for r in resumed["rows"]]
            == [r["final_val_loss_whole_split"] for r in whole["rows"]])


def test_parallel_workers_give_the_same_losses(tmp_path, where):
    serial = lr_sweep.sweep(["adamw"], tmp_path / "serial.json", **GRID, **where)["rows"]
    parallel = lr_sweep.sweep(["adamw"], tmp_path / "parallel.json", **GRID, workers=2,
                              base=TINY, runs_dir=tmp_path / "parallel", progress=False)["rows"]
    by_lr = {r["learning_rate"]: r for r in parallel}  # in order of completion
    assert sorted(by_lr) == [1e-3, 3e-3]
    for row in serial:
        assert by_lr[row["learning_rate"]]["final_val_loss"] == pytest.approx(
            row["final_val_loss"], rel=1e-5)
        assert by_lr[row["learning_rate"]]["torch_threads"] >= 1


def test_workers_must_be_positive(tmp_path, where):
    with pytest.raises(ValueError, match="workers"):
        lr_sweep.sweep(["adamw"], tmp_path / "x.json", **GRID, workers=0, **where)
    assert not (tmp_path / "x.json").exists()


def test_a_diverged_point_is_a_row_with_null_losses_outside_the_best(tmp_path, where, trainings):
    out = tmp_path / "lr_sweep.json"
    document = lr_sweep.sweep(["adamw"], out, seed=1, lrs=[1e-3, 1e6], weight_decays=[0.1], **where)
    finished, diverged = document["rows"]
    assert (finished["diverged"], finished["diverged_at"]) == (False, None)
    assert (diverged["diverged"], diverged["diverged_at"]) == (True, 1)
    assert diverged["learning_rate"] == 1e6 and diverged["evals"] == []
    assert all(diverged[key] is None for key in ("final_train_loss", "final_val_loss",
                                                 "final_val_loss_whole_split",
                                                 "median_ms_per_iter", "optimizer_state_bytes"))
    assert json.loads(out.read_text(), parse_constant=pytest.fail) == document  # strict JSON
    assert document["summary"]["best"]["adamw"]["learning_rate"] == 1e-3
    assert lr_sweep.sweep(["adamw"], out, seed=1, lrs=[1e6], weight_decays=[0.1],
                          **where)["rows"] == document["rows"]
    assert len(trainings) == 2  # the diverged point was not trained again


def test_the_summary_leaves_diverged_rows_out():
    diverged = dict(diverged=True, diverged_at=7)  # with null losses
    rows = [grid_row(1e-2, 0.0, 2.0), grid_row(1e-1, 0.0, None, **diverged),
            grid_row(1e-2, 0.0, 1.8, variant="beta2-0.95"),
            grid_row(1e-2, 0.0, None, variant="eps-1e-12", **diverged)]
    summary = lr_sweep.summary(rows)
    assert summary["best"]["adamsn"]["learning_rate"] == 1e-2
    assert list(summary["variants"]) == ["beta2-0.95"]
    assert lr_sweep.best_per_optimizer(rows[1:2]) == {}


def test_the_grid_plan_covers_each_weight_decay_once():
    plan = lr_sweep.grid_plan(["adamw", "adamsnsm"], seed=3, max_iters=100)
    assert len(plan) == len(lr_sweep.ADAM_LRS) + sum(map(len, lr_sweep.GRID["adamsnsm"].values()))
    assert {r["optimizer_hparams"]["rank"] for r in plan if r["optimizer"] == "adamsnsm"} == {32}
    assert {(r["seed"], r["max_iters"]) for r in plan} == {(3, 100)}
    # a weight decay outside the grid takes the main lrs; a point named twice is one run
    (odd,) = {r["weight_decay"] for r in lr_sweep.grid_plan(["adamw"], 1, 100, weight_decays=[0.5])}
    assert odd == 0.5
    assert len(lr_sweep.grid_plan(["adamw"], 1, 100, lrs=[1e-3, 1e-3], weight_decays=[0.1])) == 1
    with pytest.raises(ValueError, match="unknown optimizer"):
        lr_sweep.grid_plan(["sgd"], 1, 100)
    with pytest.raises(ValueError, match="grid is empty"):
        lr_sweep.grid_plan(["adamw"], 1, 100, weight_decays=[])


def test_a_peer_whose_package_is_missing_stops_the_plan_with_the_install_hint(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # its import now fails
    with pytest.raises(ValueError, match=r'lion_pytorch needs the lion-pytorch package.*'
                                         r'pip install -e "\.\[peers\]"'):
        lr_sweep.grid_plan(["adamw", "lion_pytorch"], 1, 100)


def grid_row(lr, wd, val_loss, seed=1, max_iters=100, **extra):
    return dict(optimizer="adamsn", learning_rate=lr, weight_decay=wd, optimizer_hparams={},
                seed=seed, max_iters=max_iters, final_train_loss=val_loss,
                final_val_loss=val_loss, **extra)


def test_the_ablation_plan_starts_from_the_best_grid_point_of_its_seed_and_length():
    rows = [grid_row(1e-2, 0.0, 2.0), grid_row(4e-2, 0.01, 1.9),
            grid_row(3e-2, 0.0, 1.5, seed=2), grid_row(3e-2, 0.0, 1.5, max_iters=50),
            grid_row(2e-2, 0.0, 1.0, variant="warmup-200")]
    plan = lr_sweep.ablation_plan(["warmup-200", "subset-8-lr1e-2", "wd-3e-2", "tied-per-element",
                                   "warmup-200"], rows, seed=1, max_iters=100)
    assert [(r["variant"], r["learning_rate"], r["weight_decay"]) for r in plan] == [
        ("warmup-200", 4e-2, 0.01), ("subset-8-lr1e-2", 1e-2, 0.01), ("wd-3e-2", 4e-2, 3e-2),
        ("tied-per-element", 4e-2, 0.01)]
    assert [r["train_overrides"] for r in plan] == [{"warmup_iters": 200}, {}, {}, {}]
    assert plan[1]["optimizer_hparams"] == {"subset_size": 8}
    assert plan[3]["optimizer_hparams"] == {"tied_weight_as_linear": False}
    with pytest.raises(ValueError, match="unknown variant"):
        lr_sweep.ablation_plan(["no-such-thing"], rows, seed=1, max_iters=100)
    with pytest.raises(ValueError, match="run the sweep with --optimizers adamsn first"):
        lr_sweep.ablation_plan(["warmup-200"], rows, seed=3, max_iters=100)


def test_ablations_are_rows_of_their_own_outside_the_best(tmp_path, where):
    out = tmp_path / "lr_sweep.json"
    with pytest.raises(ValueError, match="run the sweep with --optimizers adamsn first"):
        lr_sweep.ablate(["warmup-200"], out, seed=1, **where)
    lr_sweep.sweep(["adamsn"], out, seed=1, lrs=[1e-3, 1e-2], weight_decays=[0.0], **where)
    best = read_results(out)["summary"]["best"]["adamsn"]
    document = lr_sweep.ablate(["baseline", "warmup-200"], out, seed=1, **where)
    ablations = [r for r in document["rows"] if r.get("variant")]
    assert [r["variant"] for r in ablations] == ["baseline", "warmup-200"]
    assert ablations[1]["train_overrides"] == {"warmup_iters": 200}
    assert document["summary"]["best"]["adamsn"] == best
    grid_best = [r for r in document["rows"] if not r.get("variant")
                 and r["learning_rate"] == best["learning_rate"]]
    assert ablations[0]["evals"] == grid_best[0]["evals"]  # the same run, trained again
    change = document["summary"]["variants"]["warmup-200"]["val_loss_change"]
    assert change == pytest.approx(ablations[1]["final_val_loss"] - best["final_val_loss"])
    run = f"adamsn-warmup-200-lr{best['learning_rate']:g}-wd0-4it"
    assert (tmp_path / "runs" / run / "seed-1" / "result.json").is_file()


@pytest.fixture
def cli_paths(tmp_path, monkeypatch):
    """The CLI's scratch, published and runs paths moved under tmp_path, on the tiny model."""
    paths = dict(SCRATCH=tmp_path / "runs" / "lr_sweep.json",
                 PUBLISHED=tmp_path / "results" / "cpu" / "lr_sweep.json",
                 RUNS_DIR=tmp_path / "runs" / "lr_sweep")
    for name, path in paths.items():
        monkeypatch.setattr(lr_sweep, name, path)
    monkeypatch.setattr(lr_sweep, "BABY", TINY)
    return paths


def test_the_cli_writes_a_scratch_file_unless_asked_to_publish(cli_paths, trainings, capsys):
    args = ["--optimizers", "adamw", "--lrs", "1e-3", "--weight-decays", "0.1", "--seed", "1"]
    assert lr_sweep.main(args) == 0
    assert read_results(cli_paths["SCRATCH"])["rows"][0]["max_iters"] == TINY.max_iters
    assert not cli_paths["PUBLISHED"].exists()
    assert "[1/1] adamw-lr0.001-wd0.1-4it seed 1: iter 2/4" in capsys.readouterr().err

    assert lr_sweep.main(args + ["--publish"]) == 0
    assert (read_results(cli_paths["PUBLISHED"])["rows"]
            == read_results(cli_paths["SCRATCH"])["rows"])
    assert len(trainings) == 1  # the published row came from the runs directory


def test_the_cli_refuses_publish_with_out_and_unknown_optimizers(cli_paths, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lr_sweep.main(["--publish", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown optimizer"):
        lr_sweep.main(["--optimizers", "sgd", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists() and not cli_paths["SCRATCH"].exists()


def test_the_default_paths_are_scratch_ones_git_ignores():
    assert lr_sweep.PUBLISHED == lr_sweep.REPO_ROOT / "results" / "cpu" / "lr_sweep.json"
    scratch = [lr_sweep.SCRATCH, lr_sweep.RUNS_DIR / "adamw-lr0.001-wd0.1-2000it" / "seed-1337"]
    assert all(lr_sweep.REPO_ROOT / "runs" in path.parents for path in scratch)
    try:
        ignored = subprocess.run(["git", "check-ignore", *map(str, scratch)],
                                 cwd=lr_sweep.REPO_ROOT, capture_output=True, text=True)
    except OSError:
        pytest.skip("no git here")
    if ignored.returncode == 128:
        pytest.skip(f"not a git checkout: {ignored.stderr.strip()}")
    assert ignored.stdout.splitlines() == list(map(str, scratch)), "runs/ should be git-ignored"
