"""The training checkpoint: what ``memeff.train`` writes and resumes from and
``memeff.sample`` generates from. One file, ``ckpt.pt``; or, for a model sharded with
FSDP2, a directory ``ckpt.dcp`` (see :func:`save_sharded`).

It holds everything that decides the rest of a run: ``model`` and ``optimizer`` and
``scheduler`` state dicts, ``iter``, ``train_config`` and ``model_config`` (as dicts),
``dataset`` and its ``chars`` (the char vocabulary, or None for BPE), the ``evals`` so far,
the ``batch_generator`` state, ``world_size`` and every rank's ``rng_states`` (and
``cuda_rng_states`` on CUDA). It is loaded with ``weights_only=True``: tensors and plain
Python values only, never arbitrary objects, except the projector objects that GaLore's
and APOLLO's state holds (the registry's ``checkpoint_classes``).
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from memeff.io import atomic_write
from memeff.optim.registry import checkpoint_classes

CHECKPOINT_NAME = "ckpt.pt"
SHARDED_NAME = "ckpt.dcp"
SHARDED_META = "meta.pt"  # in a sharded checkpoint: everything but the model and optimizer
OPTIMIZER_SAVED = "optimizer_saved"  # in meta.pt: False before the optimizer's first step
WEIGHTS = ("model", "optimizer")
REQUIRED_KEYS = (*WEIGHTS, "iter", "train_config", "model_config", "dataset",
                 "chars", "evals", "batch_generator")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file itself, given the file or the run directory holding it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete temporary files a killed :func:`save` left behind in ``directory``, and
    the unfinished directory of a killed :func:`save_sharded` (restoring the previous
    checkpoint if it stopped between its two renames). One process calls it."""
    for leftover in Path(directory).glob(f".{CHECKPOINT_NAME}.*.tmp"):
        leftover.unlink(missing_ok=True)
    final, tmp, old = _sharded_paths(Path(directory))
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
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
        with torch.serialization.safe_globals(checkpoint_classes()):
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
    missing = ([key for key in required if key not in checkpoint]
               if isinstance(checkpoint, dict) else list(required))
    if missing:
        raise ValueError(f"{path} is not a memeff training checkpoint (it lacks "
                         f"{', '.join(missing)}); use the ckpt.pt of a memeff.train --out-dir")
    return checkpoint


# ---- sharded (FSDP2) checkpoints -----------------------------------------------------------

def sharded_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SHARDED_NAME


def save_sharded(run_dir: str | os.PathLike, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write a sharded checkpoint into ``run_dir/ckpt.dcp``; a collective: every rank calls it.

    Each rank writes its shards of the model and optimizer state with
    ``torch.distributed.checkpoint``; rank 0 adds ``state`` (the rest of the checkpoint:
    tensors and plain values) as ``meta.pt``. All of it goes into a temporary directory
    that replaces the previous checkpoint once every rank has written, so a crash leaves
    the previous checkpoint whole (or, between the two renames, as ``.ckpt.dcp.old``,
    which :func:`remove_stale_temporaries` restores).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    run_dir = Path(run_dir)
    final, tmp, old = _sharded_paths(run_dir)
    is_main = dist.get_rank() == 0
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    weights = {"model": get_model_state_dict(model)}
    # an optimizer that has not stepped has no state to save; asked for its state dict,
    # torch would first take a step with zero gradients and lr 0 to create it
    has_state = bool(optimizer.state)
    if has_state:
        weights["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(weights, checkpoint_id=tmp)
    if is_main:
        save(tmp / SHARDED_META, {**state, OPTIMIZER_SAVED: has_state})
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything in ``run_dir``'s sharded checkpoint but the model and optimizer state
    (:func:`save_sharded`'s ``state``)."""
    final = sharded_dir(run_dir)
    if not final.is_dir():
        raise FileNotFoundError(f"no sharded checkpoint at {final}; train with --parallel fsdp "
                                f"and --out-dir first")
    return load(final / SHARDED_META, required=(*REQUIRED_KEYS[len(WEIGHTS):], OPTIMIZER_SAVED))


def load_sharded_weights(run_dir: str | os.PathLike, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load ``run_dir``'s sharded checkpoint into ``model`` (and ``optimizer``).

    Under FSDP2 each rank reads its shards; a plain model in a single process (as
    ``memeff.sample`` builds) reads the whole weights.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    final = sharded_dir(run_dir)
    if optimizer is None or not load_sharded_meta(run_dir)[OPTIMIZER_SAVED]:
        weights = {"model": model.state_dict()}
        dcp.load(weights, checkpoint_id=final, no_dist=not _in_process_group())
        model.load_state_dict(weights["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    weights = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(weights, checkpoint_id=final)
    set_state_dict(model, optimizer, model_state_dict=weights["model"],
                   optim_state_dict=weights["optimizer"])


def _sharded_paths(run_dir: Path) -> tuple[Path, Path, Path]:
    return (run_dir / SHARDED_NAME, run_dir / f".{SHARDED_NAME}.tmp",
            run_dir / f".{SHARDED_NAME}.old")


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
