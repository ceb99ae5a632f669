"""Final loss with GPT-2's BPE tokens: the training suite's BPE rows, as a suite of their own.

The same runs as ``bench/test_training.py`` (its ``RUNS``, ``HPARAMS`` and machinery) on
``--dataset bpe``, written to ``training_bpe.json``. They are a separate suite because on a
CPU each takes over half an hour (the output layer has 50257 rows), so the char-level table
can be published, or rerun, without them. ``--profile full`` only.
"""

from __future__ import annotations

import pytest

from bench.test_training import (  # noqa: F401 (module fixtures pytest must see here)
    RUNS, parallel_runs, runs_root, summarize, train_and_record)
from bench.test_training import suite_config as _suite_config


def suite_config(profile: str) -> dict:
    return _suite_config(profile, dataset="bpe")


@pytest.mark.benchmark(group="training (GPT-2 BPE)")
@pytest.mark.parametrize("label", [label for label, run in RUNS.items() if run.dataset == "bpe"])
def test_training_bpe(benchmark, record, request, device, profile, seeds, label, runs_root,
                      parallel_runs):
    train_and_record(benchmark, record, request, device, profile, seeds, label, runs_root,
                     parallel_runs)
