"""The learning-rate sweep script: rows written as runs finish, finished runs never redone."""

import pytest

import bench.lr_sweep as lr_sweep
from bench.results import read_results


def test_sweep_writes_each_run_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "lr_sweep.json"
    document = lr_sweep.sweep(["adamw"], out, max_iters=3, seed=1, lrs=[1e-3, 3e-3],
                              weight_decays=[0.1])
    assert [r["learning_rate"] for r in document["rows"]] == [1e-3, 3e-3]
    written = read_results(out)
    assert written["suite"] == "lr_sweep" and len(written["rows"]) == 2
    best = written["summary"]["best"]["adamw"]
    assert best["final_val_loss"] == min(r["final_val_loss"] for r in written["rows"])

    def no_training(cfg):
        raise AssertionError(f"run {cfg.learning_rate} was already in the file")

    monkeypatch.setattr(lr_sweep, "train", no_training)
    again = lr_sweep.sweep(["adamw"], out, max_iters=3, seed=1, lrs=[1e-3, 3e-3],
                           weight_decays=[0.1])
    assert again["rows"] == written["rows"]


def test_unknown_optimizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer"):
        lr_sweep.main(["--optimizers", "sgd", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_parallel_workers_give_the_same_losses(tmp_path):
    grid = dict(max_iters=3, seed=1, lrs=[1e-3, 3e-3], weight_decays=[0.1])
    serial = lr_sweep.sweep(["adamw"], tmp_path / "serial.json", **grid)["rows"]
    parallel = lr_sweep.sweep(["adamw"], tmp_path / "parallel.json", workers=2, **grid)["rows"]
    by_lr = {r["learning_rate"]: r for r in parallel}  # in order of completion
    assert sorted(by_lr) == [1e-3, 3e-3]
    for row in serial:
        assert by_lr[row["learning_rate"]]["final_val_loss"] == pytest.approx(
            row["final_val_loss"], rel=1e-5)
        assert by_lr[row["learning_rate"]]["torch_threads"] >= 1


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        lr_sweep.sweep(["adamw"], tmp_path / "x.json", max_iters=3, seed=1, workers=0)
    assert not (tmp_path / "x.json").exists()


def test_ablations_run_at_the_best_grid_point_and_stay_out_of_the_best(tmp_path):
    out = tmp_path / "lr_sweep.json"
    with pytest.raises(ValueError, match="run the sweep with --optimizers adamsn first"):
        lr_sweep.ablate(["warmup-200"], out, max_iters=3, seed=1)
    lr_sweep.sweep(["adamsn"], out, max_iters=3, seed=1, lrs=[1e-3, 1e-2], weight_decays=[0.0])
    best = read_results(out)["summary"]["best"]["adamsn"]
    with pytest.raises(ValueError, match="unknown variant"):
        lr_sweep.ablate(["no-such-thing"], out, max_iters=3, seed=1)
    document = lr_sweep.ablate(["tied-per-element", "warmup-200"], out, max_iters=3, seed=1)
    ablations = [r for r in document["rows"] if r.get("variant")]
    assert [r["variant"] for r in ablations] == ["tied-per-element", "warmup-200"]
    assert all(r["learning_rate"] == best["learning_rate"] for r in ablations)
    assert ablations[0]["optimizer_hparams"] == {"tied_weight_as_linear": False}
    assert ablations[1]["train_overrides"] == {"warmup_iters": 200}
    assert document["summary"]["best"]["adamsn"] == best
    change = document["summary"]["variants"]["warmup-200"]["val_loss_change"]
    assert change == pytest.approx(ablations[1]["final_val_loss"] - best["final_val_loss"])


def test_an_ablation_may_train_at_its_own_learning_rate(tmp_path):
    out = tmp_path / "lr_sweep.json"
    lr_sweep.sweep(["adamsn"], out, max_iters=3, seed=1, lrs=[1e-3, 3e-3], weight_decays=[0.0])
    document = lr_sweep.ablate(["subset-8-lr1e-2"], out, max_iters=3, seed=1)
    (row,) = [r for r in document["rows"] if r.get("variant")]
    assert row["learning_rate"] == 1e-2 and row["train_overrides"] == {}
    assert row["optimizer_hparams"] == {"subset_size": 8}
    assert document["summary"]["variants"]["subset-8-lr1e-2"]["learning_rate"] == 1e-2


def test_an_ablation_may_train_at_its_own_weight_decay(tmp_path):
    out = tmp_path / "lr_sweep.json"
    lr_sweep.sweep(["adamsn"], out, max_iters=3, seed=1, lrs=[1e-3], weight_decays=[0.0])
    document = lr_sweep.ablate(["wd-3e-2"], out, max_iters=3, seed=1)
    (row,) = [r for r in document["rows"] if r.get("variant")]
    assert (row["learning_rate"], row["weight_decay"], row["train_overrides"]) == (1e-3, 3e-2, {})
    assert document["summary"]["variants"]["wd-3e-2"]["weight_decay"] == 3e-2
