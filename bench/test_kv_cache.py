"""KV-cache memory against head and group counts, and the time of decode and prefill.

Memory is counted three ways and must agree: the analytic formula, the bytes of the live
cache tensors, and (CUDA) the allocator's delta when the cache is created. Times are of the
attention of one layer, the part of a step that reads the cache and that GQA changes:
one new token attending to ``seq_len`` cached tokens (decode), and ``seq_len`` tokens
attending causally to each other (prefill).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.common import (allocator_bytes, allocator_delta, require_profile, sdpa_backend,
                          synchronized)
from memeff import GPTConfig, KVCache
from memeff.memory import cache_bytes, kv_cache_bytes
from memeff.model import grouped_attention

HEAD_DIM = 128
N_LAYER = 2  # layers in the measured cache; bytes scale linearly with it
BATCH_SIZE = 1
N_HEADS = (8, 16, 32)
KV_DIVISORS = (1, 2, 4, 8, None)  # n_kv_head = n_head // divisor; None is MQA (1)
SEQ_LENS = (256, 1024, 4096, 8192)
CUDA_ONLY_SEQ_LENS = (8192,)  # the GPU target's context length; minutes more on a CPU
DTYPES = (torch.float32, torch.bfloat16)

# published shapes, for bytes per token of context (batch 1, 16-bit cache)
MODEL_SHAPES = {
    "gpt2-small (MHA)": dict(n_layer=12, n_head=12, n_kv_head=12, head_dim=64),
    "mistral-7b (GQA 32/8)": dict(n_layer=32, n_head=32, n_kv_head=8, head_dim=128),
    "llama-2-70b (GQA 64/8)": dict(n_layer=80, n_head=64, n_kv_head=8, head_dim=128),
    "falcon-7b (MQA 71/1)": dict(n_layer=32, n_head=71, n_kv_head=1, head_dim=64),
}


def suite_config(profile: str) -> dict:
    return {"head_dim": HEAD_DIM, "n_layer": N_LAYER, "batch_size": BATCH_SIZE,
            "n_heads": list(N_HEADS), "kv_divisors": [d or "mqa" for d in KV_DIVISORS],
            "seq_lens": list(SEQ_LENS), "cuda_only_seq_lens": list(CUDA_ONLY_SEQ_LENS),
            "dtypes": [str(d) for d in DTYPES],
            "timed": "attention of one layer over the cache"}


def kv_grid(test):
    """Parametrize ``test`` over n_head x n_kv_head divisor x seq_len x dtype."""
    for axis in (
        pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch.")),
        pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda t: f"T{t}"),
        pytest.mark.parametrize("divisor", KV_DIVISORS,
                                ids=lambda d: "mqa" if d is None else f"kv1-{d}"),
        pytest.mark.parametrize("n_head", N_HEADS, ids=lambda h: f"H{h}"),
    ):
        test = axis(test)
    return test


def n_kv_head_of(n_head: int, divisor: int | None) -> int:
    """n_kv_head for a grid point; skips the MQA point where it repeats n_head / 8 = 1."""
    if divisor is None and n_head // 8 == 1:
        pytest.skip("n_head/8 is already 1: the MQA row is the kv1-8 row")
    return 1 if divisor is None else n_head // divisor


def needed_profile(n_head: int, divisor: int | None, seq_len: int, dtype: torch.dtype,
                   device: torch.device) -> str:
    """The profile that measures a grid point; skips the CUDA-only lengths elsewhere."""
    if seq_len in CUDA_ONLY_SEQ_LENS:
        if device.type != "cuda":
            pytest.skip(f"seq_len {seq_len} is measured on CUDA only")
        return "default" if n_head == 32 and dtype == torch.bfloat16 else "full"
    if n_head == 8 and seq_len <= 1024 and dtype == torch.float32 and divisor in (1, 4, 8):
        return "quick"
    if n_head in (8, 32) and divisor != 2:
        return "default"
    return "full"


def filled_cache(config: GPTConfig, seq_len: int, dtype, device) -> KVCache:
    cache = KVCache(config, BATCH_SIZE, seq_len, dtype=dtype, device=device)
    for t in cache.tensors():
        t.normal_()
    cache.length = seq_len
    return cache


@pytest.mark.benchmark(group="kv-cache decode")
@kv_grid
def test_decode(benchmark, record, device, profile, n_head, divisor, seq_len, dtype):
    require_profile(profile, needed_profile(n_head, divisor, seq_len, dtype, device))
    n_kv_head = n_kv_head_of(n_head, divisor)
    config = GPTConfig(n_layer=N_LAYER, n_head=n_head, n_kv_head=n_kv_head,
                       n_embd=n_head * HEAD_DIM, block_size=seq_len, vocab_size=1)
    cache, allocated = allocator_delta(lambda: filled_cache(config, seq_len, dtype, device), device)
    analytic = kv_cache_bytes(config, BATCH_SIZE, seq_len, dtype)
    live = cache_bytes(cache)
    assert live == analytic, f"live cache tensors hold {live} bytes, formula says {analytic}"
    if allocated is not None:  # every K/V tensor here is a multiple of the allocator's block
        assert allocated == analytic == allocator_bytes(cache.tensors()), (
            f"allocator grew by {allocated} bytes, formula says {analytic}")

    q = torch.randn(BATCH_SIZE, n_head, 1, HEAD_DIM, dtype=dtype, device=device)
    k, v = cache.keys[0], cache.values[0]
    grouped_q = q.view(BATCH_SIZE, n_kv_head, n_head // n_kv_head, HEAD_DIM)
    benchmark(synchronized(lambda: grouped_attention(q, k, v, causal_offset=seq_len - 1), device))
    record(n_head=n_head, n_kv_head=n_kv_head, seq_len=seq_len, dtype=str(dtype),
           head_dim=HEAD_DIM, n_layer=N_LAYER, batch_size=BATCH_SIZE,
           analytic_bytes=analytic, live_bytes=live, allocator_bytes=allocated,
           bytes_per_token=analytic // seq_len,
           sdpa_backend=sdpa_backend(grouped_q, k, v))


@pytest.mark.benchmark(group="kv-cache prefill")
@kv_grid
def test_prefill(benchmark, record, device, profile, n_head, divisor, seq_len, dtype):
    needed = needed_profile(n_head, divisor, seq_len, dtype, device)
    if device.type == "cpu" and (seq_len == 4096 or dtype == torch.bfloat16):
        needed = "full"  # seconds per call on a CPU
    require_profile(profile, needed)
    n_kv_head = n_kv_head_of(n_head, divisor)
    q = torch.randn(BATCH_SIZE, n_head, seq_len, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(BATCH_SIZE, n_kv_head, seq_len, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    gqa = n_kv_head != n_head
    benchmark.pedantic(synchronized(lambda: grouped_attention(q, k, v), device),
                       rounds=3, warmup_rounds=1)
    record(n_head=n_head, n_kv_head=n_kv_head, seq_len=seq_len, dtype=str(dtype),
           head_dim=HEAD_DIM, sdpa_backend=sdpa_backend(q, k, v, is_causal=True, enable_gqa=gqa))


@pytest.mark.benchmark(group="kv-cache bytes per token")
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_model_shape_bytes_per_token(benchmark, record, model):
    shape = SimpleNamespace(**MODEL_SHAPES[model])
    mha = SimpleNamespace(**{**MODEL_SHAPES[model], "n_kv_head": shape.n_head})
    # analytic only: the timed call is the formula itself
    per_token = benchmark(kv_cache_bytes, shape, 1, 1, torch.bfloat16)
    mha_per_token = kv_cache_bytes(mha, 1, 1, torch.bfloat16)
    record(model=model, **MODEL_SHAPES[model], dtype="torch.bfloat16",
           bytes_per_token=per_token, mha_bytes_per_token=mha_per_token,
           fraction_of_mha=per_token / mha_per_token,
           gib_per_32k_context=per_token * 32768 / 2**30)


def summarize(rows: list[dict]) -> dict:
    """Decode and prefill speedup of each n_kv_head over n_kv_head = n_head, same T and dtype."""
    summary = {}
    for test in ("test_decode", "test_prefill"):
        timed = [r for r in rows if r["test"].startswith(test) and r.get("median_s")]
        base = {(r["n_head"], r["seq_len"], r["dtype"]): r["median_s"]
                for r in timed if r["n_kv_head"] == r["n_head"]}
        summary[test.removeprefix("test_") + "_speedup_vs_mha"] = [
            {"n_head": r["n_head"], "n_kv_head": r["n_kv_head"], "seq_len": r["seq_len"],
             "dtype": r["dtype"],
             "speedup": base[(r["n_head"], r["seq_len"], r["dtype"])] / r["median_s"]}
            for r in timed if (r["n_head"], r["seq_len"], r["dtype"]) in base
        ]
    return summary
