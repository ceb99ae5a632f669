"""Generic properties of every memeff optimizer: argument checks, sparse and zero
gradients, state_dict round trips, non-contiguous params, loss going down."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from memeff.optim import AdamSN, Adafactor

OPTIMIZERS = {
    "adamsn": lambda ps, lr=1e-2: AdamSN(ps, lr=lr, weight_decay=0.01),
    "adamsn_int_subsets": lambda ps, lr=1e-2: AdamSN(ps, lr=lr, subset_size=4),
    "adamsnsm": lambda ps, lr=1e-2: AdamSN(ps, lr=lr, rank=2, gap=3, weight_decay=0.01),
    "adafactor": lambda ps, lr=1e-1: Adafactor(ps, lr=lr, weight_decay=0.01),
    "adafactor_beta1": lambda ps, lr=1e-1: Adafactor(ps, lr=lr, beta1=0.9),
    "adafactor_unfactored": lambda ps, lr=1e-1: Adafactor(ps, lr=lr, factored=False),
}
SHAPES = [(6, 4), (4, 6), (5,), (2, 3, 4)]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _set_grads(params, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# ---- invalid hyperparameters: (optimizer, kwargs, message naming the argument and value) ----

INVALID = [
    (AdamSN, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (AdamSN, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (AdamSN, dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (AdamSN, dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (AdamSN, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (AdamSN, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (AdamSN, dict(subset_size=0), "Invalid subset_size value: 0"),
    (AdamSN, dict(subset_size=-4), "Invalid subset_size value: -4"),
    (AdamSN, dict(subset_size="rows"), "Invalid subset_size value: 'rows'"),
    (AdamSN, dict(subset_size=2.5), "Invalid subset_size value: 2.5"),
    (AdamSN, dict(rank=0), "Invalid rank value: 0"),
    (AdamSN, dict(rank=-3), "Invalid rank value: -3"),
    (AdamSN, dict(rank=4, gap=0), "Invalid gap value: 0"),
    (AdamSN, dict(gap=-1), "Invalid gap value: -1"),
    (AdamSN, dict(chunk_size=0), "Invalid chunk_size value: 0"),
    (AdamSN, dict(lr=torch.tensor(1e-3)), "a Tensor lr is not supported, got tensor(0.0010); pass a float"),
    (AdamSN, dict(maximize=1), "Invalid maximize value: 1"),
    (Adafactor, dict(lr=torch.tensor(1e-2)), "a Tensor lr is not supported, got tensor(0.0100); pass a float"),
    (Adafactor, dict(maximize="yes"), "Invalid maximize value: 'yes'"),
    (Adafactor, dict(lr=-1e-2), "Invalid learning rate: -0.01"),
    (Adafactor, dict(beta2_decay=0.5), "Invalid beta2_decay value: 0.5"),
    (Adafactor, dict(beta2_decay=-math.inf), "Invalid beta2_decay value: -inf"),
    (Adafactor, dict(beta2_decay=math.nan), "Invalid beta2_decay value: nan"),
    (Adafactor, dict(eps=(-1e-30, 1e-3)), "Invalid epsilon1 (eps[0]) value: -1e-30"),
    (Adafactor, dict(eps=(1e-30, -1e-3)), "Invalid epsilon2 (eps[1]) value: -0.001"),
    (Adafactor, dict(d=0.5), "Invalid clipping threshold d value: 0.5"),
    (Adafactor, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (Adafactor, dict(beta1=1.0), "Invalid beta1 parameter at index 0: 1.0"),
    (Adafactor, dict(beta1=-0.5), "Invalid beta1 parameter at index 0: -0.5"),
    (Adafactor, dict(chunk_size=-1), "Invalid chunk_size value: -1"),
]


@pytest.mark.parametrize("cls, kwargs, message", INVALID,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{m.split(':')[-1].strip()}"
                              for c, k, m in INVALID])
def test_invalid_hyperparameters_raise_value_error(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)


@pytest.mark.parametrize("cls, key, value", [(AdamSN, "rank", 0), (AdamSN, "subset_size", 0),
                                             (Adafactor, "d", 0.0), (Adafactor, "lr", -1.0)])
def test_invalid_param_group_values_raise_value_error(cls, key, value):
    with pytest.raises(ValueError, match=re.escape(str(value))):
        cls([{"params": [torch.nn.Parameter(torch.zeros(3, 2))], key: value}])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_gradients_raise_runtime_error(name):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (4, 3),
                                     check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        OPTIMIZERS[name]([p]).step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_gradients_stay_finite(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    for _ in range(5):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for value in state.values():
            assert torch.isfinite(value).all()


@pytest.mark.parametrize("plain_number_steps", [False, True], ids=["tensor_steps", "int_steps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_identically(name, dtype, plain_number_steps):
    """Also from a state dict whose ``step`` is a plain number, which torch.optim loads."""
    uninterrupted = _params(dtype)
    opt = OPTIMIZERS[name](uninterrupted)
    for step in range(8):
        _set_grads(uninterrupted, step)
        opt.step()

    first_half = _params(dtype)
    opt = OPTIMIZERS[name](first_half)
    for step in range(4):
        _set_grads(first_half, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    if plain_number_steps:
        for state in saved["state"].values():
            state["step"] = int(state["step"].item())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first_half]
    del opt, first_half
    opt = OPTIMIZERS[name](resumed)
    opt.load_state_dict(saved)
    for step in range(4, 8):
        _set_grads(resumed, step)
        opt.step()
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_maximize_steps_as_minimizing_the_negated_gradient(name):
    ascending, descending = _params(), _params()
    opt_up = OPTIMIZERS[name]([{"params": ascending, "maximize": True}])
    opt_down = OPTIMIZERS[name](descending)
    for step in range(4):
        _set_grads(ascending, step)
        _set_grads(descending, step)
        for p in descending:
            p.grad.neg_()
        opt_up.step()
        opt_down.step()
    for a, b in zip(ascending, descending):
        assert torch.equal(a, b)


def test_maximize_matches_torch_adamw():
    ours, theirs = _params(torch.float64), _params(torch.float64)
    opt_ours = AdamSN(ours, lr=1e-2, weight_decay=0.1, subset_norm=False, maximize=True)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, maximize=True)
    for step in range(4):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_contiguous_params_and_grads_match_contiguous(name):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(7, 5, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(6)]
    contiguous = torch.nn.Parameter(base.T.contiguous())
    strided = torch.nn.Parameter(base.clone().T)  # (5, 7) view with strides (1, 5)
    assert not strided.is_contiguous()
    opt_c, opt_s = OPTIMIZERS[name]([contiguous]), OPTIMIZERS[name]([strided])
    for g in grads:
        contiguous.grad = g.clone()
        strided.grad = g.T.contiguous().T  # a non-contiguous gradient too
        opt_c.step()
        opt_s.step()
    assert not strided.is_contiguous()
    assert torch.equal(contiguous, strided)


@pytest.fixture
def one_thread():
    """Tiny ops run faster on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loss_goes_down_on_a_small_regression(name, one_thread):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(128, 12, generator=gen)
    target = x @ torch.randn(12, 6, generator=gen) + 0.1 * torch.randn(128, 6, generator=gen)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    opt = OPTIMIZERS[name](list(model.parameters()))

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss

    first = loss_fn().item()
    for _ in range(150):
        opt.step(loss_fn)
    assert loss_fn().item() < 0.3 * first
