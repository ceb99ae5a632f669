"""AdamSN and Adafactor against float64 references written here from the formulas,
and against torch.optim.AdamW / torch.optim.Adafactor where they should agree."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import rel_error, run_steps

from memeff.optim import AdamSN, Adafactor

SHAPES = [(12, 7), (7, 12), (9,), (3, 5, 4)]
STEPS = 10


def _grads(shape, steps=STEPS, dtype=torch.float64, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) * scale for _ in range(steps)]




# ---- references, written from the docstring formulas, full-size and unchunked ----

def _subset_sums(g2: torch.Tensor, subset_size) -> torch.Tensor:
    """Sum of G^2 over each subset, broadcast back to every element of the subset."""
    if subset_size == "auto":
        if g2.dim() < 2:
            return g2
        mat = g2.reshape(g2.shape[0], -1)  # (first dim, rest)
        dim = 1 if mat.shape[0] >= mat.shape[1] else 0
        return mat.sum(dim=dim, keepdim=True).expand_as(mat).reshape(g2.shape)
    size = max(d for d in range(1, subset_size + 1) if g2.numel() % d == 0)
    flat = g2.reshape(-1, size)
    return flat.sum(dim=1, keepdim=True).expand_as(flat).reshape(g2.shape)


def reference_adamsn(w0, grads, *, lr, betas, eps, weight_decay, subset_size="auto",
                     rank=None, gap=200):
    b1, b2 = betas
    w = w0.clone()
    m_full = torch.zeros_like(w)  # momentum, in the full space (lifted) for subspace momentum
    v_full = torch.zeros_like(w)  # each subset's value, repeated over its elements
    project = None
    for t, g in enumerate(grads, start=1):
        if rank is not None and g.dim() >= 2:
            g_mat = g.reshape(g.shape[0], -1)
            n, m = g_mat.shape
            r = min(rank, n, m)
            if (t - 1) % gap == 0:
                u, _, vh = torch.linalg.svd(g_mat, full_matrices=False)
                if n >= m:
                    basis = vh[:r]
                    project = lambda x, q=basis: (x.reshape(n, m) @ q.T @ q).reshape(g.shape)  # noqa: E731
                else:
                    basis = u[:, :r]
                    project = lambda x, p=basis: (p @ p.T @ x.reshape(n, m)).reshape(g.shape)  # noqa: E731
                m_full = project(m_full)  # momentum carried into the new subspace
            g_sub = project(g)
            m_full = b1 * m_full + (1 - b1) * g_sub
            numerator = m_full / (1 - b1**t) + (g - g_sub)
            step_size = lr
        else:
            m_full = b1 * m_full + (1 - b1) * g
            numerator = m_full
            step_size = lr / (1 - b1**t)
        v_full = b2 * v_full + (1 - b2) * _subset_sums(g * g, subset_size)
        w = w * (1 - lr * weight_decay)
        w = w - step_size * numerator / (v_full.sqrt() / math.sqrt(1 - b2**t) + eps)
    return w


def reference_adafactor(w0, grads, *, lr, beta2_decay=-0.8, eps=(1e-30, 1e-3), d=1.0,
                        weight_decay=0.0, beta1=None, factored=True, writes=None):
    """``writes`` maps a step t to a function giving the parameter that step starts from."""
    eps1, eps2 = eps
    w = w0.clone()
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    row = col = var = None
    m = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if writes and t in writes:
            w = writes[t](w)
        beta2 = 1 - t**beta2_decay
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, rms(w).item()) * rho
        g2 = g * g + eps1
        if factored and g.dim() >= 2:
            new_row, new_col = g2.mean(dim=-1, keepdim=True), g2.mean(dim=-2, keepdim=True)
            row = new_row if row is None else beta2 * row + (1 - beta2) * new_row
            col = new_col if col is None else beta2 * col + (1 - beta2) * new_col
            v_hat = row * col / row.mean(dim=-2, keepdim=True)
        else:
            var = g2 if var is None else beta2 * var + (1 - beta2) * g2
            v_hat = var
        u = g / v_hat.sqrt()
        u = u / max(1.0, rms(u).item() / d)
        w = w * (1 - lr * weight_decay)
        if beta1 is None:
            w = w - alpha * u
        else:
            m = beta1 * m + (1 - beta1) * u
            w = w - alpha * m
    return w


# ---- float64 parity with the references ----

ADAMSN_CASES = {
    "auto": dict(),
    "int_subsets": dict(subset_size=6),
    "subspace": dict(rank=3, gap=4),
    "subspace_full_rank": dict(rank=64, gap=3),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(ADAMSN_CASES))
def test_adamsn_matches_float64_reference(shape, case):
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **ADAMSN_CASES[case])
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape)
    ours = run_steps(lambda ps: AdamSN(ps, **hp), w0, grads)
    ref = reference_adamsn(w0, grads, **hp)
    assert rel_error(ours, ref, w0) <= 1e-10


ADAFACTOR_CASES = {
    "default": dict(),
    "beta1_decay": dict(beta1=0.9, weight_decay=0.1),
    "unfactored": dict(factored=False),
    "clipped": dict(d=1.0, lr=0.05),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(ADAFACTOR_CASES))
def test_adafactor_matches_float64_reference(shape, case):
    hp = dict(lr=1e-2, **ADAFACTOR_CASES[case]) if "lr" not in ADAFACTOR_CASES[case] \
        else ADAFACTOR_CASES[case]
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # one large gradient makes update clipping act at least once
    grads = _grads(shape)
    grads[3] = grads[3] * 100.0
    ours = run_steps(lambda ps: Adafactor(ps, **hp), w0, grads)
    ref = reference_adafactor(w0, grads, **hp)
    assert rel_error(ours, ref, w0) <= 1e-10


@pytest.mark.parametrize("backend", ["eager", "auto"])  # auto: the compiled kernels, if built
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", ["default", "beta1_decay", "unfactored"])
def test_adafactor_takes_rms_of_the_parameter_written_through_data(shape, case, backend):
    hp = dict(lr=1e-2, **ADAFACTOR_CASES[case])
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    replacement = 3.0 * torch.randn(shape, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(4))
    grads = _grads(shape)
    # before steps 4 and 7: scale the parameter, then replace it
    writes = {4: lambda w: w * 2.0, 7: lambda w: replacement.clone()}
    p = torch.nn.Parameter(w0.clone())
    opt = Adafactor([p], backend=backend, **hp)
    for t, g in enumerate(grads, start=1):
        if t == 4:
            p.data.mul_(2.0)
        elif t == 7:
            p.data.copy_(replacement)
        p.grad = g.clone()
        opt.step()
    ref = reference_adafactor(w0, grads, writes=writes, **hp)
    assert rel_error(p.detach(), ref, replacement) <= 1e-10


@pytest.mark.parametrize("shape", [(40, 9), (9, 40), (37,), (3, 10, 6)], ids=str)
@pytest.mark.parametrize("make", [
    lambda ps, c: AdamSN(ps, lr=1e-2, weight_decay=0.1, chunk_size=c),
    lambda ps, c: AdamSN(ps, lr=1e-2, subset_size=8, chunk_size=c),
    lambda ps, c: Adafactor(ps, lr=1e-2, weight_decay=0.1, chunk_size=c),
    lambda ps, c: Adafactor(ps, lr=1e-2, beta1=0.9, chunk_size=c),
], ids=["adamsn", "adamsn_int", "adafactor", "adafactor_beta1"])
def test_chunked_path_equals_whole_tensor_path_float64(shape, make):
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = _grads(shape)
    whole = run_steps(lambda ps: make(ps, 10**9), w0, grads)
    chunked = run_steps(lambda ps: make(ps, 7), w0, grads)  # chunks of a row or a few elements
    assert rel_error(chunked, whole, w0) <= 1e-12


# ---- float32 parity with torch.optim ----

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("subset_norm", [True, False])
def test_adamsn_one_element_subsets_is_adamw(shape, subset_norm):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    w0 = torch.randn(shape)
    grads = _grads(shape, dtype=torch.float32)
    adamw = run_steps(lambda ps: torch.optim.AdamW(ps, **hp), w0, grads)
    if subset_norm:
        ours = run_steps(lambda ps: AdamSN(ps, subset_size=1, **hp), w0, grads)
    else:
        ours = run_steps(lambda ps: AdamSN(ps, subset_norm=False, **hp), w0, grads)
    assert (ours - adamw).abs().max().item() <= 1e-6


def test_adamsn_on_vectors_is_adamw():
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    w0 = torch.randn(50)
    grads = _grads((50,), dtype=torch.float32)
    adamw = run_steps(lambda ps: torch.optim.AdamW(ps, **hp), w0, grads)
    ours = run_steps(lambda ps: AdamSN(ps, **hp), w0, grads)
    assert (ours - adamw).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (30,), (3, 16, 10)], ids=str)
def test_adafactor_matches_torch_adafactor_float32(shape):
    w0 = torch.randn(shape)
    grads = _grads(shape, dtype=torch.float32, scale=0.1)  # moderate: far above eps1
    theirs = run_steps(lambda ps: torch.optim.Adafactor(ps, lr=1e-2), w0, grads)
    ours = run_steps(lambda ps: Adafactor(ps, lr=1e-2), w0, grads)
    assert rel_error(ours, theirs, w0) <= 1e-5


def test_adafactor_bfloat16_update_size_matches_float32_and_torch_does_not():
    w0 = torch.randn(64, 32)
    grads = _grads((64, 32), steps=1, dtype=torch.float32, scale=1e-3)  # below bf16's eps 7.8e-3

    def update_rms(make, dtype):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        before = p.detach().float().clone()
        opt = make([p])
        p.grad = grads[0].to(dtype)
        opt.step()
        return (p.detach().float() - before).pow(2).mean().sqrt().item()

    ours32 = update_rms(lambda ps: Adafactor(ps, lr=0.1), torch.float32)
    ours16 = update_rms(lambda ps: Adafactor(ps, lr=0.1), torch.bfloat16)
    torch32 = update_rms(lambda ps: torch.optim.Adafactor(ps, lr=0.1), torch.float32)
    torch16 = update_rms(lambda ps: torch.optim.Adafactor(ps, lr=0.1), torch.bfloat16)
    assert abs(ours16 / ours32 - 1) < 0.05
    assert abs(torch32 / ours32 - 1) < 1e-3  # they agree in float32 ...
    assert torch16 / ours32 < 0.5  # ... and torch's bf16 eps1 shrinks the update
