"""Optimizer state size (measured == analytic, and the ratios to AdamW) and build_optimizer."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from memeff import GPT, GPTConfig
from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import REGISTRY, AdamSN, Adafactor, build_optimizer
from memeff.optim.build import build_optimizer_for_tensors
from memeff.optim.registry import missing_package

MAKERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, amsgrad=True),
    "torch_adafactor": lambda ps: torch.optim.Adafactor(ps),
    "adamsn": lambda ps: AdamSN(ps),
    "adamsn_int_subsets": lambda ps: AdamSN(ps, subset_size=10),
    "adamsn_off": lambda ps: AdamSN(ps, subset_norm=False),
    "adamsnsm": lambda ps: AdamSN(ps, rank=4, gap=2),
    "adafactor": lambda ps: Adafactor(ps),
    "adafactor_beta1": lambda ps: Adafactor(ps, beta1=0.9),
    "adafactor_unfactored": lambda ps: Adafactor(ps, factored=False),
}
GRID = [(96, 40), (40, 96), (33, 33), (50,), (1, 7), (7, 1), (3, 8, 5), (2, 3, 4, 5)]
STEP_BYTES = 4  # one float32 scalar per parameter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MAKERS))
def test_state_bytes_equal_expected(name, dtype):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in GRID]
    opt = MAKERS[name](params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert state_bytes(opt) == expected_state_bytes(opt)


@pytest.mark.parametrize("n, m", [(96, 40), (40, 96), (768, 3072), (50257, 768)])
def test_state_ratio_to_adamw(n, m):
    # meta tensors: the analytic count needs shapes only; measured on the small shapes below
    p = torch.nn.Parameter(torch.empty(n, m, device="meta"))

    def moment_bytes(opt):
        return Fraction(expected_state_bytes(opt) - STEP_BYTES)

    adamw = moment_bytes(torch.optim.AdamW([p]))
    assert moment_bytes(AdamSN([p])) / adamw == Fraction(n * m + max(n, m), 2 * n * m)
    assert moment_bytes(Adafactor([p])) / adamw == Fraction(n + m, 2 * n * m)


def test_state_ratio_measured_on_small_weight():
    n, m = 96, 40
    measured = {}
    for name in ("adamw", "adamsn", "adafactor"):
        p = torch.nn.Parameter(torch.randn(n, m))
        p.grad = torch.randn(n, m)
        opt = MAKERS[name]([p])
        opt.step()
        measured[name] = Fraction(state_bytes(opt) - STEP_BYTES)
    assert measured["adamsn"] / measured["adamw"] == Fraction(n * m + max(n, m), 2 * n * m)
    assert measured["adafactor"] / measured["adamw"] == Fraction(n + m, 2 * n * m)


def test_expected_state_bytes_rejects_unknown_optimizer():
    with pytest.raises(TypeError, match="SGD"):
        expected_state_bytes(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))


# ---- build_optimizer ----

@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16,
                         vocab_size=64))


def _group_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def test_unknown_name_lists_valid_ones(model):
    with pytest.raises(ValueError, match="adamsnsm") as info:
        build_optimizer("lion", model)
    assert all(name in str(info.value) for name in REGISTRY)


@pytest.mark.parametrize("name, settings, refused", [
    ("adafactor", {"betas": (0.9, 0.99)}, "betas"),
    ("torch_adafactor", {"beta1": 0.9}, "beta1"),
    ("adamsn", {"rank": 4}, "rank"),
    ("adamsn", {"subset_norm": False}, "subset_norm"),
    ("adamw", {"foo": 1}, "foo"),
])
def test_a_setting_the_optimizer_does_not_take_is_an_error(model, name, settings, refused):
    with pytest.raises(ValueError, match=f"{name} does not take {refused}; its settings are"):
        build_optimizer(name, model, **settings)


@pytest.mark.parametrize("name", ["adamw", "adamw_foreach"])
def test_fused_and_foreach_together_are_an_error(model, name):
    with pytest.raises(ValueError, match=f"{name} takes fused=True or foreach=True, not both"):
        build_optimizer(name, model, fused=True, foreach=True)


def every_optimizer(fails: dict[str, pytest.MarkDecorator] | None = None) -> list:
    """Every registered name as a test parameter: a peer whose package is missing skipped
    with the install hint, and the names in ``fails`` marked with their expected failure."""
    fails = fails or {}
    params = []
    for name in REGISTRY:
        missing = missing_package(name)
        marks = [pytest.mark.skip(reason=missing)] if missing else []
        params.append(pytest.param(name, marks=[*marks, *([fails[name]] if name in fails else [])]))
    return params


TORCH_ADAFACTOR_FAILS_ON_EMPTY = pytest.mark.xfail(
    raises=ZeroDivisionError, strict=True,
    reason="torch.optim.Adafactor divides by the param's numel for RMS(X)")
FAILS_ON_EMPTY = {
    "torch_adafactor": TORCH_ADAFACTOR_FAILS_ON_EMPTY,
    "torch_adafactor_foreach": TORCH_ADAFACTOR_FAILS_ON_EMPTY,
    "adam_mini": pytest.mark.xfail(raises=RuntimeError, strict=True, reason=(
        "Adam-mini views its per-row step sizes of an empty tensor as (rows, 1)")),
    "adamwsn": pytest.mark.xfail(raises=ZeroDivisionError, strict=True, reason=(
        "AdamWSN takes a modulo by the numel when it picks the subset size")),
}


@pytest.mark.parametrize("name", every_optimizer(FAILS_ON_EMPTY))
def test_parameters_without_elements_step_and_count_state_exactly(name):
    """Empty tensors get state of no elements and leave the other params' steps unchanged,
    as torch's AdamW does."""
    shapes = [(0, 5), (5, 0), (0,), (3, 0, 4)]
    gen = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    alone = torch.nn.Parameter(weight.clone())
    with_empty = [torch.nn.Parameter(weight.clone())] + [torch.nn.Parameter(torch.zeros(s))
                                                         for s in shapes]
    opts = [build_optimizer_for_tensors(name, ps, lr=1e-2)
            for ps in ([alone], with_empty)]
    for _ in range(3):
        for opt, params in zip(opts, ([alone], with_empty)):
            for p in params:
                p.grad = grad.clone() if p.numel() else torch.zeros(p.shape)
            opt.step()
    assert torch.equal(alone, with_empty[0])
    assert state_bytes(opts[1]) == expected_state_bytes(opts[1])


def test_a_group_setting_the_optimizer_does_not_take_is_an_error(model):
    with pytest.raises(ValueError, match="adamw does not take subset_size in a parameter group"):
        build_optimizer("adamw", model, group_hparams={"matrix": {"subset_size": 4}})


def test_registry_labels_are_distinct():
    labels = [spec.label for spec in REGISTRY.values()]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("name", every_optimizer())
def test_every_param_once_and_decay_on_2d_weights_only(model, name):
    opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    for p in model.parameters():
        assert _group_of(opt, p)["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)


@pytest.mark.parametrize("tied_as_linear", [True, False])
def test_grouping_follows_the_reference(model, tied_as_linear):
    wte = model.transformer.wte.weight
    assert wte is model.lm_head.weight  # tied
    wpe = model.transformer.wpe.weight
    c_attn = model.transformer.h[0].attn.c_attn
    ln = model.transformer.h[0].ln_1

    sn = build_optimizer("adamsn", model, tied_weight_as_linear=tied_as_linear)
    assert _group_of(sn, c_attn.weight)["subset_norm"] is True
    assert _group_of(sn, wte)["subset_norm"] is tied_as_linear
    for p in (wpe, c_attn.bias, ln.weight):
        assert _group_of(sn, p)["subset_norm"] is False

    af = build_optimizer("adafactor", model, tied_weight_as_linear=tied_as_linear)
    assert _group_of(af, c_attn.weight)["factored"] is True
    assert _group_of(af, wte)["factored"] is tied_as_linear
    assert _group_of(af, wpe)["factored"] is False

    sm = build_optimizer("adamsnsm", model, rank=8, gap=10)
    assert _group_of(sm, c_attn.weight)["rank"] == 8
    assert _group_of(sm, c_attn.weight)["gap"] == 10
    assert _group_of(sm, wpe)["rank"] is None


@pytest.mark.parametrize("name", every_optimizer())
def test_built_optimizers_step_and_count_state_exactly(model, name):
    idx = torch.randint(0, 64, (2, 16))
    opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    assert state_bytes(opt) == expected_state_bytes(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_group_hparams_override_one_group(model):
    ln = model.transformer.h[0].ln_1.weight
    c_attn = model.transformer.h[0].attn.c_attn.weight
    opt = build_optimizer("adamsn", model, lr=4e-2, weight_decay=0.01,
                          group_hparams={"no_decay": {"lr": 3e-3, "eps": 1e-12}})
    assert (_group_of(opt, ln)["lr"], _group_of(opt, ln)["eps"]) == (3e-3, 1e-12)
    assert (_group_of(opt, c_attn)["lr"], _group_of(opt, c_attn)["eps"]) == (4e-2, 1e-8)
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("name", every_optimizer({"adam_mini": pytest.mark.xfail(
    raises=AssertionError, strict=True, reason="Adam-mini makes one group of each tensor")}))
def test_a_tied_group_keeps_the_settings_of_the_group_it_left(model, name):
    wte = model.transformer.wte.weight
    plain = build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    split = build_optimizer(name, model, lr=1e-2, weight_decay=0.1,
                            group_hparams={"tied": {"lr": 2e-3}})
    assert len(split.param_groups) == len(plain.param_groups) + 1
    assert split.param_groups[-1]["params"] == [wte]
    expected = {**_group_of(plain, wte), "lr": 2e-3}
    assert {k: v for k, v in _group_of(split, wte).items() if k != "params"} == \
        {k: v for k, v in expected.items() if k != "params"}
    listed = [p for g in split.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))


def test_tied_rows_give_adamsn_one_subset_per_token(model):
    wte = model.transformer.wte.weight  # (64, 32): "auto" would sum over the 64 tokens
    opt = build_optimizer("adamsn", model, group_hparams={"tied": {"subset_size": 32}})
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    grad = wte.grad.detach().clone()
    opt.step()
    v = opt.state[wte]["exp_avg_sq"]
    assert v.shape == (64, 1)
    beta2 = opt.param_groups[-1]["betas"][1]
    torch.testing.assert_close(v.double(), (1 - beta2) * grad.double().pow(2).sum(1, keepdim=True))
    assert state_bytes(opt) == expected_state_bytes(opt)


@pytest.mark.parametrize("group_hparams, message", [
    ({"embeddings": {"lr": 1e-3}}, "unknown group name.*embeddings.*matrix, other_weights, no_decay and tied"),
    ({"matrix": 1e-3}, r"group_hparams\['matrix'\] must be a dict"),
    ({"matrix": {"params": []}}, "no 'params'"),
])
def test_bad_group_hparams_are_named(model, group_hparams, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer("adamsn", model, group_hparams=group_hparams)


def test_a_tied_group_without_a_tied_weight_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    with pytest.raises(ValueError, match="no trainable weight shared"):
        build_optimizer("adamsn", model, group_hparams={"tied": {"lr": 1e-3}})
