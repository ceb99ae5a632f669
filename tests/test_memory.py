"""Analytic KV-cache bytes against the bytes a real cache holds; what optimizer state holds."""

from types import SimpleNamespace

import pytest
import torch

from memeff import GPTConfig, KVCache
from memeff.memory import cache_bytes, kv_cache_bytes, plain_tensors, state_bytes, tensor_bytes


@pytest.mark.parametrize("n_head, n_kv_head", [(8, 8), (8, 2), (8, 1), (12, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kv_cache_bytes_equals_live_cache(n_head, n_kv_head, dtype):
    config = GPTConfig(n_layer=3, n_head=n_head, n_kv_head=n_kv_head, n_embd=16 * n_head,
                       block_size=128, vocab_size=10)
    cache = KVCache(config, batch_size=2, max_len=100, dtype=dtype)
    assert cache_bytes(cache) == kv_cache_bytes(config, 2, 100, dtype)
    # written out: 2 (K and V) * layers * batch * positions * kv heads * head_dim * itemsize
    itemsize = 4 if dtype == torch.float32 else 2
    assert kv_cache_bytes(config, 2, 100, dtype) == 2 * 3 * 2 * 100 * n_kv_head * 16 * itemsize


def test_kv_cache_bytes_per_token_of_a_70b_shape():
    shape = SimpleNamespace(n_layer=80, n_kv_head=8, head_dim=128)
    assert kv_cache_bytes(shape, batch_size=1, seq_len=1, dtype=torch.float16) == 327_680


def test_kv_cache_bytes_without_head_dim_uses_n_embd_over_n_head():
    shape = SimpleNamespace(n_layer=12, n_head=12, n_kv_head=12, n_embd=768)
    assert kv_cache_bytes(shape, 1, 1, torch.float32) == 2 * 12 * 12 * 64 * 4


def test_tensor_bytes_counts_each_storage_once():
    base = torch.zeros(10, 10)
    views = [base, base[2:], base.T]
    assert tensor_bytes(views) == 400
    assert tensor_bytes([base, torch.zeros(5, dtype=torch.float64)]) == 440


# ---- state_bytes: what an optimizer's state really holds ----

class PackedState(torch.Tensor):
    """A wrapper tensor subclass as torchao's quantized optimizer state: codes and scales."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"PackedState does not run {func}")


class Projector:
    """A projector held as an object in the state, as GaLore's and APOLLO's."""

    def __init__(self, matrix):
        self.ortho_matrix = matrix
        self.rank = matrix.shape[0]
        self.itself = self  # a cycle the walk must not follow forever


def test_state_bytes_walks_containers_objects_and_subclasses_counting_each_storage_once():
    param = torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.SGD([param], lr=0.1)
    shared = torch.zeros(16)  # 64 bytes, referred to three times
    optimizer.state[param] = {
        "step": 3,  # a Python number holds no tensor bytes
        "moments": [torch.zeros(5), (torch.zeros(2, dtype=torch.float64),)],  # 20 + 16
        "nested": {"a": torch.zeros(7, dtype=torch.uint8), "view": shared[4:]},  # 7 + 64
        "projector": Projector(torch.zeros(3, 4)),  # 48
        "quantized": PackedState(torch.zeros(8, dtype=torch.uint8), shared),  # 8 (+ shared)
        "shared": shared,
        "the_param_itself": param.data[2:],  # a view of the param: not state
    }
    assert state_bytes(optimizer) == 20 + 16 + 7 + 64 + 48 + 8


def test_plain_tensors_unpack_subclasses_into_their_inner_tensors_recursively():
    codes, scale, plain = torch.zeros(8, dtype=torch.uint8), torch.zeros(2), torch.zeros(3)
    nested = PackedState(PackedState(codes, scale), plain)
    assert [t is x for t, x in zip(plain_tensors([nested, plain]), (codes, scale, plain, plain))] \
        == [True] * 4
    assert len(list(plain_tensors([nested, plain]))) == 4  # one per reference: storages not merged
