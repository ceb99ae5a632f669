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
    """Bytes of the storages behind ``tensors``, each storage counted once; of a DTensor,
    the part this process holds."""
    from memeff.optim.sharding import local

    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in tensors:
        t = local(t)
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
    """Measured bytes of every tensor in ``optimizer.state`` (``step`` tensors included),
    held by this process."""
    return tensor_bytes(
        value
        for param_state in optimizer.state.values()
        for value in param_state.values()
        if isinstance(value, torch.Tensor)
    )


def expected_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Analytic bytes of ``optimizer``'s state once every parameter has taken a step.

    Each parameter is counted by its optimizer's formula in :mod:`memeff.optim.registry`
    (the one the optimizer's docstring writes out), from shapes and dtypes, ``step``
    tensors included, so it equals :func:`state_bytes` after a step in which every
    parameter had a gradient.
    """
    from memeff.optim.registry import state_formula

    formula = state_formula(optimizer)
    return sum(formula(group, p) for group in optimizer.param_groups for p in group["params"])
