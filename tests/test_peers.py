"""Peer optimizers (the ``peers`` extra): built from the registry, their state counted
honestly (live == analytic), the adapters behave as optimizers, and our AdamSN against
pytorch-optimizer's AdamWSN.

A peer whose package is missing is skipped with the install hint.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext

import pytest
import torch

from memeff import GPT, GPTConfig
from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import AdamSN, build_optimizer
from memeff.optim.build import build_optimizer_for_tensors
from memeff.optim.registry import (PEER_NAMES, PEERS_INSTALL, MissingPackageError,
                                   missing_package, spec)
from memeff.train import TrainConfig
from tests.optim_helpers import rel_error

# ranks for the small models below (n_embd 64): d/4, as the papers' pretraining runs
SMALL_MODEL_SETTINGS = {"galore_adamw": {"rank": 16}, "apollo": {"rank": 16}}


def require(name: str) -> None:
    hint = missing_package(name)
    if hint is not None:
        pytest.skip(hint)


def eager_if_compiled(name: str):
    """torchao compiles each parameter's step (about a minute per shape on 2 CPU cores);
    the state it creates is the same run eagerly, so the state tests run it so."""
    return torch.compiler.set_stance("force_eager") if name.startswith("torchao") else nullcontext()


@pytest.fixture
def model():
    # numels on both sides of the quantization thresholds: wte 65x64 = 4160 (not whole
    # 256-blocks: torchao keeps it unquantized, bitsandbytes has a partial block),
    # c_proj 64x64 = 4096 (the threshold itself), c_attn 128x64, MLP 256x64 and 64x256,
    # wpe 16x64 and the 1-D tensors below it
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=16,
                         vocab_size=65))


def train_steps(model, optimizer, steps: int = 2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ---- install hint --------------------------------------------------------------------

def test_a_missing_peer_package_gives_the_install_hint(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import lion_pytorch now fails
    hint = missing_package("lion_pytorch")
    assert "lion-pytorch" in hint and PEERS_INSTALL in hint
    with pytest.raises(MissingPackageError, match="pip install -e"):
        build_optimizer("lion_pytorch", model)
    with pytest.raises(ValueError, match="needs the lion-pytorch package"):  # CLI: exit 2
        TrainConfig(optimizer="lion_pytorch")
    assert missing_package("adamw") is None and missing_package("adamsn") is None
    assert expected_state_bytes(build_optimizer("adamw", model)) > 0  # the others still count


def test_every_peer_names_its_package():
    assert set(PEER_NAMES) == {"bnb_adamw8bit", "torchao_adamw8bit", "torchao_adamw4bit",
                               "adam_mini", "galore_adamw", "apollo", "apollo_mini",
                               "torch_muon", "lion_pytorch", "adamwsn"}


# ---- state: live bytes == the registry's formula ----------------------------------------

@pytest.mark.parametrize("name", PEER_NAMES)
def test_peer_state_on_a_small_gpt_equals_its_formula(model, name):
    require(name)
    with eager_if_compiled(name):
        optimizer = build_optimizer(name, model, lr=1e-3, weight_decay=0.1,
                                    **SMALL_MODEL_SETTINGS.get(name, {}))
        train_steps(model, optimizer)
    assert state_bytes(optimizer) == expected_state_bytes(optimizer)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PEER_NAMES)
def test_peer_state_on_bare_tensors_equals_its_formula(name, dtype):
    """Shapes as the state suite's, small: a matrix group of 2-D, 1-D and 3-D tensors
    (GaLore, APOLLO and Muon step the 2-D ones only)."""
    require(name)
    shapes = [(96, 64), (64, 96), (4096,), (3, 40, 64), (33, 17)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    with eager_if_compiled(name):
        optimizer = build_optimizer_for_tensors(name, params, lr=1e-3,
                                                **SMALL_MODEL_SETTINGS.get(name, {}))
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            optimizer.step()
    assert state_bytes(optimizer) == expected_state_bytes(optimizer)


def test_galore_keeps_the_whole_svd_factor_of_a_float32_matrix():
    """GaLore slices its projector out of the SVD's (k, k) factor, k = min(n, m), and the
    slice keeps the whole factor alive: k * k floats, not rank * k."""
    require("galore_adamw")
    p = torch.nn.Parameter(torch.randn(96, 64))
    p.grad = torch.randn(96, 64)
    optimizer = build_optimizer_for_tensors("galore_adamw", [p], rank=8)
    optimizer.step()
    projector = optimizer.state[p]["projector"].ortho_matrix
    assert projector.shape == (8, 64)
    assert projector.untyped_storage().nbytes() == 64 * 64 * 4
    assert state_bytes(optimizer) == 2 * 96 * 8 * 4 + 64 * 64 * 4


def test_bitsandbytes_quantization_maps_are_shared_and_counted_once():
    require("bnb_adamw8bit")
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    optimizer = build_optimizer_for_tensors("bnb_adamw8bit", params)
    for p in params:
        p.grad = torch.randn(64, 64)
    optimizer.step()
    maps = {optimizer.state[p]["qmap1"].data_ptr() for p in params}
    assert len(maps) == 1
    per_param = 2 * 4096 + 2 * (4096 // 256) * 4  # uint8 moments + float32 absmax per block
    assert state_bytes(optimizer) == 3 * per_param + 2 * 256 * 4


def test_torchao_quantized_state_is_counted_by_its_inner_tensors():
    require("torchao_adamw8bit")
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn(64, 64)
    optimizer = build_optimizer_for_tensors("torchao_adamw8bit", [p])
    with torch.compiler.set_stance("force_eager"):
        optimizer.step()
    exp_avg = optimizer.state[p]["exp_avg"]
    assert type(exp_avg).__name__ == "OptimState8bit"
    # codes (uint8) + one float32 scale per 256 + its 256-entry float32 map, per moment
    assert state_bytes(optimizer) == 4 + 2 * (4096 + 16 * 4 + 256 * 4)


# ---- the adapters (memeff.optim.peers) ---------------------------------------------------

@pytest.mark.parametrize("name", ["torch_muon", "adam_mini"])
def test_adapter_state_dict_round_trip_continues_the_same_trajectory(model, name):
    require(name)
    optimizer = build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, seed=0)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(name, resumed_model, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train_steps(model, optimizer, seed=1)
    train_steps(resumed_model, resumed, seed=1)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert state_bytes(resumed) == expected_state_bytes(resumed)


@pytest.mark.parametrize("name", ["torch_muon", "adam_mini"])
def test_adapters_follow_an_lr_schedule_in_every_inner_optimizer(model, name):
    require(name)
    optimizer = build_optimizer(name, model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5 ** it)
    train_steps(model, optimizer, steps=1)
    scheduler.step()
    inner = optimizer._inner.values()
    assert all(g["lr"] == 5e-3 for opt in inner for g in opt.param_groups)
    assert sum(len(opt.param_groups) for opt in inner) == len(optimizer.param_groups)


def test_muon_steps_the_linear_weights_and_adamw_the_rest(model):
    optimizer = build_optimizer("torch_muon", model, lr=1e-2)
    train_steps(model, optimizer, steps=1)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for p in model.parameters():
        assert set(optimizer.state[p]) == (
            {"momentum_buffer"} if id(p) in linear else {"step", "exp_avg", "exp_avg_sq"})


def test_adam_mini_blocks_follow_nanogpt_names(model):
    """Given the model, the registry's build maps nanoGPT's names onto Adam-mini's blocks
    (peers.AdamMini); build_optimizer passes the model once memeff.optim.build does."""
    require("adam_mini")
    groups = [{"params": list(model.parameters()), "kind": "matrix"}]
    optimizer = spec("adam_mini").build(groups, model=model, lr=1e-3)
    block = {name: g["block"] for name, g in zip(
        (n for n, _ in model.named_parameters()), optimizer.param_groups)}
    assert block["transformer.h.0.attn.c_attn.weight"] == "head"
    assert block["transformer.h.0.attn.c_proj.weight"] == "row"
    assert block["transformer.h.0.mlp.c_fc.weight"] == "row"
    assert block["transformer.wte.weight"] == block["transformer.wpe.weight"] == "row"
    assert block["transformer.h.0.ln_1.weight"] == "tensor"
    assert block["transformer.h.0.attn.c_attn.bias"] == "element"
    train_steps(model, optimizer)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    n_heads = 4 + 2 * 2  # query heads, then key and value heads (n_kv_head 2)
    assert optimizer.state[c_attn]["vmean"].shape == (n_heads, 1)
    assert state_bytes(optimizer) == expected_state_bytes(optimizer)


def test_adam_mini_refuses_parameters_not_of_its_model(model):
    require("adam_mini")
    from memeff.optim.peers import AdamMini

    with pytest.raises(ValueError, match="not one of the model's"):
        AdamMini([torch.nn.Parameter(torch.zeros(3, 3))], model=model)


# ---- AdamSN against pytorch-optimizer's AdamWSN ------------------------------------------

def reference_step(w, g, m, v, t, *, lr, betas, eps, weight_decay, subsets_per_row: bool,
                   eps_scaled_by_bias_correction: bool, decay_before_update: bool):
    """One float64 step of subset-norm AdamW, written from the formulas, with each
    convention on which AdamSN and AdamWSN differ as a switch; returns (w, m, v)."""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g
    squares = g.pow(2).sum(dim=1, keepdim=True) if subsets_per_row else g.pow(2)  # a sum
    v = beta2 * v + (1 - beta2) * squares
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    if decay_before_update:
        w = w * (1 - lr * weight_decay)
    if eps_scaled_by_bias_correction:  # AdamWSN: lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps)
        w = w - lr * bc2 ** 0.5 / bc1 * m / (v.sqrt() + eps)
    else:  # AdamSN and torch's AdamW: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        w = w - lr / bc1 * m / (v.sqrt() / bc2 ** 0.5 + eps)
    if not decay_before_update:
        w = w * (1 - lr * weight_decay)
    return w, m, v


OURS = dict(eps_scaled_by_bias_correction=False, decay_before_update=True)
THEIRS = dict(eps_scaled_by_bias_correction=True, decay_before_update=False)


def run_subset_norm(make_optimizer, shapes, grads):
    """Each shape's param after one step per gradient list, in float64: the first tensor
    subset-norm (whole rows), the second per element."""
    params = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def run_reference(shapes, grads, conventions, **hparams):
    out = []
    for i, shape in enumerate(shapes):
        w = torch.ones(shape, dtype=torch.float64)
        m = torch.zeros_like(w)
        v = torch.zeros((shape[0], 1) if i == 0 else shape, dtype=torch.float64)
        for t, step_grads in enumerate(grads, start=1):
            w, m, v = reference_step(w, step_grads[i], m, v, t, subsets_per_row=i == 0,
                                     **conventions, **hparams)
        out.append(w)
    return out


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("rows, cols", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_adamsn_matches_adamwsn_once_conventions_match(foreach, rows, cols):
    """AdamSN (ours) and pytorch-optimizer's AdamWSN, on the same float64 gradients.

    The conventions that differ:
    - eps: AdamSN adds eps to sqrt(v) / sqrt(1 - beta2^t) (torch's AdamW); AdamWSN to
      sqrt(v), folding sqrt(1 - beta2^t) into the step size, so its eps is in effect
      eps / sqrt(1 - beta2^t), larger in the first steps.
    - weight decay: AdamSN decays before the update, W(1 - lr wd) - u (torch's AdamW);
      AdamWSN after it, (W - u)(1 - lr wd).
    - subsets: AdamSN's "auto" takes rows when n >= m and columns when n < m; AdamWSN cuts
      the flattened tensor into contiguous pieces of the largest divisor of numel at most
      subset_size (default sqrt(numel)), so it can take rows (subset_size=m; so can ours)
      but never columns. Both sum the squares over a subset (not a mean).
    - which tensors: AdamSN gives subset-norm to the groups with subset_norm (the registry:
      nn.Linear weights); AdamWSN to the groups with sn=True (its docs: nn.Linear weights).
    - state: AdamWSN counts steps per group (a Python int), AdamSN per tensor (a float32
      scalar tensor), and updates the moments with lerp rather than mul and add: equal up
      to rounding.
    With eps = 0 and no weight decay the first two vanish and the two agree directly; with
    both, each equals the float64 reference with its own conventions.
    """
    require("adamwsn")
    from pytorch_optimizer import AdamWSN

    shapes = [(rows, cols), (cols,)]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(5)]

    def ours(params, eps, weight_decay):
        return AdamSN([{"params": params[:1], "subset_size": cols},  # whole rows
                       {"params": params[1:], "subset_norm": False}],
                      lr=0.1, betas=(0.9, 0.99), eps=eps, weight_decay=weight_decay)

    def theirs(params, eps, weight_decay):
        return AdamWSN([{"params": params[:1], "sn": True, "subset_size": cols},
                        {"params": params[1:]}], lr=0.1, betas=(0.9, 0.99), eps=eps,
                       weight_decay=weight_decay, foreach=foreach)

    w0 = torch.ones(rows, cols, dtype=torch.float64)
    # conventions matched by settings: eps = 0 and no decay
    a = run_subset_norm(lambda ps: ours(ps, 0.0, 0.0), shapes, grads)
    b = run_subset_norm(lambda ps: theirs(ps, 0.0, 0.0), shapes, grads)
    for x, y in zip(a, b):
        assert rel_error(x, y, torch.ones_like(x)) < 1e-13

    # with eps and decay, each matches the reference under its own conventions
    hparams = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)
    a = run_subset_norm(lambda ps: ours(ps, 1e-3, 0.1), shapes, grads)
    b = run_subset_norm(lambda ps: theirs(ps, 1e-3, 0.1), shapes, grads)
    for x, ref in zip(a, run_reference(shapes, grads, OURS, **hparams)):
        assert rel_error(x, ref, torch.ones_like(x)) < 1e-13
    for x, ref in zip(b, run_reference(shapes, grads, THEIRS, **hparams)):
        assert rel_error(x, ref, torch.ones_like(x)) < 1e-13
    assert rel_error(a[0], b[0], w0) > 1e-6  # and the conventions do change the result


def test_adamsn_auto_takes_columns_of_a_wide_matrix_which_adamwsn_cannot():
    p = torch.nn.Parameter(torch.zeros(16, 48, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    optimizer = AdamSN([p])
    optimizer.step()
    assert optimizer.state[p]["exp_avg_sq"].shape == (1, 48)  # one subset per column


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_mini"])
def test_a_projecting_peer_run_resumes_exactly_and_samples_from_its_checkpoint(
        tmp_path, interrupt_at_eval, name):
    """Their state holds projector objects: the checkpoint loads them (weights_only, with the
    registry's checkpoint_classes), so nothing is lost when such a run is interrupted."""
    require(name)
    from memeff.sample import sample_text
    from memeff.train import train

    settings = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=1,
                    warmup_iters=2, log_interval=1000, max_iters=12, eval_interval=4,
                    optimizer=name, learning_rate=1e-2, optimizer_hparams={"rank": 4,
                                                                           "update_proj_gap": 5})
    uninterrupted = train(TrainConfig(**settings))
    disarm = interrupt_at_eval(3)  # evaluations at 0 and 4 have run and been checkpointed
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**settings, out_dir=str(tmp_path)))
    disarm()
    resumed = train(TrainConfig(**settings, out_dir=str(tmp_path), resume=True))
    assert resumed.iters_run == 8  # a projector refresh (every 5 steps) after the resume
    assert resumed.evals == uninterrupted.evals
    assert len(sample_text(tmp_path, max_new_tokens=8)[0]) > 1
