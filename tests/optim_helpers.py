"""Helpers the optimizer tests share: run an optimizer over fixed gradients, compare runs."""

import torch


def run_steps(make_optimizer, w0: torch.Tensor, grads) -> torch.Tensor:
    """The parameter after one step per gradient, starting from ``w0``."""
    p = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def rel_error(ours: torch.Tensor, ref: torch.Tensor, w0: torch.Tensor) -> float:
    """Error relative to the reference's total movement (stricter than relative to W)."""
    return ((ours.double() - ref.double()).norm() / (ref.double() - w0.double()).norm()).item()
