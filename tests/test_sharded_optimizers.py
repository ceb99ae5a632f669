"""Optimizers under FSDP2 (``fully_shard``, gloo on CPU) against one process.

Each world size starts its processes once; in them every optimizer takes 20 steps on a
small model whose parameters cover the cases that need care when dim 0 is split: a tied
embedding/head of 37 rows (not divisible by 2 or 3), a weight with n >= m (row
subsets) and one with n < m (column subsets, column means, an (n, r) projector), a
3-dim parameter, and 1-dim ones. Rank 0 gathers the parameters; the test compares them
with the same 20 steps in this process, on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from memeff.memory import expected_state_bytes, state_bytes
from memeff.optim import build_optimizer

VOCAB, WIDTH, HIDDEN, BATCH, STEPS = 37, 8, 24, 6, 20
# name -> build_optimizer arguments; the 3-dim parameter is factored too, as a batch of matrices
OPTIMIZERS = {
    "adamw": dict(name="adamw", lr=1e-2, weight_decay=0.1, fused=False, foreach=False),
    "adamsn": dict(name="adamsn", lr=1e-2, weight_decay=0.1),
    "adamsnsm": dict(name="adamsnsm", lr=1e-2, weight_decay=0.1, rank=3, gap=6),
    "adafactor": dict(name="adafactor", lr=1e-2, weight_decay=0.1,
                      group_hparams={"other_weights": {"factored": True}}),
    "adafactor_beta1": dict(name="adafactor", lr=1e-2, beta1=0.9, scale_parameter=False),
}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.mix = nn.Parameter(0.1 * torch.randn(5, 2, WIDTH))  # (5, 2, 8): 5 matrices
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        h = self.wte(idx)  # (B, T, WIDTH)
        h = h + self.block(h)
        h = h + torch.einsum("btw,kcw->btw", h, self.mix) / 10
        logits = self.head(self.norm(h))
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, 5), generator=gen) for _ in range(STEPS + 1)]


def _run(model, optimizer, rows: slice) -> list[float]:
    """20 steps with the gradients clipped to norm 0.5; the norms before clipping."""
    batches = _batches()
    norms = []
    for step in range(STEPS):
        x, y = batches[step][rows], batches[step + 1][rows]
        model(x, y).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())
        optimizer.step()
        optimizer.zero_grad()
    return norms


def _one_process(name: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = Tiny()
    kwargs = dict(OPTIMIZERS[name])
    optimizer = build_optimizer(kwargs.pop("name"), model, **kwargs)
    norms = _run(model, optimizer, slice(None))
    return {k: v.detach().clone() for k, v in model.named_parameters()}, norms


def _rank_main(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        results = {}
        per_rank = BATCH // world_size
        for name, kwargs in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = Tiny()
            fully_shard(model.block)
            fully_shard(model)
            kwargs = dict(kwargs)
            optimizer = build_optimizer(kwargs.pop("name"), model, **kwargs)
            norms = _run(model, optimizer, slice(rank * per_rank, (rank + 1) * per_rank))
            params = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
            local_bytes = torch.tensor([state_bytes(optimizer), expected_state_bytes(optimizer)])
            gathered = [torch.zeros_like(local_bytes) for _ in range(world_size)]
            dist.all_gather(gathered, local_bytes)
            results[name] = (params, [tuple(t.tolist()) for t in gathered], norms)
        torch.manual_seed(0)
        model = Tiny()
        fully_shard(model.block)
        fully_shard(model)
        optimizer = build_optimizer("torch_adafactor", model, lr=1e-2)
        try:
            _run(model, optimizer, slice(rank * per_rank, (rank + 1) * per_rank))
            results["torch_adafactor"] = {k: v.full_tensor() for k, v in model.named_parameters()}
        except Exception as exc:  # recorded: the test below expects torch's failure
            results["torch_adafactor"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}_ranks")
def sharded_results(request, tmp_path_factory):
    world_size = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp{world_size}")
    out = tmp / "params.pt"
    mp.spawn(_rank_main, args=(world_size, str(tmp / "rendezvous"), str(out)),
             nprocs=world_size, join=True)
    return world_size, torch.load(out)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_steps_equal_one_process(sharded_results, name):
    _, results = sharded_results
    sharded, _, sharded_norms = results[name]
    expected, norms = _one_process(name)
    for key, want in expected.items():
        got = sharded[key]
        error = ((got - want).norm() / want.norm()).item()
        assert error <= 1e-5, f"{name}: {key} differs from one process by {error:.2e} (relative)"
    # clipping sees the norm of the whole gradient
    assert sharded_norms == pytest.approx(norms, rel=1e-5) and max(norms) > 0.5


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_per_rank_state_bytes_equal_the_formulas_and_shrink(sharded_results, name):
    world_size, results = sharded_results
    _, per_rank, _ = results[name]
    for live, expected in per_rank:
        assert live == expected
    torch.manual_seed(0)
    model = Tiny()
    kwargs = dict(OPTIMIZERS[name])
    one_process = expected_state_bytes(build_optimizer(kwargs.pop("name"), model, **kwargs))
    largest = max(live for live, _ in per_rank)
    assert largest < one_process * (1 + 1 / world_size) / 2 + 1  # well under the whole


@pytest.mark.xfail(strict=True, reason=(
    "torch.optim.Adafactor under FSDP2 raises: aten.pow_.Scalar: in-place operations that "
    "require placement changes are not supported (its row/column means are partial "
    "DTensors); when torch steps it, this test passes and fails as strict"))
def test_torch_adafactor_steps_sharded_as_one_process(sharded_results):
    _, results = sharded_results
    sharded = results["torch_adafactor"]
    assert not isinstance(sharded, str), sharded
    torch.manual_seed(0)
    model = Tiny()
    optimizer = build_optimizer("torch_adafactor", model, lr=1e-2)
    _run(model, optimizer, slice(None))
    for key, want in model.named_parameters():
        torch.testing.assert_close(sharded[key], want.detach(), rtol=1e-5, atol=1e-7)


def test_a_subset_size_that_crosses_rows_is_refused_when_sharded(tmp_path):
    mp.spawn(_refuse_crossing_subsets, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def _refuse_crossing_subsets(rank: int, world_size: int, rendezvous: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from memeff.optim import AdamSN

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        layer = nn.Linear(6, 4)  # weight (4, 6): rows of 6 elements
        fully_shard(layer)
        AdamSN([layer.weight], subset_size=3)  # subsets of 3 lie within a row
        try:
            AdamSN([layer.weight], subset_size=4)  # subsets of 4 (of 24) cross rows
        except ValueError as exc:
            assert "subset_size=4" in str(exc) and "a divisor of 6" in str(exc), exc
        else:
            raise AssertionError("subset_size=4 on a sharded (4, 6) weight was accepted")
    finally:
        dist.destroy_process_group()


def test_the_test_model_needs_what_it_claims():
    """Guards the fixture: the cases named in the module docstring are in the model."""
    model = Tiny()
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert VOCAB % 2 and VOCAB % 3
    assert shapes["block.2.weight"][0] < shapes["block.2.weight"][1]  # n < m
    assert shapes["block.0.weight"][0] > shapes["block.0.weight"][1]  # n > m
    assert len(shapes["mix"]) == 3 and any(len(s) == 1 for s in shapes.values())
    assert model.head.weight is model.wte.weight
    assert math.ceil(STEPS / OPTIMIZERS["adamsnsm"]["gap"]) >= 3  # the projector is refreshed
