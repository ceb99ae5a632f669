"""Memory, counted two ways: analytic byte counts from shapes, and bytes of live tensors.

Live bytes are counted per storage, so two views of one buffer are counted once.
(The third way, CUDA allocator deltas, belongs to the benchmarks.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the K and V cache of all layers: 2 * n_layer * B * T * n_kv_head * head_dim * itemsize.

    ``config`` is anything with ``n_layer`` and ``n_kv_head`` and either ``head_dim`` or
    ``n_embd`` and ``n_head`` (a :class:`memeff.GPTConfig`, or a namespace describing a
    published model whose head dimension is not ``n_embd / n_head``).
    """
    head_dim = getattr(config, "head_dim", None) or config.n_embd // config.n_head
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch_size * seq_len * config.n_kv_head * head_dim * itemsize


def tensor_bytes(tensors: Iterable[torch.Tensor], *,
                 excluding: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once and none of
    those behind ``excluding``; of a DTensor, the part this process holds; of another tensor
    subclass (torchao's quantized optimizer state), the plain tensors it is made of."""
    seen = {_storage_key(t) for t in plain_tensors(excluding)}
    total = 0
    for t in plain_tensors(tensors):
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def plain_tensors(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``tensors`` as the plain tensors that hold their bytes: each DTensor replaced by the
    part this process holds and each other tensor subclass (torchao's quantized optimizer
    state) by the inner tensors its ``__tensor_flatten__`` names, recursively; a plain tensor
    or parameter is yielded as it is. Views of one storage are not merged here: count
    storages (as :func:`tensor_bytes` does) to count bytes once."""
    from memeff.optim.sharding import local

    for t in tensors:
        t = local(t)
        if not hasattr(t, "__tensor_flatten__"):  # a plain tensor (or parameter)
            yield t
        else:
            inner_names, _ = t.__tensor_flatten__()
            yield from plain_tensors(getattr(t, name) for name in inner_names)


def cache_bytes(cache) -> int:
    """Measured bytes held by a :class:`memeff.model.KVCache`'s tensors."""
    return tensor_bytes(cache.tensors())


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor ``optimizer.state`` holds, however deep: in dicts, lists and tuples, and
    in the attributes of other objects (GaLore's and APOLLO's projectors). Modules and
    optimizers are not entered (they hold parameters, not state)."""
    seen: set[int] = set()

    def walk(value) -> Iterator[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            yield value
            return
        if isinstance(value, (str, bytes, int, float, complex, bool, type(None),
                              nn.Module, torch.optim.Optimizer)) or id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, dict):
            items = value.values()
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        else:
            items = getattr(value, "__dict__", {}).values()
        for item in items:
            yield from walk(item)

    for param_state in optimizer.state.values():
        yield from walk(param_state)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Measured bytes of every tensor ``optimizer.state`` holds (:func:`state_tensors`:
    ``step`` tensors, quantization codes, scales and maps, projectors), held by this
    process, each storage counted once and none shared with a parameter."""
    params = (p for group in optimizer.param_groups for p in group["params"])
    return tensor_bytes(state_tensors(optimizer), excluding=params)


def expected_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Analytic bytes of ``optimizer``'s state once every parameter has taken a step.

    Each parameter is counted by its optimizer's formula in :mod:`memeff.optim.registry`
    (the one the optimizer's docstring writes out), from shapes and dtypes, ``step``
    tensors included, plus what the optimizer holds once for all of them (bitsandbytes'
    shared quantization maps), so it equals :func:`state_bytes` after a step in which every
    parameter had a gradient.
    """
    from memeff.optim.registry import spec_of

    spec = spec_of(optimizer)
    shared = spec.shared_state_bytes(optimizer) if spec.shared_state_bytes else 0
    return shared + sum(spec.state_bytes(group, p)
                        for group in optimizer.param_groups for p in group["params"])
