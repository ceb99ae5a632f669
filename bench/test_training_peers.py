"""Final loss of the peers (optimizers from other packages) on Tiny Shakespeare.

The peers' rows of ``bench/test_training.py``'s ``RUNS``: each peer on nanoGPT's baby
config at the best point of its lr sweep (``python -m bench.lr_sweep``; the registry's
``tuned`` settings), trained the same way and written to ``training_peers.json``, whose
seeds pair with ``training.json``'s. A suite of its own so that the peers, which need
``pip install -e ".[peers]"``, publish without retraining ours; a missing package skips
its rows with the install hint. ``--profile quick`` (200 iterations) and ``full``.
"""

from __future__ import annotations

import pytest

from bench.test_training import (  # noqa: F401 (module fixtures pytest must see here)
    RUNS, driver, runs_root, suite_of, summarize, train_and_record)
from bench.test_training import suite_config as _suite_config


def suite_config(profile: str) -> dict:
    return _suite_config(profile, "training_peers")


@pytest.mark.benchmark(group="training (peers)")
@pytest.mark.parametrize("label", [name for name, run in RUNS.items()
                                   if suite_of(run) == "training_peers"])
def test_training_peers(benchmark, record, device, profile, label, driver):
    train_and_record(benchmark, record, device, profile, label, driver)
