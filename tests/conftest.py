"""Shared test setup: point the data at a local copy when the environment does not."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config):
    # machines without internet keep the data in ../shared; CI sets these explicitly
    if "MEMEFF_DATA_DIR" not in os.environ and (SHARED / "data").is_dir():
        os.environ["MEMEFF_DATA_DIR"] = str(SHARED / "data")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture(scope="session")
def char_data():
    from memeff.data import load_dataset

    return load_dataset("char")


@pytest.fixture(scope="session")
def real_text() -> bytes:
    from memeff.data import tiny_shakespeare_path

    return tiny_shakespeare_path().read_bytes()
