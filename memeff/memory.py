"""Memory, counted two ways: analytic byte counts from shapes, and bytes of live tensors.

Live bytes are counted per storage, so two views of one buffer are counted once.
(The third way, CUDA allocator deltas, belongs to the benchmarks.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the K and V cache of all layers: 2 * n_layer * B * T * n_kv_head * head_dim * itemsize.

    ``config`` is anything with ``n_layer`` and ``n_kv_head`` and either ``head_dim`` or
    ``n_embd`` and ``n_head`` (a :class:`memeff.GPTConfig`, or a namespace describing a
    published model whose head dimension is not ``n_embd / n_head``).
    """
    head_dim = getattr(config, "head_dim", None) or config.n_embd // config.n_head
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch_size * seq_len * config.n_kv_head * head_dim * itemsize


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def cache_bytes(cache) -> int:
    """Measured bytes held by a :class:`memeff.model.KVCache`'s tensors."""
    return tensor_bytes(cache.tensors())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Measured bytes of every tensor in ``optimizer.state`` (``step`` tensors included)."""
    return tensor_bytes(
        value
        for param_state in optimizer.state.values()
        for value in param_state.values()
        if isinstance(value, torch.Tensor)
    )


def expected_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Analytic bytes of ``optimizer``'s state once every parameter has taken a step.

    Counted from each optimizer's formula (see its docstring) and the parameters' shapes
    and dtypes, ``step`` tensors included (a float32 scalar each, float64 for torch's
    optimizers when the default dtype is float64), so it equals :func:`state_bytes` after
    a step in which every parameter had a gradient. Knows torch.optim.AdamW/Adam,
    torch.optim.Adafactor, and memeff's AdamSN and Adafactor.
    """
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            total += _param_state_bytes(optimizer, group, p)
    return total


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _param_state_bytes(optimizer, group: dict, p: torch.Tensor) -> int:
    from memeff.optim._common import largest_divisor_at_most
    from memeff.optim.adafactor import Adafactor, statistics_dtype
    from memeff.optim.adamsn import AdamSN

    numel, item = p.numel(), _itemsize(p.dtype)
    ours_step = 4  # float32 scalar
    torch_step = 8 if torch.get_default_dtype() == torch.float64 else 4
    n = p.shape[0] if p.dim() >= 1 else 1
    if isinstance(optimizer, AdamSN):
        if group["rank"] is not None and p.dim() >= 2:
            m = numel // n
            r = min(group["rank"], n, m)
            first_moment = n * r + r * m  # momentum (n, r) + projector (r, m), or (r, m) + (n, r)
        else:
            first_moment = numel
        if not group["subset_norm"]:
            subsets = numel
        elif group["subset_size"] == "auto":
            subsets = max(n, numel // n) if p.dim() >= 2 else numel
        else:
            subsets = numel // largest_divisor_at_most(numel, group["subset_size"])
        return ours_step + (first_moment + subsets) * item
    if isinstance(optimizer, Adafactor):
        stat = _itemsize(statistics_dtype(p.dtype))
        if group["factored"] and p.dim() >= 2:
            second = (numel // p.shape[-1] + numel // p.shape[-2]) * stat
        else:
            second = numel * stat
        first = numel * item if group["beta1"] is not None else 0
        return ours_step + second + first
    if isinstance(optimizer, torch.optim.Adafactor):
        if p.dim() > 1:
            return torch_step + (numel // p.shape[-1] + numel // p.shape[-2]) * item
        return torch_step + numel * item
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        moments = 3 if group.get("amsgrad") else 2
        return torch_step + moments * numel * item
    raise TypeError(f"expected_state_bytes does not know {type(optimizer).__name__}")
