"""Tiny Shakespeare: codecs round-trip, the split, batches, and a verified download."""

import os
import re
from pathlib import Path

import pytest
import torch

from memeff import data
from memeff.data import get_batch, load_dataset, tiny_shakespeare_path


def test_char_dataset_round_trips_the_text(char_data):
    text = tiny_shakespeare_path().read_text(encoding="utf-8")
    assert char_data.vocab_size == 65
    ids = char_data.encode(text)
    assert char_data.decode(ids) == text
    assert len(char_data.train) == int(0.9 * len(text))
    assert torch.equal(torch.cat([char_data.train, char_data.val]), torch.tensor(ids))


def test_bpe_dataset_round_trips_the_text():
    bpe = load_dataset("bpe")
    text = tiny_shakespeare_path().read_text(encoding="utf-8")
    ids = bpe.encode(text)
    assert len(ids) == 338_025
    assert bpe.decode(ids) == text
    assert bpe.vocab_size == 50257
    assert len(bpe.train) + len(bpe.val) == 338_025


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="char, bpe"):
        load_dataset("words")


def test_batches_come_from_the_generator_not_the_global_rng(char_data):
    torch.manual_seed(0)
    x1, y1 = get_batch(char_data.train, 4, 8, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    x2, y2 = get_batch(char_data.train, 4, 8, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 8)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty cache directory, with the data-directory override unset."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    return tmp_path / "cache"


def serve(tmp_path: Path, contents: bytes) -> str:
    """A file:// address serving ``contents``, standing in for the download server."""
    source = tmp_path / "served.txt"
    source.write_bytes(contents)
    return source.as_uri()


def cached_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_download_verifies_and_caches(tmp_path, isolated_cache, real_text):
    path = tiny_shakespeare_path(isolated_cache, url=serve(tmp_path, real_text))
    assert path == isolated_cache / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == real_text
    assert cached_files(isolated_cache) == [path]
    # a second call uses the cache and never touches the address
    assert tiny_shakespeare_path(isolated_cache, url="file:///nonexistent") == path


def test_corrupted_download_is_rejected_and_not_cached(tmp_path, isolated_cache, real_text):
    corrupted = bytearray(real_text)
    corrupted[1000] ^= 0xFF
    with pytest.raises(ValueError, match="sha256"):
        tiny_shakespeare_path(isolated_cache, url=serve(tmp_path, bytes(corrupted)))
    assert cached_files(isolated_cache) == []


def test_truncated_download_is_rejected_and_not_cached(tmp_path, isolated_cache, real_text):
    with pytest.raises(ValueError, match="truncated"):
        tiny_shakespeare_path(isolated_cache, url=serve(tmp_path, real_text[:50_000]))
    assert cached_files(isolated_cache) == []


def test_corrupted_cached_file_is_reported(isolated_cache, real_text):
    path = isolated_cache / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(real_text[:-1] + b"?")
    with pytest.raises(ValueError, match="corrupted"):
        tiny_shakespeare_path(isolated_cache)


def test_no_data_and_no_network_names_the_variable(tmp_path, isolated_cache):
    with pytest.raises(FileNotFoundError, match=data.DATA_DIR_ENV):
        tiny_shakespeare_path(isolated_cache, url=(tmp_path / "missing.txt").as_uri())
    assert cached_files(isolated_cache) == []


def test_override_without_the_file_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=data.DATA_DIR_ENV):
        tiny_shakespeare_path()


def data_dir_with(tmp_path, monkeypatch, contents: bytes) -> Path:
    """``MEMEFF_DATA_DIR`` pointed at ``tmp_path`` holding ``contents`` as the text file."""
    path = tmp_path / data.RELATIVE_PATH
    path.parent.mkdir(parents=True)
    path.write_bytes(contents)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    return path


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_text_file_is_a_value_error_naming_it(tmp_path, monkeypatch, real_text):
    path = data_dir_with(tmp_path, monkeypatch, real_text)
    path.chmod(0)
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))} .*permissions"):
        load_dataset("char")


def test_text_file_that_fails_to_read_is_a_value_error_naming_it(tmp_path, monkeypatch,
                                                                 real_text):
    """The same as an unreadable file, for root too: the read itself fails."""
    path = data_dir_with(tmp_path, monkeypatch, real_text)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    message = f"cannot read {re.escape(str(path))} \\(Permission denied\\)"
    with pytest.raises(ValueError, match=message):
        tiny_shakespeare_path()


def test_oversized_text_file_is_rejected_before_reading_it(tmp_path, monkeypatch):
    path = tmp_path / data.RELATIVE_PATH
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(1_500_000_000)  # sparse: takes no disk space
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{self} was opened before its size was checked")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ValueError, match="1,500,000,000 bytes, expected 1,115,394"):
        tiny_shakespeare_path()


@pytest.fixture(scope="session")
def gpt2_bpe_files() -> dict[str, bytes]:
    """The good tiktoken cache files of the gpt2 encoding, by file name, from the environment's
    cache (session scope: read before any test points TIKTOKEN_CACHE_DIR elsewhere)."""
    from memeff.data import GPT2_BPE_FILES, tiktoken_cache_name

    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    return {tiktoken_cache_name(address): (cache / tiktoken_cache_name(address)).read_bytes()
            for address in GPT2_BPE_FILES}


@pytest.fixture
def offline_tiktoken(tmp_path, monkeypatch):
    """tiktoken with nothing loaded, no network, and its cache in an empty ``tmp_path/tiktoken``."""
    import requests
    import tiktoken.load
    import tiktoken.registry

    def no_network(address):
        raise requests.ConnectionError(f"no network for {address}")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def test_missing_tokenizer_files_name_the_cache_and_the_files(offline_tiktoken):
    names = [data.tiktoken_cache_name(address) for address in data.GPT2_BPE_FILES]
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR") as raised:
        data.bpe_codec()
    message = str(raised.value)
    assert str(offline_tiktoken) in message and all(name in message for name in names)
    assert "\n" not in message


def test_truncated_tokenizer_file_is_reported_and_kept(gpt2_bpe_files, offline_tiktoken):
    for name, contents in gpt2_bpe_files.items():
        (offline_tiktoken / name).write_bytes(contents)
    truncated = offline_tiktoken / next(iter(gpt2_bpe_files))
    contents = truncated.read_bytes()[:1000]
    truncated.write_bytes(contents)
    with pytest.raises(ValueError, match=f"{re.escape(str(truncated))}, .*sha256.*replace it"):
        data.bpe_codec()
    assert truncated.read_bytes() == contents
