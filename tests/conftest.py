"""Shared test setup: point the data at a local copy when the environment does not."""

from pathlib import Path

import pytest
import torch

from bench.common import use_shared_copies


def pytest_configure(config):
    use_shared_copies(Path(__file__).resolve().parents[1].parent / "shared")


@pytest.fixture(scope="session")
def char_data():
    from memeff.data import load_dataset

    return load_dataset("char")


@pytest.fixture(scope="session")
def real_text() -> bytes:
    from memeff.data import tiny_shakespeare_path

    return tiny_shakespeare_path().read_bytes()


@pytest.fixture
def interrupt_at_eval(monkeypatch):
    """``arm(n)`` makes train()'s n-th evaluation raise KeyboardInterrupt, as Ctrl-C would;
    ``arm`` returns a function that puts the real evaluation back."""
    from memeff import train as train_module

    real_estimate = train_module.estimate_loss

    def arm(n: int):
        calls = []

        def estimate(*args):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_estimate(*args)

        monkeypatch.setattr(train_module, "estimate_loss", estimate)
        return lambda: monkeypatch.setattr(train_module, "estimate_loss", real_estimate)

    return arm


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: a tiny model trains fastest so, most of all on a CPU
    other work shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
