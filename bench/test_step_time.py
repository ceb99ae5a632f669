"""Time of an optimizer step over whole models, against torch's AdamW and the memory floor.

For each model, every optimizer steps its own copy of the same parameters and gradients;
all of them, torch's AdamW in foreach and fused form, torch's Adafactor (for-loop and
foreach), and an in-place add as large as the model are timed round after round,
interleaved, so their ratios come from one run. The in-place add gives the memory
bandwidth the step could reach; an optimizer's floor is the bytes it must move at that
bandwidth, and ``fraction_of_floor`` is floor time over measured time (1.0 is at the floor).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import interleaved_medians, peak_allocated_bytes, require_profile, synchronized
from memeff import GPT, GPTConfig
from memeff.optim import OPTIMIZER_NAMES, build_optimizer

MODELS = {
    "baby": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65,
                       bias=False), "quick", 40),
    "gpt2-124M": (GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                            vocab_size=50257, bias=True), "default", 10),
}
# torch's other forms, timed beside the optimizers training compares
TORCH_VARIANTS = ("adamw_foreach", "torch_adafactor_foreach")
CANDIDATES = tuple(OPTIMIZER_NAMES) + TORCH_VARIANTS
HPARAMS = dict(lr=1e-3, weight_decay=0.1)
# float32 accesses per element a step must make: reads and writes of param, grad and state
ACCESSES = {
    "adamw": 7, "adamw_foreach": 7,  # p, g, m, v read; p, m, v written
    "adamsn": 5,  # p, g, m read; p, m written (v is one value per row)
    "adamsnsm": 3,  # p, g read; p written (the momentum is low-rank)
    # Adafactor's row and column statistics need all of G, and its parameter scaling
    # RMS(W), before any element is updated: G is read twice, W read and written once;
    # ours keeps RMS(W) from the last step's write, torch's reads W once more for it
    "adafactor": 4, "torch_adafactor": 5, "torch_adafactor_foreach": 5,
}
# params without the method's reduction: AdamW's 7; unfactored Adafactor reads G and V in
# both passes, writes V once, reads and writes W (torch's reads W once more for RMS(W))
PER_ELEMENT_ACCESSES = {"adamsn": 7, "adamsnsm": 7, "adafactor": 7, "torch_adafactor": 8,
                        "torch_adafactor_foreach": 8}
BATCH_SIZE, BLOCK = 12, 64
KV_HEADS = (4, 2, 1)


def suite_config(profile: str) -> dict:
    return {"models": {k: vars(v[0]) for k, v in MODELS.items()},
            "rounds": {k: v[2] for k, v in MODELS.items()}, "hparams": HPARAMS,
            "accesses_per_element": ACCESSES, "per_element_accesses": PER_ELEMENT_ACCESSES,
            "train_iteration": {"model": "baby", "batch_size": BATCH_SIZE, "block_size": BLOCK,
                                "n_kv_heads": list(KV_HEADS)}}


def floor_bytes(name: str, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the step must move: the method's accesses on the params it reduces over."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            reduced = {
                "adamsn": group.get("subset_norm", False), "adamsnsm": group.get("subset_norm", False),
                "adafactor": group.get("factored", False) and p.dim() >= 2,
                "torch_adafactor": p.dim() >= 2, "torch_adafactor_foreach": p.dim() >= 2,
            }.get(name, True)
            accesses = ACCESSES[name] if reduced else PER_ELEMENT_ACCESSES[name]
            total += accesses * p.numel() * p.element_size()
    return total


@pytest.fixture(scope="module", params=list(MODELS))
def timed_model(request, device, profile):
    model_name = request.param
    config, needed, rounds = MODELS[model_name]
    require_profile(profile, needed)
    # each optimizer steps a model of its own, as in training: stepping shared parameters,
    # each would find them changed by the others between its steps (which makes our
    # Adafactor read them again for RMS(X), see memeff.optim.Adafactor)
    models = {name: model_with_gradients(config, device) for name in CANDIDATES}
    optimizers = {name: build_optimizer(name, models[name], **HPARAMS) for name in CANDIDATES}
    n_params = sum(p.numel() for p in models["adamw"].parameters())
    candidates = {name: opt.step for name, opt in optimizers.items()}
    # the bandwidth probe: one in-place add over contiguous buffers as large as the model
    probe_target = torch.zeros(n_params, device=device)
    probe_source = torch.ones(n_params, device=device)
    candidates["inplace_add"] = lambda: probe_target.add_(probe_source, alpha=1e-12)
    medians = interleaved_medians(candidates, rounds, device)
    bandwidth = 3 * probe_target.nbytes / medians["inplace_add"]  # read both, write one
    yield dict(name=model_name, optimizers=optimizers, medians=medians,
               bandwidth=bandwidth, n_params=n_params, rounds=rounds)
    optimizers.clear()
    models.clear()


def model_with_gradients(config: GPTConfig, device: torch.device) -> GPT:
    """The same model and fixed gradients on every call."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


@pytest.mark.benchmark(group="optimizer step")
@pytest.mark.parametrize("name", CANDIDATES)
def test_step_time(benchmark, record, device, timed_model, name):
    optimizer = timed_model["optimizers"][name]
    medians = timed_model["medians"]
    peak, peak_method = peak_allocated_bytes(optimizer.step, device)
    benchmark.pedantic(synchronized(optimizer.step, device), rounds=3, warmup_rounds=0)
    floor = floor_bytes(name, optimizer)
    record(model=timed_model["name"], optimizer=name, n_params=timed_model["n_params"],
           interleaved_median_s=medians[name], interleaved_rounds=timed_model["rounds"],
           ratio_to_adamw_fused=medians[name] / medians["adamw"],
           ratio_to_adamw_foreach=medians[name] / medians["adamw_foreach"],
           ratio_to_torch_adafactor_foreach=medians[name] / medians["torch_adafactor_foreach"],
           ratio_to_torch_adafactor=medians[name] / medians["torch_adafactor"],
           inplace_add_s=medians["inplace_add"], bandwidth_bytes_per_s=timed_model["bandwidth"],
           floor_bytes=floor, fraction_of_floor=floor / timed_model["bandwidth"] / medians[name],
           step_peak_bytes=peak, step_peak_method=peak_method)


@pytest.mark.benchmark(group="train iteration (baby)")
@pytest.mark.parametrize("n_kv_head", KV_HEADS, ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_train_iteration(benchmark, record, device, profile, name, n_kv_head):
    require_profile(profile, "quick" if n_kv_head == 4 or name == "adamw" else "default")
    config, _, _ = MODELS["baby"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(config), "n_kv_head": n_kv_head})).to(device)
    optimizer = build_optimizer(name, model, **HPARAMS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (BATCH_SIZE, BLOCK), generator=generator).to(device)
    y = torch.randint(config.vocab_size, (BATCH_SIZE, BLOCK), generator=generator).to(device)

    def iteration():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    iteration()  # creates the optimizer state
    peak, peak_method = peak_allocated_bytes(iteration, device)
    benchmark(synchronized(iteration, device))
    record(model="baby", optimizer=name, n_kv_head=n_kv_head, batch_size=BATCH_SIZE,
           block_size=BLOCK, iteration_peak_bytes=peak, iteration_peak_method=peak_method)


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if r["test"].startswith("test_step_time")]
    return {
        model: {r["optimizer"]: {k: r[k] for k in ("ratio_to_adamw_fused", "ratio_to_adamw_foreach",
                                                    "ratio_to_torch_adafactor_foreach",
                                                    "fraction_of_floor", "interleaved_median_s")}
                for r in steps if r["model"] == model}
        for model in sorted({r["model"] for r in steps})
    }
