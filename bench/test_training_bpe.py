"""Final loss with GPT-2's BPE tokens: the training suite's BPE rows, as a suite of their own.

The BPE rows of ``bench/test_training.py``'s ``RUNS``, trained the same way and written to
``training_bpe.json``. They are a separate suite because on a CPU each takes over half an
hour (the output layer has 50257 rows), so the char-level table can be published, or
rerun, without them. ``--profile full`` only.
"""

from __future__ import annotations

import pytest

from bench.test_training import (  # noqa: F401 (module fixtures pytest must see here)
    RUNS, driver, runs_root, suite_of, summarize, train_and_record)
from bench.test_training import suite_config as _suite_config


def suite_config(profile: str) -> dict:
    return _suite_config(profile, "training_bpe")


@pytest.mark.benchmark(group="training (GPT-2 BPE)")
@pytest.mark.parametrize("label", [name for name, run in RUNS.items() if suite_of(run) == "training_bpe"])
def test_training_bpe(benchmark, record, device, profile, label, driver):
    train_and_record(benchmark, record, device, profile, label, driver)
