"""The GPT's attention against independent references, and cached decoding against uncached."""

import math

import pytest
import torch
import torch.nn.functional as F

from memeff import GPT, GPTConfig, KVCache
from memeff.model import DECODE_ATTENTIONS, grouped_attention


def small_config(**overrides) -> GPTConfig:
    fields = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50,
                  dropout=0.0, bias=True)
    fields.update(overrides)
    return GPTConfig(**fields)


def reference_attention(q, k, v, offset=0):
    """Causal softmax attention written out, K/V repeated per query head (h reads h // group)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    T, S = q.size(2), k.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, n_head, T, S)
    query_pos = offset + torch.arange(T)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > query_pos, float("-inf"))
    return scores.softmax(dim=-1) @ v


def multi_head_reference(attn, x):
    """Plain multi-head attention computed from the layer's weights, one head at a time."""
    B, T, C = x.shape
    H, d = attn.n_head, attn.head_dim
    W, b = attn.c_attn.weight, attn.c_attn.bias
    Wq, Wk, Wv = W[:C], W[C:2 * C], W[2 * C:]
    bq, bk, bv = b[:C], b[C:2 * C], b[2 * C:]
    heads = []
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        rows = slice(h * d, (h + 1) * d)
        q = x @ Wq[rows].T + bq[rows]
        k = x @ Wk[rows].T + bk[rows]
        v = x @ Wv[rows].T + bv[rows]
        att = (q @ k.transpose(-2, -1) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        heads.append(att.softmax(-1) @ v)
    return attn.c_proj(torch.cat(heads, dim=-1))


def test_mha_matches_plain_multi_head_attention():
    torch.manual_seed(0)
    model = GPT(small_config(n_kv_head=4)).double()
    attn = model.transformer.h[0].attn
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), multi_head_reference(attn, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_kv_head", [8, 4, 2, 1], ids=lambda n: f"kv{n}")
@pytest.mark.parametrize("offset", [0, 5], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("T", [1, 7], ids=lambda t: f"T{t}")
def test_grouped_attention_matches_repeat_interleave(n_kv_head, offset, T):
    torch.manual_seed(1)
    q = torch.randn(2, 8, T, 16, dtype=torch.float64)
    k = torch.randn(2, n_kv_head, offset + T, 16, dtype=torch.float64)
    v = torch.randn(2, n_kv_head, offset + T, 16, dtype=torch.float64)
    expected = reference_attention(q, k, v, offset)
    torch.testing.assert_close(grouped_attention(q, k, v, causal_offset=offset), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decode_attention", DECODE_ATTENTIONS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("n_kv_head", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_decode_paths_match_float64_reference(n_kv_head, dtype, tolerance, decode_attention):
    torch.manual_seed(6)
    q = torch.randn(3, 8, 1, 32, dtype=torch.float64)
    k = torch.randn(3, n_kv_head, 37, 32, dtype=torch.float64)
    v = torch.randn(3, n_kv_head, 37, 32, dtype=torch.float64)
    expected = reference_attention(q, k, v, offset=36)
    out = grouped_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal_offset=36,
                            decode_attention=decode_attention)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_unknown_decode_attention_raises_value_error():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="decode_attention"):
        grouped_attention(q, k, k, causal_offset=4, decode_attention="repeat")
    with pytest.raises(ValueError, match="decode_attention"):
        GPT(small_config(), decode_attention="repeat")


def test_projection_shapes_follow_kv_heads():
    attn = GPT(small_config(n_kv_head=1)).transformer.h[0].attn
    # Q: n_head * head_dim = 32 rows; K and V: one head of 8 rows each
    assert attn.c_attn.weight.shape == (32 + 2 * 8, 32)


@pytest.mark.parametrize("decode_attention", DECODE_ATTENTIONS)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=lambda n: f"kv{n}")
def test_cached_logits_equal_uncached_forward(n_kv_head, decode_attention):
    torch.manual_seed(2)
    model = GPT(small_config(n_kv_head=n_kv_head), decode_attention=decode_attention).eval()
    idx = torch.randint(50, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=16)
    prefill, _ = model(idx[:, :5], cache=cache)
    steps = [prefill] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 16


def uncached_generate(model, idx, max_new_tokens, temperature, top_k, generator):
    """nanoGPT's sampling loop: every step recomputes the last block_size tokens."""
    logits_seen = []
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        logits_seen.append(logits.clone())
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth] = -float("inf")
        next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx, logits_seen


@pytest.mark.parametrize("decode_attention", DECODE_ATTENTIONS)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=lambda n: f"kv{n}")
def test_generate_matches_uncached_past_block_size(n_kv_head, decode_attention, monkeypatch):
    torch.manual_seed(3)
    model = GPT(small_config(n_kv_head=n_kv_head), decode_attention=decode_attention).eval()
    prompt = torch.randint(50, (2, 3))
    new_tokens = 40  # 43 tokens, well past block_size 16
    expected, expected_logits = uncached_generate(model, prompt, new_tokens, 0.9, 10,
                                                  torch.Generator().manual_seed(7))

    seen = []
    real_multinomial = torch.multinomial

    def recording_multinomial(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real_multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    out = model.generate(prompt, new_tokens, temperature=0.9, top_k=10,
                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, expected)
    assert len(seen) == new_tokens
    for probs, logits in zip(seen, expected_logits):
        kth = torch.topk(logits, 10).values[:, [-1]]
        masked = logits.masked_fill(logits < kth, -float("inf"))
        torch.testing.assert_close(probs, F.softmax(masked, dim=-1), rtol=0, atol=1e-5)


def test_generate_with_prompt_longer_than_block_size():
    torch.manual_seed(4)
    model = GPT(small_config()).eval()
    prompt = torch.randint(50, (1, 20))
    expected, _ = uncached_generate(model, prompt, 5, 1.0, None, torch.Generator().manual_seed(1))
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, expected)


def test_weights_are_tied_and_initialised_as_nanogpt():
    torch.manual_seed(5)
    config = small_config(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, vocab_size=500)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


@pytest.mark.parametrize("fields, message", [
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_embd=30, n_head=4, n_kv_head=4), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=-4), "n_head"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(block_size=0), "block_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(n_embd=0), "n_embd"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_raises_value_error_naming_field(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def test_kv_head_defaults_to_n_head():
    assert GPTConfig(n_head=6, n_embd=48).n_kv_head == 6


def test_forward_rejects_sequences_past_block_size():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def greedy_generate(model, idx, max_new_tokens):
    """Each step takes the likeliest token, recomputing the last block_size tokens."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


# 1e-45 overflows logits / temperature in float32; 1e-46 is 0 there
@pytest.mark.parametrize("temperature", [1e-45, 1e-46, 1e-300])
def test_generate_at_a_vanishing_temperature_takes_the_likeliest_token(temperature):
    torch.manual_seed(6)
    model = GPT(small_config()).eval()
    prompt = torch.randint(50, (2, 3))
    out = model.generate(prompt, 20, temperature=temperature,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, greedy_generate(model, prompt, 20))


@pytest.mark.parametrize("shape", [(2,), (2, 1)], ids=str)
def test_generate_takes_a_temperature_per_row(shape):
    torch.manual_seed(7)
    model = GPT(small_config()).eval()
    prompt = torch.randint(50, (2, 3))
    expected, _ = uncached_generate(model, prompt, 20, torch.tensor([[0.5], [2.0]]), 10,
                                    torch.Generator().manual_seed(2))
    out = model.generate(prompt, 20, temperature=torch.tensor([0.5, 2.0]).reshape(shape),
                         top_k=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, expected)


TOKENS = torch.zeros(2, 3, dtype=torch.long)  # B = 2; small_config's vocab_size is 50


@pytest.mark.parametrize("kwargs, error, message", [
    pytest.param(dict(idx=[[1, 2]]), TypeError,
                 r"idx must be a \(B, T\) tensor of token ids, got list", id="idx-list"),
    pytest.param(dict(idx=torch.zeros(1, 3)), TypeError,
                 r"idx must hold integer token ids, got torch.float32", id="idx-float"),
    pytest.param(dict(idx=torch.zeros(3, dtype=torch.long)), ValueError,
                 r"idx must have shape \(B, T\) with B, T >= 1 .*got \(3,\)", id="idx-1d"),
    pytest.param(dict(idx=torch.zeros(1, 0, dtype=torch.long)), ValueError,
                 r"idx must have shape .*got \(1, 0\)", id="idx-no-tokens"),
    pytest.param(dict(idx=torch.zeros(0, 3, dtype=torch.long)), ValueError,
                 r"idx must have shape .*got \(0, 3\)", id="idx-no-rows"),
    pytest.param(dict(idx=torch.tensor([[1, 50]])), ValueError,
                 r"idx must hold token ids in \[0, 50\), got ids from 1 to 50",
                 id="idx-past-vocab"),
    pytest.param(dict(idx=torch.tensor([[-1, 2]])), ValueError,
                 r"in \[0, 50\), got ids from -1 to 2", id="idx-negative"),
    pytest.param(dict(max_new_tokens=-1), ValueError,
                 "max_new_tokens must be an integer >= 0, got -1", id="max-new-tokens-negative"),
    pytest.param(dict(max_new_tokens=2.5), ValueError,
                 "max_new_tokens must be an integer >= 0, got 2.5", id="max-new-tokens-float"),
    pytest.param(dict(temperature=float("nan")), ValueError,
                 "temperature must be finite and > 0, got nan", id="temperature-nan"),
    pytest.param(dict(temperature=float("inf")), ValueError,
                 "temperature must be finite and > 0, got inf", id="temperature-inf"),
    pytest.param(dict(temperature=0.0), ValueError,
                 "temperature must be finite and > 0, got 0.0", id="temperature-0"),
    pytest.param(dict(temperature=-1), ValueError,
                 "temperature must be finite and > 0, got -1", id="temperature-negative"),
    pytest.param(dict(temperature=[0.5, 0.5]), TypeError,
                 r"temperature must be a number or a tensor of shape \(B,\) or \(B, 1\), got list",
                 id="temperature-list"),
    pytest.param(dict(temperature=torch.ones(2, 2)), ValueError,
                 r"temperature tensor must have shape \(\), \(2,\) or \(2, 1\) for B = 2, "
                 r"got \(2, 2\)", id="temperature-shape"),
    pytest.param(dict(temperature=torch.tensor([0.5, float("nan")])), ValueError,
                 "temperature must be finite and > 0, got nan", id="temperature-row-nan"),
    pytest.param(dict(top_k=0), ValueError,
                 "top_k must be a positive integer or None, got 0", id="top-k-0"),
    pytest.param(dict(top_k=2.5), ValueError,
                 "top_k must be a positive integer or None, got 2.5", id="top-k-float"),
])
def test_generate_rejects_bad_input_naming_it(kwargs, error, message):
    model = GPT(small_config()).eval()
    arguments = dict(idx=TOKENS, max_new_tokens=2) | kwargs
    with pytest.raises(error, match=message):
        model.generate(**arguments)
