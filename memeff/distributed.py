"""Data-parallel processes started by ``torchrun``: the process group, ranks, the local device,
and the sharding of a model over them (FSDP2).

``torchrun --nproc_per_node=N`` starts N copies of a program and gives each ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` (and the rendezvous address) in its environment. A plain
``python`` run has none of them: it is a world of one process, and nothing here then
touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={text!r} is not an integer; launch with torchrun, "
                         f"which sets it, or unset it") from None


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group(device_type: str) -> Iterator[None]:
    """Join the process group of a torchrun launch for the block, and leave it afterwards.

    gloo for ``"cpu"``, nccl for ``"cuda"`` (each process on ``cuda:LOCAL_RANK``). The group
    is destroyed when the block ends, by an error too; a block that ends normally first
    waits at a barrier for every rank. Does nothing in a single process, or when the caller
    already holds a group (the caller then owns it).
    """
    if launched_world_size() == 1 or _in_group():
        yield
        return
    if device_type not in BACKENDS:
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), got device "
                         f"type {device_type!r}; pass --device cpu or --device cuda")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(BACKENDS[device_type])
    try:
        yield
        # rank 0 finishes last (it writes the results): no rank closes its connections
        # while another still holds them open
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the current group (1 outside one)."""
    return dist.get_world_size() if _in_group() else 1


def rank() -> int:
    """This process's rank in the current group (0 outside one)."""
    return dist.get_rank() if _in_group() else 0


def is_main() -> bool:
    """Whether this process logs, evaluates and writes files: rank 0."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` in a group; anything else is kept."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def all_gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (``[value]`` in a single process)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """FSDP2 over the current group: each transformer block is one ``fully_shard`` unit,
    the root (embeddings, final norm and the tied head) another. Every parameter becomes a
    DTensor sharded on dim 0 over a 1-D mesh of all ranks; a block's weights are gathered
    for its forward and backward only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
