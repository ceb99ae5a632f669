"""The training checkpoint: one file that ``memeff.train`` writes and resumes from and
``memeff.sample`` generates from.

It holds everything that decides the rest of a run: ``model`` and ``optimizer`` and
``scheduler`` state dicts, ``iter``, ``train_config`` and ``model_config`` (as dicts),
``dataset`` and its ``chars`` (the char vocabulary, or None for BPE), the ``evals`` so far,
the ``batch_generator`` state, ``world_size`` and every rank's ``rng_states`` (and
``cuda_rng_states`` on CUDA). It is loaded with ``weights_only=True``: tensors and plain
Python values only, never arbitrary objects.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from memeff.io import atomic_write

CHECKPOINT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "optimizer", "iter", "train_config", "model_config", "dataset",
                 "chars", "evals", "batch_generator")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file itself, given the file or the run directory holding it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete temporary files a killed :func:`save` left behind in ``directory``."""
    for leftover in Path(directory).glob(f".{CHECKPOINT_NAME}.*.tmp"):
        leftover.unlink(missing_ok=True)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path`` (a file or a run directory).

    A missing file is a FileNotFoundError; a file that is not a whole memeff checkpoint is
    a ValueError that says so.
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train with --out-dir first")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt); train "
                         f"again into a new --out-dir")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ValueError(f"{path} is not a readable checkpoint (corrupt: {type(exc).__name__});"
                             f" train again into a new --out-dir") from None
        raise ValueError(f"{path} holds objects other than tensors and plain values, which "
                         f"memeff does not load; use a checkpoint written by memeff.train") from None
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                         f"{type(exc).__name__}); train again into a new --out-dir") from None
    missing = ([key for key in REQUIRED_KEYS if key not in checkpoint]
               if isinstance(checkpoint, dict) else list(REQUIRED_KEYS))
    if missing:
        raise ValueError(f"{path} is not a memeff training checkpoint (it lacks "
                         f"{', '.join(missing)}); use the ckpt.pt of a memeff.train --out-dir")
    return checkpoint
