"""Shared test setup: point the data at a local copy when the environment does not."""

from pathlib import Path

import pytest

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
