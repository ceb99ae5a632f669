"""KV-cache memory against head and group counts, and the time of decode and prefill.

Memory is counted three ways and must agree: the analytic formula, the bytes of the live
cache tensors, and (CUDA) the allocator's delta when the cache is created.

Decode is timed as a model runs it: one step is one new token's attention over the cache
of every layer in turn, so a step reads the whole cache once. The model is as deep as it
takes for its cache to hold ``LLC_MULTIPLE`` times the last-level cache (LLC: the CPU's
L3, the GPU's L2, see ``bench.hardware.last_level_cache``), within ``MIN_LAYERS``,
``MAX_LAYERS`` and ``MAX_CACHE_BYTES``. Before every timed step an untimed pass over a
scratch buffer ``FLUSH_MULTIPLE`` times the LLC evicts what the last step left, so a
small cache that ``MAX_LAYERS`` keeps under the LLC is still read from memory, as in a
model whose weights pass through the LLC between two reads of a layer's cache.

Each decode grid point is timed with both decode paths of
``memeff.model.grouped_attention``, one row each: ``folded`` (a group's query heads laid
along the query axis; ``decode_attention="folded"``) and ``sdpa_gqa``
(``F.scaled_dot_product_attention(..., enable_gqa=True)``; ``decode_attention="sdpa"``).
For MHA the two are the same call. The two paths are timed in turn, round after round,
so that drifts of a shared machine fall on both alike; ``time_per_token_s`` is that
median, and ``median_s`` is pytest-benchmark's own, of two more rounds. Depth differs
between rows, so rows compare by ``time_per_layer_s``; ``gb_per_s`` is the cache bytes a
token reads over its step's time.

Prefill is one layer's attention of ``seq_len`` tokens to each other, causally.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from bench.common import (allocator_bytes, allocator_delta, interleaved_medians,
                          require_profile, sdpa_backend, synchronize, synchronized)
from bench.hardware import last_level_cache
from memeff import GPTConfig, KVCache
from memeff.memory import cache_bytes, kv_cache_bytes
from memeff.model import grouped_attention

HEAD_DIM = 128
BATCH_SIZE = 1
N_HEADS = (8, 16, 32)
KV_DIVISORS = (1, 2, 4, 8, None)  # n_kv_head = n_head // divisor; None is MQA (1)
SEQ_LENS = (256, 1024, 4096, 8192)  # prefill
DECODE_SEQ_LENS = (1024, 4096, 8192)  # shorter MQA caches need far over MAX_LAYERS layers
CUDA_ONLY_SEQ_LENS = (8192,)  # the GPU target's context length; minutes more on a CPU
DTYPES = (torch.float32, torch.bfloat16)
# decode rows' attention -> memeff.model.grouped_attention's decode_attention
ATTENTIONS = {"folded": "folded", "sdpa_gqa": "sdpa"}
LLC_MULTIPLE = 4  # the decode model's cache holds this many LLCs, where the caps allow
MIN_LAYERS = 2  # every step moves from one layer's cache to another's
MAX_LAYERS = 128  # about the deepest published models (126 layers)
MAX_CACHE_BYTES = 2 * 2**30  # the decode model's whole cache
FLUSH_MULTIPLE = 2  # the scratch buffer updated before each decode step, in LLCs
DECODE_ROUNDS, DECODE_WARMUP = 7, 1  # interleaved rounds of both paths
DECODE_BENCHMARK_ROUNDS = 2  # pytest-benchmark's own, per row

# published shapes, for bytes per token of context (batch 1, 16-bit cache)
MODEL_SHAPES = {
    "gpt2-small (MHA)": dict(n_layer=12, n_head=12, n_kv_head=12, head_dim=64),
    "mistral-7b (GQA 32/8)": dict(n_layer=32, n_head=32, n_kv_head=8, head_dim=128),
    "llama-2-70b (GQA 64/8)": dict(n_layer=80, n_head=64, n_kv_head=8, head_dim=128),
    "falcon-7b (MQA 71/1)": dict(n_layer=32, n_head=71, n_kv_head=1, head_dim=64),
}


@dataclass
class DecodeRow:
    """One decode step through every layer's cache, with one attention implementation."""
    attention: str  # "folded" or "sdpa_gqa"
    n_head: int
    n_kv_head: int
    seq_len: int
    dtype: str
    head_dim: int
    batch_size: int
    n_layer: int  # layers decoded: the cache's depth
    layer_bytes: int  # K and V of one layer
    analytic_bytes: int  # the whole cache, from the formula
    live_bytes: int  # the whole cache, from its tensors
    allocator_bytes: int | None  # the CUDA allocator's growth; None on a CPU
    llc_bytes: int
    llc_source: str
    llc_multiple: float  # cache bytes / last-level cache bytes
    flush_bytes: int  # the buffer updated before each timed step
    bytes_read_per_token: int
    time_per_token_s: float  # interleaved median of one step over every layer
    time_per_layer_s: float
    gb_per_s: float
    interleaved_rounds: int
    load_average_1m: float | None
    sdpa_backend: str


@dataclass
class PrefillRow:
    n_head: int
    n_kv_head: int
    seq_len: int
    dtype: str
    head_dim: int
    sdpa_backend: str


@dataclass
class ModelShapeRow:
    """A published model's K/V bytes per token, from the formula."""
    model: str
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    dtype: str
    bytes_per_token: int
    mha_bytes_per_token: int
    fraction_of_mha: float
    gib_per_32k_context: float


def suite_config(profile: str) -> dict:
    return {"head_dim": HEAD_DIM, "batch_size": BATCH_SIZE,
            "n_heads": list(N_HEADS), "kv_divisors": [d or "mqa" for d in KV_DIVISORS],
            "seq_lens": list(SEQ_LENS), "decode_seq_lens": list(DECODE_SEQ_LENS),
            "cuda_only_seq_lens": list(CUDA_ONLY_SEQ_LENS),
            "dtypes": [str(d) for d in DTYPES],
            "decode_attentions": {row: f"grouped_attention(decode_attention={name!r})"
                                  for row, name in ATTENTIONS.items()},
            "decode_depth": {"llc_multiple": LLC_MULTIPLE, "min_layers": MIN_LAYERS,
                             "max_layers": MAX_LAYERS, "max_cache_bytes": MAX_CACHE_BYTES},
            "decode_flush_llc_multiple": FLUSH_MULTIPLE,
            "decode_rounds": DECODE_ROUNDS, "decode_warmup_rounds": DECODE_WARMUP,
            "decode_benchmark_rounds": DECODE_BENCHMARK_ROUNDS,
            "timed": {"decode": "one new token's attention over the cache of every layer in "
                                "turn (one decode step), after an untimed pass that evicts "
                                "the last-level cache",
                      "prefill": "causal attention of seq_len tokens, one layer"}}


def n_kv_head_of(n_head: int, divisor: int | None) -> int:
    """n_kv_head for a grid point; skips the MQA point where it repeats n_head / 8 = 1."""
    if divisor is None and n_head // 8 == 1:
        pytest.skip("n_head/8 is already 1: the MQA row is the kv1-8 row")
    return 1 if divisor is None else n_head // divisor


def cuda_only(seq_len: int, device: torch.device) -> None:
    if seq_len in CUDA_ONLY_SEQ_LENS and device.type != "cuda":
        pytest.skip(f"seq_len {seq_len} is measured on CUDA only")


# ---- decode ---------------------------------------------------------------------------

def decode_depth(layer_bytes: int, llc_bytes: int) -> int:
    """Layers whose caches add up to ``LLC_MULTIPLE`` LLCs, within the caps."""
    wanted = max(MIN_LAYERS, math.ceil(LLC_MULTIPLE * llc_bytes / layer_bytes))
    return max(1, min(wanted, MAX_LAYERS, MAX_CACHE_BYTES // layer_bytes))


def decode_profile(n_head: int, divisor: int | None, seq_len: int, dtype: torch.dtype,
                   device: torch.device) -> str:
    """The profile that measures a decode grid point."""
    cuda_only(seq_len, device)
    if seq_len in CUDA_ONLY_SEQ_LENS:
        return "default" if n_head == 32 and dtype == torch.bfloat16 else "full"
    if n_head == 32 and seq_len == 1024 and divisor in (1, 4):
        return "quick"
    # on a CPU, SDPA's enable_gqa in bfloat16 takes about MHA's time per layer whatever
    # the number of K/V heads, and MQA has the most layers: here that is seconds a step
    slow = device.type == "cpu" and dtype == torch.bfloat16 and divisor is None and seq_len == 4096
    if (n_head == 32 and not slow) or (dtype == torch.float32 and seq_len == 1024 and divisor != 2):
        return "default"
    return "full"


DECODE_POINTS = [(n_head, divisor, seq_len, dtype) for n_head in N_HEADS
                 for divisor in KV_DIVISORS for seq_len in DECODE_SEQ_LENS for dtype in DTYPES]


def point_id(point) -> str:
    n_head, divisor, seq_len, dtype = point
    kv = "mqa" if divisor is None else f"kv1-{divisor}"
    return f"H{n_head}-{kv}-T{seq_len}-{str(dtype).removeprefix('torch.')}"


def filled_cache(config: GPTConfig, seq_len: int, dtype, device) -> KVCache:
    cache = KVCache(config, BATCH_SIZE, seq_len, dtype=dtype, device=device)
    for t in cache.tensors():
        t.normal_()
    cache.length = seq_len
    return cache


def decode_step(q, keys, values, decode_attention: str) -> None:
    """One new token's attention over every layer's cache, in layer order."""
    offset = keys[0].size(2) - 1
    for k, v in zip(keys, values):
        grouped_attention(q, k, v, causal_offset=offset, decode_attention=decode_attention)


@pytest.fixture(scope="module", params=DECODE_POINTS, ids=point_id)
def decode_model(request, device, profile):
    """The filled caches of one decode grid point and both paths' interleaved medians.

    Module scope with one param at a time: pytest runs a point's rows together and frees
    its caches before it builds the next point's.
    """
    n_head, divisor, seq_len, dtype = request.param
    require_profile(profile, decode_profile(n_head, divisor, seq_len, dtype, device))
    n_kv_head = n_kv_head_of(n_head, divisor)
    llc_bytes, llc_source = last_level_cache(device)

    def config_of(n_layer: int) -> GPTConfig:
        return GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                         n_embd=n_head * HEAD_DIM, block_size=seq_len, vocab_size=1)

    layer_bytes = kv_cache_bytes(config_of(1), BATCH_SIZE, seq_len, dtype)
    config = config_of(decode_depth(layer_bytes, llc_bytes))
    cache, allocated = allocator_delta(lambda: filled_cache(config, seq_len, dtype, device), device)
    analytic = kv_cache_bytes(config, BATCH_SIZE, seq_len, dtype)
    live = cache_bytes(cache)
    assert live == analytic, f"live cache tensors hold {live} bytes, formula says {analytic}"
    if allocated is not None:  # every K/V tensor here is a multiple of the allocator's block
        assert allocated == analytic == allocator_bytes(cache.tensors()), (
            f"allocator grew by {allocated} bytes, formula says {analytic}")

    q = torch.randn(BATCH_SIZE, n_head, 1, HEAD_DIM, dtype=dtype, device=device)
    scratch = torch.zeros(FLUSH_MULTIPLE * llc_bytes // 4, device=device)  # float32

    def evict_llc():
        scratch.add_(1.0)  # read and written, so every line of it passes through the LLC
        synchronize(device)

    steps = {attention: functools.partial(decode_step, q, cache.keys, cache.values, name)
             for attention, name in ATTENTIONS.items()}
    medians = interleaved_medians(steps, DECODE_ROUNDS, device, warmup=DECODE_WARMUP,
                                  before_each=evict_llc)
    yield SimpleNamespace(
        config=config, cache=cache, q=q, seq_len=seq_len, dtype=dtype, steps=steps,
        evict_llc=evict_llc, flush_bytes=scratch.nbytes, medians=medians,
        # other work on the machine stalls each multi-threaded kernel call; say how much there was
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        layer_bytes=layer_bytes, analytic=analytic, live=live, allocated=allocated,
        llc_bytes=llc_bytes, llc_source=llc_source)


@pytest.mark.benchmark(group="kv-cache decode")
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_decode(benchmark, record, device, decode_model, attention):
    m = decode_model
    config, q, k, v = m.config, m.q, m.cache.keys[0], m.cache.values[0]
    group = config.n_head // config.n_kv_head
    benchmark.pedantic(synchronized(m.steps[attention], device), setup=m.evict_llc,
                       rounds=DECODE_BENCHMARK_ROUNDS)
    if attention == "folded":
        backend = sdpa_backend(q.view(BATCH_SIZE, config.n_kv_head, group, HEAD_DIM), k, v)
    else:
        backend = sdpa_backend(q, k, v, enable_gqa=group > 1)
    seconds = m.medians[attention]
    record(DecodeRow(
        attention=attention, n_head=config.n_head, n_kv_head=config.n_kv_head,
        seq_len=m.seq_len, dtype=str(m.dtype), head_dim=HEAD_DIM, batch_size=BATCH_SIZE,
        n_layer=config.n_layer, layer_bytes=m.layer_bytes, analytic_bytes=m.analytic,
        live_bytes=m.live, allocator_bytes=m.allocated, llc_bytes=m.llc_bytes,
        llc_source=m.llc_source, llc_multiple=m.analytic / m.llc_bytes,
        flush_bytes=m.flush_bytes, bytes_read_per_token=m.analytic,
        time_per_token_s=seconds, time_per_layer_s=seconds / config.n_layer,
        gb_per_s=m.analytic / seconds / 1e9, interleaved_rounds=DECODE_ROUNDS,
        load_average_1m=m.load_average, sdpa_backend=backend))


# ---- prefill --------------------------------------------------------------------------

def prefill_profile(n_head: int, divisor: int | None, seq_len: int, dtype: torch.dtype,
                    device: torch.device) -> str:
    """The profile that measures a prefill grid point."""
    cuda_only(seq_len, device)
    if seq_len in CUDA_ONLY_SEQ_LENS:
        return "default" if n_head == 32 and dtype == torch.bfloat16 else "full"
    if device.type == "cpu" and (seq_len == 4096 or dtype == torch.bfloat16):
        return "full"  # seconds per call on a CPU
    if n_head == 8 and seq_len <= 1024 and dtype == torch.float32 and divisor in (1, 4, 8):
        return "quick"
    if n_head in (8, 32) and divisor != 2:
        return "default"
    return "full"


@pytest.mark.benchmark(group="kv-cache prefill")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("divisor", KV_DIVISORS, ids=lambda d: "mqa" if d is None else f"kv1-{d}")
@pytest.mark.parametrize("n_head", N_HEADS, ids=lambda h: f"H{h}")
def test_prefill(benchmark, record, device, profile, n_head, divisor, seq_len, dtype):
    require_profile(profile, prefill_profile(n_head, divisor, seq_len, dtype, device))
    n_kv_head = n_kv_head_of(n_head, divisor)
    q = torch.randn(BATCH_SIZE, n_head, seq_len, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(BATCH_SIZE, n_kv_head, seq_len, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    gqa = n_kv_head != n_head
    benchmark.pedantic(synchronized(lambda: grouped_attention(q, k, v), device),
                       rounds=3, warmup_rounds=1)
    record(PrefillRow(n_head=n_head, n_kv_head=n_kv_head, seq_len=seq_len, dtype=str(dtype),
                      head_dim=HEAD_DIM,
                      sdpa_backend=sdpa_backend(q, k, v, is_causal=True, enable_gqa=gqa)))


# ---- published shapes -----------------------------------------------------------------

@pytest.mark.benchmark(group="kv-cache bytes per token")
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_model_shape_bytes_per_token(benchmark, record, model):
    shape = SimpleNamespace(**MODEL_SHAPES[model])
    mha = SimpleNamespace(**{**MODEL_SHAPES[model], "n_kv_head": shape.n_head})
    # analytic only: the timed call is the formula itself
    per_token = benchmark(kv_cache_bytes, shape, 1, 1, torch.bfloat16)
    mha_per_token = kv_cache_bytes(mha, 1, 1, torch.bfloat16)
    record(ModelShapeRow(model=model, **MODEL_SHAPES[model], dtype="torch.bfloat16",
                         bytes_per_token=per_token, mha_bytes_per_token=mha_per_token,
                         fraction_of_mha=per_token / mha_per_token,
                         gib_per_32k_context=per_token * 32768 / 2**30))


def summarize(rows: list[dict]) -> dict:
    """GQA and MQA time against MHA's, and which decode path is faster.

    ``decode_ratio_to_mha``: per dtype, n_head, seq_len and attention, each n_kv_head's
    time per layer over that attention's MHA time per layer (below 1 is faster), beside
    its cache bytes over MHA's. ``decode_faster_attention``: per grid point, both paths'
    time per layer and the faster one. ``decode_faster_attention_by_dtype``: per dtype,
    how many GQA and MQA points (n_kv_head < n_head) each path wins.
    ``prefill_speedup_vs_mha``: MHA's prefill time over each n_kv_head's.
    """
    decode = [r for r in rows if r["test"].startswith("test_decode") and r.get("median_s")]
    by_point: dict[tuple, dict[str, dict]] = {}  # (dtype, n_head, seq_len, n_kv_head) -> rows
    for r in decode:
        key = (r["dtype"], r["n_head"], r["seq_len"], r["n_kv_head"])
        by_point.setdefault(key, {})[r["attention"]] = r

    ratios = []
    for (dtype, n_head, seq_len, n_kv_head), paths in sorted(by_point.items()):
        for attention, r in sorted(paths.items()):
            base = by_point.get((dtype, n_head, seq_len, n_head), {}).get(attention)
            if base is None:
                continue
            ratios.append({"dtype": dtype, "n_head": n_head, "seq_len": seq_len,
                           "n_kv_head": n_kv_head, "attention": attention,
                           "time_ratio_to_mha": r["time_per_layer_s"] / base["time_per_layer_s"],
                           "bytes_ratio_to_mha": r["layer_bytes"] / base["layer_bytes"]})

    faster, wins = [], {}
    for (dtype, n_head, seq_len, n_kv_head), paths in sorted(by_point.items()):
        if set(paths) != set(ATTENTIONS):
            continue
        times = {a: paths[a]["time_per_layer_s"] for a in ATTENTIONS}
        best = min(times, key=times.get)
        faster.append({"dtype": dtype, "n_head": n_head, "seq_len": seq_len,
                       "n_kv_head": n_kv_head, "faster": best,
                       **{f"{a}_time_per_layer_s": t for a, t in times.items()},
                       "sdpa_gqa_over_folded": times["sdpa_gqa"] / times["folded"]})
        if n_kv_head < n_head:
            counts = wins.setdefault(dtype, dict.fromkeys(ATTENTIONS, 0))
            counts[best] += 1

    prefill = [r for r in rows if r["test"].startswith("test_prefill") and r.get("median_s")]
    base = {(r["n_head"], r["seq_len"], r["dtype"]): r["median_s"]
            for r in prefill if r["n_kv_head"] == r["n_head"]}
    return {
        "decode_ratio_to_mha": ratios,
        "decode_faster_attention": faster,
        "decode_faster_attention_by_dtype": wins,
        "prefill_speedup_vs_mha": [
            {"n_head": r["n_head"], "n_kv_head": r["n_kv_head"], "seq_len": r["seq_len"],
             "dtype": r["dtype"],
             "speedup": base[(r["n_head"], r["seq_len"], r["dtype"])] / r["median_s"]}
            for r in prefill if (r["n_head"], r["seq_len"], r["dtype"]) in base
        ],
    }
