"""Step-time ratios of the optimizers over a GPT-2-small-shaped model (124M params), CPU.

A quick probe for development, not the benchmark suite: every optimizer steps the same
parameters with the same fixed gradients, interleaved round by round so that machine
noise hits all of them alike; it prints median times and ratios to AdamW fused.

    python bench/optim_step_probe.py [--rounds 7] [--only adamsn,adafactor]

``adamsn`` and ``adafactor`` use the compiled kernels when they build (a first build
happens in the untimed first round); the ``_eager`` variants use PyTorch ops only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memeff import GPT, GPTConfig
from memeff.optim import build_optimizer, kernels

VARIANTS = {
    "adamw_fused": ("adamw", {"fused": True}),
    "adamw_foreach": ("adamw", {"foreach": True}),
    "adamsn": ("adamsn", {}),  # backend "auto": the compiled kernels where they build
    "adamsn_eager": ("adamsn", {"backend": "eager"}),
    "adafactor": ("adafactor", {}),
    "adafactor_eager": ("adafactor", {"backend": "eager"}),
    "torch_adafactor_forloop": ("torch_adafactor", {"foreach": False}),
    "torch_adafactor_foreach": ("torch_adafactor", {"foreach": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--tied-as-linear", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 small: 12 layers, 768 wide, 50304 vocab
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    names = ["adamw_fused"] + [n for n in args.only.split(",") if n != "adamw_fused"]
    optimizers = {}
    for n in names:
        name, extra = VARIANTS[n]
        optimizers[n] = build_optimizer(name, model, lr=1e-4, weight_decay=0.1,
                                        tied_weight_as_linear=bool(args.tied_as_linear), **extra)
    times = {n: [] for n in names}
    for round_ in range(args.rounds + 1):
        for n in names:
            start = time.perf_counter()
            optimizers[n].step()
            elapsed = time.perf_counter() - start
            if round_ > 0:  # the first round creates the state
                times[n].append(elapsed)
    for n in names:  # a failed build falls back to eager: say so next to the numbers
        if getattr(optimizers[n], "backend", None) == "auto" and kernels.load() is None:
            print(f"{n}: compiled kernels unavailable, eager path ({kernels.build_error()})")
    n_params = sum(p.numel() for p in model.parameters())
    base = statistics.median(times["adamw_fused"])
    print(f"{n_params / 1e6:.1f}M params, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:26s} {med * 1e3:8.1f} ms  {med / base:6.2f}x adamw_fused")


if __name__ == "__main__":
    main()
