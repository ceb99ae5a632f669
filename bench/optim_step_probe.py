"""Step-time ratios of the optimizers over a GPT-2-small-shaped model (124M params), CPU.

A quick probe for development, not the benchmark suite: each variant is timed in a pair
with torch's fused AdamW, the two stepping one model's parameters with the same fixed
gradients, interleaved round by round so that machine noise hits both alike. It prints
each variant's median time, its ratio to AdamW fused in its pair, and which code stepped
it (compiled kernels, eager PyTorch, or torch's own). A pair's states are freed before
the next pair is built, so at most two optimizer states (about 3 GB with the model) are
held at once.

    python -m bench.optim_step_probe [--rounds 7] [--only adamsn,adafactor]

``adamsn`` and ``adafactor`` use the compiled kernels when they build (a first build
happens in the untimed first step); the ``_eager`` variants use PyTorch ops only. The
peers (``registry.PEER_NAMES``, the ``peers`` extra) are variants too, timed when named
in ``--only`` (torch's Muon takes 20-45x AdamW's time on 2 cores; torchao compiles in
the untimed first step).
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import interleaved_medians, observe_kernels
from memeff import GPT, GPTConfig
from memeff.optim import build_optimizer
from memeff.optim.registry import PEER_NAMES, missing_package

BASE = "adamw_fused"  # every variant's pair partner
VARIANTS = {
    BASE: ("adamw", {"fused": True}),
    "adamw_foreach": ("adamw", {"foreach": True}),
    "adamsn": ("adamsn", {}),  # backend "auto": the compiled kernels where they build
    "adamsn_eager": ("adamsn", {"backend": "eager"}),
    "adafactor": ("adafactor", {}),
    "adafactor_eager": ("adafactor", {"backend": "eager"}),
    "torch_adafactor_forloop": ("torch_adafactor", {"foreach": False}),
    "torch_adafactor_foreach": ("torch_adafactor", {"foreach": True}),
    **{name: (name, {}) for name in PEER_NAMES},
}
OURS = [v for v in VARIANTS if v != BASE and v not in PEER_NAMES]  # timed by default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(OURS),
                        help="comma-separated variants, each timed against adamw_fused "
                             f"(default: {','.join(OURS)}; peers: {','.join(PEER_NAMES)})")
    parser.add_argument("--tied-as-linear", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n != BASE]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for n in names:
        hint = missing_package(VARIANTS[n][0])
        if hint is not None:
            parser.error(hint)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 small: 12 layers, 768 wide, 50304 vocab
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2

    def build(variant: str) -> torch.optim.Optimizer:
        name, extra = VARIANTS[variant]
        return build_optimizer(name, model, lr=1e-4, weight_decay=0.1,
                               tied_weight_as_linear=bool(args.tied_as_linear), **extra)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f}M params, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for n in names:
        optimizers = {BASE: build(BASE), n: build(n)}
        # the first step creates the state, untimed
        paths = {k: observe_kernels(opt, opt.step, device) for k, opt in optimizers.items()}
        medians = interleaved_medians({k: opt.step for k, opt in optimizers.items()},
                                      args.rounds, device, warmup=0)
        optimizers.clear()
        gc.collect()
        path = paths[n]
        print(f"{n:26s} {medians[n] * 1e3:8.1f} ms  {medians[n] / medians[BASE]:6.2f}x "
              f"adamw_fused ({medians[BASE] * 1e3:.1f} ms in the pair)  {path['kernels']}"
              + (f" ({path['kernels_error']})" if path["kernels_error"] else ""))


if __name__ == "__main__":
    main()
