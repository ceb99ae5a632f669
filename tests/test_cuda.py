"""CUDA paths: allocator-measured memory and training on a GPU; without one, the clear refusal."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import allocator_bytes, allocator_delta, compiles, state_allocator_bytes
from memeff import GPT, GPTConfig, KVCache
from memeff.memory import expected_state_bytes, kv_cache_bytes, state_bytes
from memeff.optim import OPTIMIZER_NAMES, build_optimizer
from memeff.optim.registry import PEER_NAMES, missing_package

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_tensors_off_the_gpu_cost_no_allocator_bytes():
    assert allocator_bytes([torch.zeros(1000), torch.zeros(())]) == 0
    made, delta = allocator_delta(lambda: torch.zeros(3), torch.device("cpu"))
    assert delta is None and made.shape == (3,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_fails_with_a_clear_message(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_kv_cache.py", "--benchmark-only",
         "--device", "cuda", "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--device cuda, but torch sees no GPU" in run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []


@needs_gpu
@pytest.mark.parametrize("numel", [1, 128, 129, 1 << 20])
def test_allocator_bytes_is_what_memory_allocated_grows_by(numel):
    tensors, delta = allocator_delta(
        lambda: [torch.empty(numel, device=CUDA), torch.empty((), device=CUDA)], CUDA)
    assert delta == allocator_bytes(tensors)


@needs_gpu
@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_kv_cache_allocator_delta_equals_the_formula(n_kv_head):
    config = GPTConfig(n_layer=2, n_head=8, n_kv_head=n_kv_head, n_embd=1024, block_size=512,
                       vocab_size=1)
    cache, delta = allocator_delta(
        lambda: KVCache(config, 1, 512, dtype=torch.bfloat16, device=CUDA), CUDA)
    assert delta == kv_cache_bytes(config, 1, 512, torch.bfloat16) == allocator_bytes(cache.tensors())


@needs_gpu
@pytest.mark.parametrize("name", OPTIMIZER_NAMES + PEER_NAMES)
def test_optimizer_state_allocator_delta_equals_its_blocks(name):
    """Every tensor the state holds (memory.state_tensors: projector objects, quantized
    tensor subclasses by their inner tensors) is what the first step leaves allocated."""
    if name in PEER_NAMES and missing_package(name) is not None:
        pytest.skip(missing_package(name))
    torch.manual_seed(0)
    # ranks of the low-rank peers below the 64-wide weights
    settings = {"rank": 16} if name in ("galore_adamw", "apollo") else {}
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65)).to(CUDA)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # torch.compile'd steps (torchao) run eagerly: the same state, no compiler's allocations
    with torch.compiler.set_stance("force_eager") if compiles(name) else contextlib.nullcontext():
        build_optimizer(name, model, lr=1e-3, **settings).step()  # library workspaces, uncounted
        optimizer = build_optimizer(name, model, lr=1e-3, **settings)
        _, delta = allocator_delta(optimizer.step, CUDA)
    assert delta == state_allocator_bytes(optimizer)
    assert state_bytes(optimizer) == expected_state_bytes(optimizer) > 0


@needs_gpu
def test_training_on_the_gpu_follows_the_cpu_run():
    from memeff.train import TrainConfig, train

    tiny = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, batch_size=8,
                eval_iters=2, warmup_iters=5, max_iters=20, eval_interval=10)
    on_cpu = train(TrainConfig(**tiny))
    on_gpu = train(TrainConfig(**tiny, device="cuda"))
    for cpu_eval, gpu_eval in zip(on_cpu.evals, on_gpu.evals):
        assert gpu_eval["val_loss"] == pytest.approx(cpu_eval["val_loss"], rel=1e-3)
