"""Tiny Shakespeare as characters or GPT-2 BPE tokens, with a verified download and cache.

Where the text comes from, in order:

1. ``$MEMEFF_DATA_DIR/tinyshakespeare/input.txt`` when ``MEMEFF_DATA_DIR`` is set
   (for machines without internet: point it at a directory that already holds the file);
2. the user cache, ``$XDG_CACHE_HOME/memeff`` or ``~/.cache/memeff``;
3. a download from :data:`TINY_SHAKESPEARE_URL` into that cache.

Every source is checked against :data:`TINY_SHAKESPEARE_SHA256`. A download goes to a
temporary file that is renamed into the cache only once its size and checksum are right.
GPT-2 BPE uses tiktoken, which honours ``TIKTOKEN_CACHE_DIR`` for its own files; a file
there that fails its checksum is reported, never deleted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DATA_DIR_ENV = "MEMEFF_DATA_DIR"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394
RELATIVE_PATH = Path("tinyshakespeare") / "input.txt"
DATASETS = ("char", "bpe")
# tiktoken's files of the gpt2 encoding, by the address it caches each under, with their sha256
# (from tiktoken_ext/openai_public.py)
GPT2_BPE_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memeff"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_size(size: int, source: str) -> None:
    if size != TINY_SHAKESPEARE_BYTES:
        raise ValueError(
            f"{source} has {size:,} bytes, expected {TINY_SHAKESPEARE_BYTES:,}: "
            f"the file is truncated or not Tiny Shakespeare; delete it and fetch it again"
        )


def _check_contents(data: bytes, source: str) -> None:
    _check_size(len(data), source)
    digest = _sha256(data)
    if digest != TINY_SHAKESPEARE_SHA256:
        raise ValueError(
            f"{source} has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}: "
            f"the file is corrupted; delete it and fetch it again"
        )


def _check_file(path: Path) -> None:
    """Check that ``path`` holds the text; its size is checked before a byte is read."""
    try:
        _check_size(path.stat().st_size, str(path))
        contents = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror}); fix its permissions or replace "
                         f"it with a readable copy") from None
    _check_contents(contents, str(path))


def download_tiny_shakespeare(cache_dir: Path, url: str = TINY_SHAKESPEARE_URL,
                              timeout: float = 60.0) -> Path:
    """Download the text into ``cache_dir``; nothing is left there unless it verifies."""
    target = cache_dir / RELATIVE_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise FileNotFoundError(
            f"could not download Tiny Shakespeare from {url} ({exc}); on a machine without "
            f"internet set {DATA_DIR_ENV} to a directory holding {RELATIVE_PATH}"
        ) from exc
    _check_contents(data, f"download from {url}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".input.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def tiny_shakespeare_path(cache_dir: Path | None = None, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Path of a verified copy of the text, downloading it into the cache when needed."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override) / RELATIVE_PATH
        if not path.is_file():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={override} but {path} does not exist; point {DATA_DIR_ENV} "
                f"at a directory holding {RELATIVE_PATH}, or unset it to download"
            )
        _check_file(path)
        return path
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    path = cache_dir / RELATIVE_PATH
    if path.is_file():
        _check_file(path)
        return path
    return download_tiny_shakespeare(cache_dir, url)


@dataclass
class Dataset:
    """Token ids of the train (first 90% of the text) and val (last 10%) splits."""

    name: str
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    chars: str | None = None  # the character vocabulary, for "char"


def char_codec(chars: str) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Encoder and decoder for a character vocabulary (id = index in ``chars``)."""
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(text: str) -> list[int]:
        try:
            return [stoi[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(ids: list[int]) -> str:
        return "".join(chars[i] for i in ids)

    return encode, decode


def tiktoken_cache_name(address: str) -> str:
    """The name tiktoken gives its cached copy of ``address``."""
    return hashlib.sha1(address.encode()).hexdigest()


def tiktoken_cache_dir() -> str:
    """The directory tiktoken caches its files in, by the rule of its ``read_file_cached``."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _missing_gpt2_bpe_files(cache_dir: str) -> list[str]:
    """Names of the gpt2 files missing from tiktoken's cache; a file there that fails its
    sha256 is a ValueError, raised before tiktoken would delete it and download it again."""
    missing = []
    for address, sha256 in GPT2_BPE_FILES.items():
        path = Path(cache_dir) / tiktoken_cache_name(address)
        if not path.exists():
            missing.append(f"{path.name} ({address.rsplit('/', 1)[-1]})")
            continue
        try:
            digest = _sha256(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"cannot read {path}, tiktoken's copy of {address} "
                             f"({exc.strerror}); fix its permissions") from None
        if digest != sha256:
            raise ValueError(f"{path}, tiktoken's copy of {address}, has sha256 {digest}, "
                             f"expected {sha256}: it is truncated or corrupt; replace it with "
                             f"a good copy, or delete it to download it again")
    return missing


def bpe_codec() -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], int]:
    """GPT-2 BPE encoder, decoder and vocabulary size from tiktoken.

    tiktoken reads its files from its cache (``TIKTOKEN_CACHE_DIR``) or downloads them; a
    cached file that is not the right one is an error here, and stays where it is.
    """
    import tiktoken  # imported here: loading the encoding reads (or downloads) its files

    cache_dir = tiktoken_cache_dir()
    missing = _missing_gpt2_bpe_files(cache_dir) if cache_dir else list(GPT2_BPE_FILES)
    try:
        enc = tiktoken.get_encoding("gpt2")
    except OSError as exc:  # requests' errors are OSErrors
        raise FileNotFoundError(
            f"tiktoken's cache {cache_dir or '(off)'} lacks {' and '.join(missing)} and "
            f"downloading failed ({type(exc).__name__}); run once with internet to fill it, or "
            f"set TIKTOKEN_CACHE_DIR to a directory holding these files from such a cache"
        ) from None
    return enc.encode_ordinary, enc.decode, enc.n_vocab


def load_dataset(name: str = "char", cache_dir: Path | None = None) -> Dataset:
    """Tiny Shakespeare as ``"char"`` (65 symbols) or ``"bpe"`` (GPT-2 tokens), split 90/10.

    As nanoGPT, the text is split at 90% of its characters and each part encoded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    text = tiny_shakespeare_path(cache_dir).read_text(encoding="utf-8")
    chars = None
    if name == "char":
        chars = "".join(sorted(set(text)))
        encode, decode = char_codec(chars)
        vocab_size = len(chars)
    else:
        encode, decode, vocab_size = bpe_codec()
    split = int(0.9 * len(text))
    train = torch.tensor(encode(text[:split]), dtype=torch.long)
    val = torch.tensor(encode(text[split:]), dtype=torch.long)
    return Dataset(name, train, val, vocab_size, encode, decode, chars)


def check_holds_a_window(data: torch.Tensor, block_size: int) -> None:
    """Raise ValueError unless ``data`` holds a window of ``block_size`` tokens and its next token."""
    if len(data) <= block_size:
        raise ValueError(f"split of {len(data)} tokens is too short for block_size {block_size}")


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens and the same shifted by one."""
    check_holds_a_window(data, block_size)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(block_size)  # (batch_size, block_size)
    return data[index], data[index + 1]
