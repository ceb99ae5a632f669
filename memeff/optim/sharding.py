"""Parameters sharded on dim 0 (FSDP2's ``fully_shard``), and what makes a sharded step exact.

Under ``fully_shard`` every parameter is a DTensor on a 1-D device mesh with placement
``Shard(0)``: rank k holds rows ``[k * c, (k + 1) * c)`` of dim 0, ``c = ceil(n / N)`` (the
last ranks hold fewer rows, or none). The optimizers step the local rows. A statistic
that only reads one row (AdamW's moments, AdamSN's row subsets, Adafactor's row means)
is then already what one process computes; one that sums over dim 0 (AdamSN's column
subsets, Adafactor's column means and RMS values, the subspace projections that contract
over rows) is summed over the mesh with :meth:`Shards.sum`.

State keeps the param's layout: a state tensor whose dim 0 follows the param's rows is a
``Shard(0)`` DTensor holding this rank's rows; a statistic over all rows (a (1, m) column
statistic, a projector onto the columns) is ``Replicate()``, the same on every rank. So
``torch.distributed.checkpoint`` saves and loads optimizer state like any sharded state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass(frozen=True)
class Shards:
    """How one parameter's dim 0 is split over the ranks of its mesh."""

    mesh: object  # torch.distributed.DeviceMesh
    rows: int  # dim-0 size of the whole parameter
    local_rows: int
    offset: int  # index of this rank's first row

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the mesh's ranks, in place (and returned)."""
        dist.all_reduce(tensor, group=self.mesh.get_group())
        return tensor

    def gather(self, local: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The whole tensor of ``shape`` whose rows this rank holds as ``local``."""
        return self.split(local, shape).full_tensor()

    def same_everywhere(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place: values computed on every rank from
        the same inputs (an SVD) then agree bit for bit."""
        dist.broadcast(tensor, group=self.mesh.get_group(), group_src=0)
        return tensor

    def split(self, local: torch.Tensor, shape) -> DTensor:
        """A ``Shard(0)`` DTensor of ``shape`` of which ``local`` holds this rank's rows."""
        shape = torch.Size(shape)
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=_contiguous_strides(shape))

    def replicate(self, tensor: torch.Tensor) -> DTensor:
        """A ``Replicate()`` DTensor: ``tensor`` is the same on every rank."""
        return DTensor.from_local(tensor, self.mesh, [Replicate()], run_check=False)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def shards_of(param: torch.Tensor, optimizer_name: str) -> Shards | None:
    """How ``param`` is sharded, or None for a plain tensor.

    A DTensor must be ``Shard(0)`` on a 1-D mesh, as ``fully_shard`` makes it; any other
    placement is a ValueError saying so.
    """
    if not isinstance(param, DTensor):
        return None
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(
            f"{optimizer_name} steps DTensor parameters sharded on dim 0 over a 1-D mesh "
            f"(FSDP2's fully_shard); got placements {tuple(param.placements)} on a "
            f"{mesh.ndim}-D mesh for a parameter of shape {tuple(param.shape)}")
    rows = param.shape[0]
    per_rank = math.ceil(rows / mesh.size())
    offset = min(mesh.get_local_rank() * per_rank, rows)
    local_rows = param.to_local().shape[0]
    if local_rows != min(per_rank, rows - offset):
        raise ValueError(
            f"{optimizer_name} expects torch.chunk's split of dim 0 ({per_rank} rows per "
            f"rank); rank {mesh.get_local_rank()} holds {local_rows} of the {rows} rows of a "
            f"parameter of shape {tuple(param.shape)}")
    return Shards(mesh, rows, local_rows, offset)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its rows, or the whole of a replicated one); a plain
    tensor itself. In-place writes to it are writes to the DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(param: torch.Tensor) -> int:
    """Rows of dim 0 this rank holds (all of them for a plain tensor; 1 for a scalar)."""
    if param.dim() == 0:
        return 1
    return local(param).shape[0]


class StateFactory:
    """Makes one parameter's zero-filled state: plain tensors for a plain parameter; for a
    sharded one, DTensors that hold this rank's rows (:meth:`rows`) or the whole (:meth:`whole`)."""

    def __init__(self, param: torch.Tensor, shards: Shards | None):
        self.device = local(param).device
        self.shards = shards

    def rows(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` whose dim 0 is the param's dim 0, sharded like it."""
        if self.shards is None:
            return torch.zeros(shape, dtype=dtype, device=self.device)
        local_shape = (self.shards.local_rows, *shape[1:])
        return self.shards.split(torch.zeros(local_shape, dtype=dtype, device=self.device), shape)

    def whole(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` held whole by every rank."""
        tensor = torch.zeros(shape, dtype=dtype, device=self.device)
        return tensor if self.shards is None else self.shards.replicate(tensor)
