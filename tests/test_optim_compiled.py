"""The compiled CPU kernels (memeff/optim/kernels.cpp) against the eager path they replace.

The first run in a fresh environment compiles the kernels (about a minute); later runs
load them from torch's extension cache.
"""

from __future__ import annotations

import copy
import os
import logging

import pytest
import torch
from optim_helpers import rel_error, run_steps

from memeff.optim import AdamSN, Adafactor, kernels

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    module = kernels.load(required=False)
    if module is None:
        pytest.skip(f"the C++ optimizer kernels cannot be built here ({kernels.build_error()}); "
                    f"install a C++ compiler and ninja to run these tests")
    return module


class _CallCounter:
    """Stands in for the kernels module and keeps each call's name and arguments."""

    def __init__(self, module):
        self.module, self.log = module, []

    @property
    def calls(self) -> int:
        return len(self.log)

    def __getattr__(self, name):
        def call(*args):
            self.log.append((name, args))
            return getattr(self.module, name)(*args)
        return call


@pytest.fixture
def kernel_calls(monkeypatch, compiled_kernels):
    counter = _CallCounter(compiled_kernels)
    monkeypatch.setattr(kernels, "load", lambda required=False: counter)
    return counter


def _grads(shape, dtype, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]
    grads[3] = grads[3] * 100.0  # makes Adafactor's update clipping act at least once
    return grads




# rows (n > m), columns (n < m), 3-D seen as (first dim, rest) both ways, vectors (one
# subset per element), and shapes large enough to be split over threads, with row
# lengths that are not a multiple of the lanes
ADAMSN_SHAPES = [(40, 9), (9, 40), (3, 5, 4), (30, 2, 3), (37,), (300, 257), (257, 300), (70001,)]
ADAMSN_CASES = {
    "decay": dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
    "no_decay": dict(lr=3e-2, betas=(0.9, 0.999)),
    "large_momentum_weight": dict(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1),  # lerp's other form
    "subset_norm_off": dict(lr=1e-2, subset_norm=False, weight_decay=0.1),  # AdamW
}
ADAFACTOR_SHAPES = [(40, 9), (9, 40), (3, 10, 6), (37,), (300, 257), (2, 257, 300), (70001,)]
ADAFACTOR_CASES = {
    "default": dict(lr=1e-2),
    "beta1_decay": dict(lr=1e-2, beta1=0.9, weight_decay=0.1),
    "large_momentum_weight": dict(lr=1e-2, beta1=0.3),
    "no_scaling": dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1),
    "unfactored": dict(lr=1e-2, factored=False, weight_decay=0.1),
    "unfactored_beta1": dict(lr=1e-2, factored=False, beta1=0.9),
}


def _compare(make, shape, dtype, kernel_calls):
    """(compiled, eager, w0, grads) after STEPS steps of each backend."""
    w0 = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, dtype)
    compiled = run_steps(lambda ps: make(ps, "compiled"), w0, grads)
    assert kernel_calls.calls >= STEPS  # the kernels ran, not the eager fallback
    eager = run_steps(lambda ps: make(ps, "eager"), w0, grads)
    return compiled, eager, w0, grads


FLOAT64_CASES = [(AdamSN, shape, ADAMSN_CASES[case], f"adamsn-{case}-{shape}")
                 for case in ADAMSN_CASES for shape in ADAMSN_SHAPES]
FLOAT64_CASES += [(Adafactor, shape, ADAFACTOR_CASES[case], f"adafactor-{case}-{shape}")
                  for case in ADAFACTOR_CASES for shape in ADAFACTOR_SHAPES]


@pytest.mark.parametrize("cls, shape, hparams", [c[:3] for c in FLOAT64_CASES],
                         ids=[c[3] for c in FLOAT64_CASES])
def test_compiled_equals_eager_float64(cls, shape, hparams, kernel_calls):
    def make(ps, backend):
        return cls(ps, backend=backend, **hparams)
    compiled, eager, w0, _ = _compare(make, shape, torch.float64, kernel_calls)
    assert rel_error(compiled, eager, w0) <= 1e-12


@pytest.mark.parametrize("shape", [(300, 257), (257, 300), (3, 5, 4), (70001,)], ids=str)
@pytest.mark.parametrize("make", [
    lambda ps, backend: AdamSN(ps, lr=1e-2, weight_decay=0.1, backend=backend),
    lambda ps, backend: Adafactor(ps, lr=1e-2, weight_decay=0.1, backend=backend),
    lambda ps, backend: Adafactor(ps, lr=1e-2, beta1=0.9, backend=backend),
], ids=["adamsn", "adafactor", "adafactor_beta1"])
def test_compiled_equals_eager_float32(shape, make, kernel_calls):
    compiled, eager, w0, grads = _compare(make, shape, torch.float32, kernel_calls)
    # relative to the params: their movement is ~1% of them, and rounding W to float32
    # alone then differs by ~1e-6 of the movement between any two orders of operations
    assert ((compiled - eager).double().norm() / eager.double().norm()).item() <= 1e-6
    # and the compiled path is as accurate as the eager one against a float64 run
    exact = run_steps(lambda ps: make(ps, "eager"), w0.double(), [g.double() for g in grads])
    assert rel_error(compiled, exact, w0) <= 2 * rel_error(eager, exact, w0)


@pytest.mark.parametrize("make", [
    lambda ps, backend: AdamSN(ps, lr=1e-2, weight_decay=0.1, backend=backend),
    lambda ps, backend: Adafactor(ps, lr=1e-2, beta1=0.9, weight_decay=0.1, backend=backend),
], ids=["adamsn", "adafactor_beta1"])
@pytest.mark.parametrize("first, second", [("compiled", "eager"), ("eager", "compiled")])
def test_state_dict_round_trip_across_backends(make, first, second):
    shapes = [(40, 9), (9, 40), (2, 6, 5), (7,)]
    gen = torch.Generator().manual_seed(2)
    w0 = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
             for _ in range(8)]

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            opt.step()

    uninterrupted = [torch.nn.Parameter(w.clone()) for w in w0]
    run(uninterrupted, make(uninterrupted, first), range(8))
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = make(params, first)
    run(params, opt, range(4))
    saved = copy.deepcopy(opt.state_dict())
    opt = make(params, second)
    opt.load_state_dict(saved)
    run(params, opt, range(4, 8))
    for a, b, w in zip(params, uninterrupted, w0):
        assert rel_error(a.detach(), b.detach(), w) <= 1e-12


@pytest.mark.parametrize("make", [
    lambda ps: AdamSN(ps, subset_size=8, backend="compiled"),
    lambda ps: AdamSN(ps, rank=2, gap=3, backend="compiled"),
], ids=["adamsn_int_subsets", "adamsnsm"])
def test_cases_the_kernels_do_not_cover_stay_eager(make, kernel_calls):
    p = torch.nn.Parameter(torch.randn(16, 6))
    opt = make([p])
    p.grad = torch.randn(16, 6)
    opt.step()
    assert kernel_calls.calls == 0


@pytest.mark.parametrize("cls", [AdamSN, Adafactor])
def test_bfloat16_params_step_eagerly_under_the_compiled_backend(cls, kernel_calls):
    p = torch.nn.Parameter(torch.randn(16, 6, dtype=torch.bfloat16))
    opt = cls([p], lr=1e-2, backend="compiled")
    p.grad = torch.randn(16, 6, dtype=torch.bfloat16)
    opt.step()
    assert kernel_calls.calls == 0
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("cls", [AdamSN, Adafactor])
def test_invalid_backend_raises_value_error(cls):
    with pytest.raises(ValueError, match="Invalid backend value: 'fast'"):
        cls([torch.nn.Parameter(torch.zeros(3, 2))], backend="fast")


def test_failed_build_falls_back_with_one_warning_or_raises(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setattr(kernels, "NAME", "memeff_test_broken_kernels")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    p = torch.nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    with caplog.at_level(logging.WARNING, logger="memeff.optim.kernels"):
        opt = AdamSN([p], backend="auto")
        for _ in range(2):
            p.grad = torch.ones(8, 3, dtype=torch.float64)
            opt.step()
    assert torch.isfinite(p).all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "eager" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="backend='compiled'.*could not be built"):
        AdamSN([p], backend="compiled")


def _adafactor_steps(backend, w0, grads, between):
    """Adafactor over ``grads``, calling ``between(p, opt)`` after the 5th step."""
    p = torch.nn.Parameter(w0.clone())
    opt = Adafactor([p], lr=1e-2, weight_decay=0.1, backend=backend)
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        if k == 4:
            between(p, opt)
    return p.detach()


def _scale_in_place(p, opt):
    with torch.no_grad():
        p.mul_(0.5)


def _scale_through_data(p, opt):
    p.data.mul_(0.5)


def _copy_through_data(p, opt):
    p.data.copy_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("between", [_scale_in_place, _scale_through_data, _copy_through_data],
                         ids=["in_place", "scale_through_data", "copy_through_data"])
@pytest.mark.parametrize("shape", [(300, 257), (3, 10, 6), (70001,)], ids=str)
def test_adafactor_sees_a_parameter_changed_between_steps(shape, between, compiled_kernels):
    w0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape, torch.float64)
    compiled = _adafactor_steps("compiled", w0, grads, between)
    eager = _adafactor_steps("eager", w0, grads, between)
    assert rel_error(compiled, eager, w0) <= 1e-12
    unchanged = _adafactor_steps("eager", w0, grads, lambda p, opt: None)
    assert rel_error(compiled, unchanged, w0) > 1e-3  # the change mattered


@pytest.mark.parametrize("shape", [(300, 257), (2, 40, 9)], ids=str)
def test_adafactor_step_after_a_write_through_data_equals_eager_float32(shape, kernel_calls):
    gen = torch.Generator().manual_seed(4)
    grads = _grads(shape, torch.float32, steps=6)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    compiled = Adafactor([p], lr=1e-2, weight_decay=0.1, backend="compiled")
    for g in grads[:3]:
        p.grad = g.clone()
        compiled.step()
    # an identical copy of the parameter and the optimizer, stepping with PyTorch ops
    q = torch.nn.Parameter(p.detach().clone())
    eager = Adafactor([q], lr=1e-2, weight_decay=0.1, backend="eager")
    eager.load_state_dict(copy.deepcopy(compiled.state_dict()))
    replacement = 3.0 * torch.randn(shape, generator=gen)
    writes = [lambda x: x.data.mul_(2.0), lambda x: x.data.copy_(replacement)]
    for write, g in zip(writes, grads[3:]):
        calls = kernel_calls.calls
        for x, opt in ((p, compiled), (q, eager)):
            before = x.detach().clone()
            write(x)
            assert not torch.equal(x.detach(), before)
            x.grad = g.clone()
            opt.step()
        assert kernel_calls.calls == calls + 2  # the compiled step ran both kernel passes
        # as test_compiled_equals_eager_float32: relative to the params, ~1e-6 at most
        assert ((p - q).detach().double().norm() / q.detach().double().norm()).item() <= 1e-6


@pytest.mark.parametrize("make", [
    lambda ps: AdamSN(ps, lr=1e-2, backend="compiled"),
    lambda ps: Adafactor(ps, lr=1e-2, beta1=0.9, backend="compiled"),
    lambda ps: Adafactor(ps, lr=1e-2, factored=False, backend="compiled"),
], ids=["adamsn", "adafactor_beta1", "adafactor_unfactored"])
def test_compiled_steps_advance_the_version_of_what_they_write(make, compiled_kernels):
    p = torch.nn.Parameter(torch.randn(40, 9, dtype=torch.float64))
    opt = make([p])
    p.grad = torch.randn(40, 9, dtype=torch.float64)
    opt.step()
    versions = [t._version for t in (p, *opt.state[p].values())]
    p.grad = torch.randn(40, 9, dtype=torch.float64)
    opt.step()
    for (key, t), before in zip([("param", p), *opt.state[p].items()], versions):
        if key != "step":  # the step counter is a plain += (advanced anyway)
            assert t._version > before, key


def test_a_lock_left_by_an_interrupted_build_does_not_hang_the_next_load(tmp_path):
    """torch's build waits while its lock file exists; one left by a killed build is removed."""
    import shutil
    import subprocess
    import sys

    cached = kernels.build_directory()
    root = tmp_path / "extensions"
    copy_dir = root / cached.relative_to(cached.parent.parent)
    shutil.copytree(cached, copy_dir)  # keeps mtimes: ninja finds the build up to date
    (copy_dir / kernels.TORCH_BATON).write_text("")
    result = subprocess.run(
        [sys.executable, "-c", "from memeff.optim import kernels; kernels.load(required=True)"],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (copy_dir / kernels.TORCH_BATON).exists()
