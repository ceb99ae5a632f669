"""The training suites' runs: which suite trains each, and the settings each trains at."""

from __future__ import annotations

import pytest

from bench.test_training import HPARAMS, RUNS, not_trainable, suite_of
from memeff.optim.registry import OPTIMIZER_NAMES, PEER_NAMES


def test_each_run_belongs_to_one_suite_by_its_tokens_and_package():
    suites = {name: suite_of(run) for name, run in RUNS.items()}
    assert {suites[name] for name in PEER_NAMES} == {"training_peers"}
    assert {suites[name] for name in OPTIMIZER_NAMES} == {"training"}
    assert {suites[name] for name, run in RUNS.items()
            if run.settings.get("dataset") == "bpe"} == {"training_bpe"}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_ours_and_the_baselines_train_at_swept_settings(name):
    assert {"learning_rate", "weight_decay"} <= set(HPARAMS[name])
    assert not_trainable(RUNS[name]) is None


def test_a_peer_without_a_swept_lr_is_not_trained(monkeypatch):
    """Its run would take TrainConfig's default lr, which nobody chose: it is skipped, and
    the reason names the sweep to run."""
    run = RUNS["torch_muon"]  # its package is torch: installed wherever this runs
    monkeypatch.setitem(HPARAMS, "torch_muon", {"weight_decay": 0.1})
    assert "bench.lr_sweep --optimizers torch_muon" in not_trainable(run)
    monkeypatch.setitem(HPARAMS, "torch_muon", {"learning_rate": 1e-3, "weight_decay": 0.1})
    assert not_trainable(run) is None


def test_a_peer_whose_package_is_missing_is_not_trained_and_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # its import now fails
    monkeypatch.setitem(HPARAMS, "lion_pytorch", {"learning_rate": 1e-3, "weight_decay": 1.0})
    assert 'pip install -e ".[peers]"' in not_trainable(RUNS["lion_pytorch"])
