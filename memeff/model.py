"""A nanoGPT-style GPT with grouped-query attention (GQA) and a preallocated KV cache.

Query projections have ``n_head`` heads; key and value projections have ``n_kv_head``
heads, each shared by a group of ``n_head // n_kv_head`` consecutive query heads
(query head ``h`` reads K/V head ``h // group``). ``n_kv_head == n_head`` is ordinary
multi-head attention (MHA) and ``n_kv_head == 1`` is multi-query attention (MQA).

A decode step (one new token over the cache) runs one of two attention paths, chosen by
``decode_attention`` (see ``grouped_attention``); both give the same output to float
rounding, and ``DECODE_ATTENTION`` is the one the model uses unless told otherwise.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODE_ATTENTIONS = ("folded", "sdpa")
# "folded" is the path the kv_cache bench suite measures faster on the CPU for GQA and MQA
# decode, in float32 and in bfloat16 (results/cpu/kv_cache.json, summary keys
# decode_faster_attention and decode_faster_attention_by_dtype); for MHA the two paths are
# the same call. A GPU's results file may favour "sdpa": pass it to GPT(decode_attention=).
DECODE_ATTENTION = "folded"


def check_decode_attention(name: str) -> str:
    if name not in DECODE_ATTENTIONS:
        raise ValueError(f"decode_attention must be one of {DECODE_ATTENTIONS}, got {name!r}")
    return name


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None means n_head (MHA); 1 is MQA
    n_embd: int = 768
    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer, preallocated as (B, n_kv_head, max_len, head_dim).

    ``length`` is how many positions are filled; the model writes the next tokens'
    keys and values at ``length`` and advances it after the last layer.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(
                f"KVCache needs positive batch_size and max_len, got {batch_size} and {max_len}"
            )
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, decode_attention: str = DECODE_ATTENTION):
        super().__init__()
        self.decode_attention = check_decode_attention(decode_attention)
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        # one projection for Q (n_head heads) and K, V (n_kv_head heads each)
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)

        if cache is None:
            y = grouped_attention(q, k, v, causal_offset=0,
                                  dropout_p=self.dropout if self.training else 0.0)
        else:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(
                    f"KVCache holds {cache.max_len} positions; cannot add {T} after {start}"
                )
            cache.keys[layer][:, :, start:start + T] = k
            cache.values[layer][:, :, start:start + T] = v
            k = cache.keys[layer][:, :, :start + T]  # (B, n_kv_head, start + T, head_dim)
            v = cache.values[layer][:, :, :start + T]
            y = grouped_attention(q, k, v, causal_offset=start,
                                  decode_attention=self.decode_attention)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, n_head * head_dim)
        return self.resid_dropout(self.c_proj(y))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal_offset: int = 0, dropout_p: float = 0.0,
                      decode_attention: str = DECODE_ATTENTION) -> torch.Tensor:
    """Causal attention of q (B, n_head, T, d) over k, v (B, n_kv_head, S, d), S = offset + T.

    Query position i (absolute position ``causal_offset + i``) sees keys 0..offset+i.

    One new token (T == 1) sees every key, so no mask is needed, and ``decode_attention``
    picks how its groups meet their K/V heads:

    - ``"folded"``: a group's ``n_head // n_kv_head`` query heads are laid along the query
      axis, (B, n_kv_head, group, d), and SDPA runs as MHA over n_kv_head heads; each K/V
      head is read once, where the CPU kernel walks K/V once per query head under
      ``enable_gqa``.
    - ``"sdpa"``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` as it is.

    The kv_cache bench suite times both; ``DECODE_ATTENTION`` says which one the model
    uses and why. Longer T always uses SDPA with ``enable_gqa``.
    """
    check_decode_attention(decode_attention)
    B, n_head, T, d = q.shape
    n_kv_head, S = k.size(1), k.size(2)
    group = n_head // n_kv_head
    gqa = n_kv_head != n_head
    if T == 1:
        if decode_attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
        qg = q.reshape(B, n_kv_head, group, d)  # (B, n_kv_head, group, d)
        y = F.scaled_dot_product_attention(qg, k, v, dropout_p=dropout_p)
        return y.reshape(B, n_head, 1, d)
    if causal_offset == 0 and S == T:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=gqa)
    # queries start part-way into the keys: is_causal would align them at key 0
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=causal_offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, decode_attention: str = DECODE_ATTENTION):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, decode_attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT; ``decode_attention`` picks the decode-step attention path of every layer
    (``"folded"`` or ``"sdpa"``, see ``grouped_attention``; default ``DECODE_ATTENTION``)."""

    def __init__(self, config: GPTConfig, decode_attention: str = DECODE_ATTENTION):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, decode_attention) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2

        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default, as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of ``idx`` (B, T), and the loss when targets are given.

        With a cache, ``idx`` continues the cached sequence at position ``cache.length``.
        """
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int,
                 temperature: float | torch.Tensor = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T) using a KV cache.

        Produces exactly the tokens of nanoGPT's uncached loop, which predicts each token
        from the last ``block_size`` tokens at positions 0..block_size-1. While the sequence
        fits, each step feeds only the newest token; once it outgrows ``block_size`` every
        position shifts, so the cache is refilled from the window.

        ``temperature`` is a number, or a tensor of shape (B,) or (B, 1) with one per row. A
        temperature too small for the logits' float type samples among the largest logits.
        """
        check_token_ids(idx, self.config.vocab_size)
        if not is_integer(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        temperature = check_temperature(temperature, idx.size(0))
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(idx.device)
        if top_k is not None and (not is_integer(top_k) or top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        block_size = self.config.block_size
        cache = KVCache(self.config, idx.size(0), min(block_size, idx.size(1) + max_new_tokens),
                        dtype=self.lm_head.weight.dtype, device=idx.device)
        logits, _ = self(idx[:, -block_size:], cache=cache)
        for step in range(max_new_tokens):
            logits = scale_logits(logits[:, -1, :], temperature)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if step == max_new_tokens - 1:
                break
            if cache.length < block_size:
                logits, _ = self(idx_next, cache=cache)
            else:
                cache.reset()
                logits, _ = self(idx[:, -block_size:], cache=cache)
        return idx


def is_integer(value) -> bool:
    """An int (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Raise unless ``idx`` is a (B, T) tensor of token ids in [0, vocab_size), B, T >= 1."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a (B, T) tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.long, torch.int):
        raise TypeError(f"idx must hold integer token ids, got {idx.dtype}; use torch.long")
    if idx.dim() != 2 or 0 in idx.shape:
        raise ValueError(f"idx must have shape (B, T) with B, T >= 1 (one sequence is "
                         f"idx[None]), got {tuple(idx.shape)}")
    low, high = idx.min().item(), idx.max().item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"idx must hold token ids in [0, {vocab_size}), got ids from {low} "
                         f"to {high}")


def check_temperature(temperature: float | torch.Tensor,
                      batch_size: int) -> float | torch.Tensor:
    """``temperature`` checked finite and > 0: a number, a 0-dim tensor, or a tensor of shape
    (B,) or (B, 1), which comes back as (B, 1) to divide each row's logits."""
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        return temperature
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(f"temperature must be a number or a tensor of shape (B,) or (B, 1), "
                        f"got {type(temperature).__name__}")
    if temperature.shape not in ((), (batch_size,), (batch_size, 1)):
        raise ValueError(f"temperature tensor must have shape (), ({batch_size},) or "
                         f"({batch_size}, 1) for B = {batch_size}, got {tuple(temperature.shape)}")
    bad = temperature[~(temperature.isfinite() & (temperature > 0))]
    if bad.numel():
        raise ValueError(f"temperature must be finite and > 0, got {bad.flatten()[0].item()}")
    return temperature.reshape(-1, 1) if temperature.dim() else temperature


def scale_logits(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` for logits (B, vocab_size); a row whose largest logit overflows
    that division gets the limit as the temperature goes to 0: 0 at its largest logits, -inf
    elsewhere (which is also the row's exact softmax at such a temperature)."""
    largest = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    # the limit, not a minimum temperature: where overflow starts depends on the logits and dtype
    overflowed = ~(largest / temperature).isfinite()  # (B, 1); the max of logits / temperature
    limit = torch.zeros_like(logits).masked_fill(logits != largest, -math.inf)
    return torch.where(overflowed, limit, logits / temperature)
