"""AdamSN: Adam with a subset-norm second moment, optionally with subspace momentum."""

from __future__ import annotations

import math

import torch
from torch.autograd.graph import increment_version

from memeff.optim._common import (
    DEFAULT_CHUNK_SIZE,
    ChunkedOptimizer,
    Scratch,
    check_beta,
    check_bool,
    check_lr,
    check_nonnegative,
    check_positive_int,
    chunks,
    largest_divisor_at_most,
)
from memeff.optim.sharding import Shards, StateFactory, local

__all__ = ["AdamSN", "subset_count", "subset_layout"]


def subset_layout(shape: torch.Size | tuple[int, ...], subset_size="auto", subset_norm: bool = True):
    """How a tensor of ``shape`` is cut into subsets, as ``(n, m, along_columns)`` or ``None``.

    The tensor is viewed as an (n, m) row-major matrix. ``along_columns=False`` means
    each row is one subset (the second moment has shape (n, 1)); ``True`` means each
    column is one (shape (1, m)). ``None`` means one subset per element (AdamW).
    """
    numel = math.prod(shape)
    if not subset_norm or numel == 0:
        return None
    if subset_size == "auto":
        if len(shape) < 2:
            return None
        n = shape[0]
        m = numel // n
        if n >= m:
            return None if m == 1 else (n, m, False)
        return None if n == 1 else (n, m, True)
    size = largest_divisor_at_most(numel, subset_size)
    return None if size == 1 else (numel // size, size, False)


def subset_count(shape: torch.Size | tuple[int, ...], subset_size="auto",
                 subset_norm: bool = True) -> int:
    """Values of the second moment of a tensor of ``shape``: one per subset."""
    return math.prod(_second_moment_shape(shape, subset_layout(shape, subset_size, subset_norm)))


def _second_moment_shape(shape, layout) -> tuple[int, ...]:
    if layout is None:
        return tuple(shape)
    n, m, along_columns = layout
    return (1, m) if along_columns else (n, 1)


def _layout_of_state(shape: torch.Size, exp_avg_sq_shape: torch.Size):
    """The layout of a param of ``shape``, recovered from its second moment's shape (so it
    follows a loaded state dict); the shapes of the whole param and state when sharded."""
    if exp_avg_sq_shape == shape:
        return None
    numel = math.prod(shape)
    subsets = math.prod(exp_avg_sq_shape)
    if (len(exp_avg_sq_shape) == 2 and exp_avg_sq_shape[0] == 1
            and exp_avg_sq_shape[1] == numel // shape[0] != 1):
        return (numel // subsets, subsets, True)
    return (subsets, numel // subsets, False)


def _local_layout(layout, local_numel: int):
    """``layout`` applied to the ``local_numel`` elements of this rank's rows."""
    if layout is None:
        return None
    _, m, along_columns = layout  # m: elements per row of the (n, m) view
    return (local_numel // m, m, along_columns)


def _projector_side(n: int, m: int) -> str:
    # project the longer side away, as GaLore: keep (n, r) when n >= m, else (r, m)
    return "right" if n >= m else "left"


class AdamSN(ChunkedOptimizer):
    r"""Adam with a subset-norm second moment (AdamSN), optionally with subspace momentum.

    `Subset-Norm and Subspace-Momentum: Faster Memory-Efficient Adaptive Optimization
    with Convergence Guarantees <https://arxiv.org/abs/2411.07120>`_ (Nguyen et al.).

    For a parameter :math:`W` viewed as an (n, m) matrix (a tensor of 3 or more dims as
    (first dim, all the rest)), gradient :math:`G`, step :math:`t`, and a partition of its
    entries into subsets :math:`S` (rows or columns, see ``subset_size``):

    .. math::
        \begin{aligned}
            &W \leftarrow W (1 - \gamma\lambda)                       && \text{decoupled decay} \\
            &M \leftarrow \beta_1 M + (1 - \beta_1) G                 && \text{full-size first moment} \\
            &v_S \leftarrow \beta_2 v_S + (1 - \beta_2) \textstyle\sum_{(i,j)\in S} G_{ij}^2
                                                                      && \text{one value per subset (a sum)} \\
            &W_{ij} \leftarrow W_{ij} - \frac{\gamma}{1 - \beta_1^t}\,
                \frac{M_{ij}}{\sqrt{v_{S(i,j)}} / \sqrt{1 - \beta_2^t} + \epsilon}
        \end{aligned}

    With subsets of one element this is exactly :class:`torch.optim.AdamW` (same order of
    operations, same bias correction and eps placement).

    With subspace momentum (``rank`` set), for a parameter of 2 or more dims the first
    moment lives in a rank-r subspace. Every ``gap`` steps (at t = 1, gap + 1, ...) the
    projector is recomputed from the SVD of the current gradient,
    :math:`G = U \Sigma V^\top`: for n >= m it is :math:`Q = V_{:, :r}^\top` (r, m) and
    :math:`R = G Q^\top` (n, r), lifted back by :math:`R Q`; for n < m it is
    :math:`P = U_{:, :r}` (n, r), :math:`R = P^\top G` (r, m), lifted back by :math:`P R`.

    .. math::
        \begin{aligned}
            &M \leftarrow \beta_1 M + (1 - \beta_1) R                 && \text{momentum in the subspace} \\
            &N \leftarrow \mathrm{lift}(M) / (1 - \beta_1^t) + \big(G - \mathrm{lift}(R)\big)
                                                                      && \text{orthogonal part unaccumulated} \\
            &W_{ij} \leftarrow W_{ij} - \gamma\, N_{ij} / \big(\sqrt{v_{S(i,j)}} / \sqrt{1 - \beta_2^t} + \epsilon\big)
        \end{aligned}

    with :math:`v` the subset-norm second moment of the full gradient :math:`G` as above.

    Args:
        params (iterable): parameters or dicts defining parameter groups. Any argument
            below except ``chunk_size`` may be set per group.
        lr (float, optional): learning rate :math:`\gamma`. The reference implementation uses
            about 10x Adam's learning rate for subset-norm parameters (default: 1e-3)
        betas (Tuple[float, float], optional): :math:`(\beta_1, \beta_2)`, each in [0, 1)
            (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to the bias-corrected root of the
            second moment (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0)
        subset_size (str or int, optional): ``"auto"`` reduces the smaller dimension of the
            (n, m) view: for n >= m each row is a subset (v has shape (n, 1)), otherwise each
            column (v has shape (1, m)); 1-D tensors get one subset per element. An integer k
            splits the flattened tensor into contiguous subsets of d elements, d the largest
            divisor of its numel that is <= k (v has shape (numel / d, 1); d = 1 is AdamW)
            (default: "auto")
        subset_norm (bool, optional): False gives the group one subset per element, i.e.
            AdamW's second moment (default: True)
        rank (int, optional): rank r of the subspace momentum, capped at min(n, m) per
            parameter; None turns subspace momentum off. 1-D parameters always keep a
            full-size first moment (default: None)
        gap (int, optional): steps between projector refreshes (default: 200)
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        chunk_size (int, optional): elements per chunk of the eager loop (default: 2**20)
        backend (str, optional): ``"auto"`` steps float32 and float64 CPU parameters
            without subspace momentum whose subsets are rows, columns (``subset_size="auto"``)
            or single elements with compiled C++ kernels, built at first use (see :mod:`memeff.optim.kernels`), and
            everything else with PyTorch ops; if the kernels cannot be built it warns once
            and uses PyTorch ops throughout. ``"eager"``: PyTorch ops only. ``"compiled"``:
            as ``"auto"``, but raises RuntimeError if the kernels cannot be built
            (default: "auto")

    State per parameter (``step`` is a float32 scalar; the rest have the param's dtype):
    ``step``; ``exp_avg`` full size, or (n, r) / (r, m) with subspace momentum;
    ``exp_avg_sq`` with one value per subset (n*m values per element, max(n, m) values
    with ``"auto"`` on an (n, m) weight); ``projector`` (r, m) or (n, r) with subspace
    momentum. So an (n, m) weight holds n*m + max(n, m) numbers against AdamW's 2*n*m.

    What a step allocates: one scratch buffer of ``chunk_size`` elements per dtype and
    device, reused by every chunk of every parameter, and vectors of one value per subset
    of a chunk. Non-contiguous parameters are updated in a contiguous copy (one
    param-sized temporary each). Subspace momentum adds the low-rank products and one
    full-size numerator per parameter, and an SVD at each refresh. The compiled kernels
    allocate only vectors: m denominators and one m-vector of column sums per thread for
    column subsets, nothing for row or element subsets.

    .. note::
        On a projector refresh the momentum is not reset: it is carried into the new
        subspace, :math:`M \leftarrow M Q_{old} Q_{new}^\top` (n >= m) or
        :math:`M \leftarrow P_{new}^\top P_{old} M` (n < m), i.e. its component inside the
        new subspace is kept and the rest dropped, at the refresh step itself. The public
        reference zeroes it one step after the refresh (a side effect of rebinding the
        state entry while the old tensor is still being updated); keeping the projected
        momentum means the global bias correction :math:`1 - \beta_1^t` stays valid.
    .. note::
        The reference applies the bias correction :math:`1/(1 - \beta_1^t)` to the whole
        numerator, the unaccumulated orthogonal part included, and weight decay after the
        update; here it applies to the momentum only (so step 1 moves along :math:`G`
        exactly as Adam's first step does) and decay comes first, as in AdamW.
    .. note::
        The update is computed chunk by chunk (``chunk_size`` elements, or whole rows or
        columns of subsets), each op of a chunk running while the chunk is in cache; the
        math is the same as the per-tensor formulas above, element for element.
        The compiled kernels do the same ops in the same order, with a row's ops fused
        into one sweep over it (after a pass of column sums for column subsets): 5 reads
        and writes of 4 or 8 bytes per element for row subsets, 6 for columns. Only the
        summation order of the subset sums differs from the eager path.
    """

    NAME = "AdamSN"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, subset_size="auto",
                 subset_norm: bool = True, rank: int | None = None, gap: int = 200,
                 maximize: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        subset_size=subset_size, subset_norm=subset_norm, rank=rank, gap=gap,
                        maximize=maximize)
        super().__init__(params, defaults, chunk_size, backend)

    @staticmethod
    def check_hparams(group: dict) -> None:
        _check_hparams(group)

    def check_sharding(self, p: torch.Tensor, group: dict, shards: Shards) -> None:
        layout = subset_layout(p.shape, group["subset_size"], group["subset_norm"])
        if layout is not None and not layout[2] and layout[0] % p.shape[0]:
            row = p.numel() // p.shape[0]
            raise ValueError(
                f"subset_size={group['subset_size']} cuts a parameter of shape {tuple(p.shape)} "
                f"into subsets of {layout[1]} elements, which cross its rows, and so the "
                f"shards of its dim 0; sharded, a subset must lie within a row: use "
                f"subset_size='auto' or a size whose subsets divide the {row} elements of a "
                f"row (a divisor of {row}, or one whose largest divisor of {p.numel()} is one)")

    def init_state(self, p: torch.Tensor, group: dict, state: dict, new: StateFactory) -> None:
        layout = subset_layout(p.shape, group["subset_size"], group["subset_norm"])
        if group["rank"] is not None and p.dim() >= 2 and p.numel() > 0:
            n = p.size(0)
            m = p.numel() // n
            r = min(group["rank"], n, m)
            if _projector_side(n, m) == "right":
                state["exp_avg"] = new.rows((n, r), p.dtype)
                state["projector"] = new.whole((r, m), p.dtype)
            else:
                state["exp_avg"] = new.whole((r, m), p.dtype)
                state["projector"] = new.rows((n, r), p.dtype)
        else:
            state["exp_avg"] = new.rows(p.shape, p.dtype)
        if layout is None:
            state["exp_avg_sq"] = new.rows(p.shape, p.dtype)
        elif layout[2]:
            state["exp_avg_sq"] = new.whole(_second_moment_shape(p.shape, layout), p.dtype)
        elif new.shards is None:
            state["exp_avg_sq"] = new.rows(_second_moment_shape(p.shape, layout), p.dtype)
        else:  # (n, subsets per row): the same values, split like the param's rows
            state["exp_avg_sq"] = new.rows((p.shape[0], layout[0] // p.shape[0]), p.dtype)

    def update(self, work, grad, state: dict, group: dict, t: float, scratch: Scratch,
               shards: Shards | None) -> None:
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**t
        shape = work.shape if shards is None else (shards.rows, *work.shape[1:])
        layout = _local_layout(_layout_of_state(shape, state["exp_avg_sq"].shape), work.numel())
        state = {key: local(value) for key, value in state.items()}
        compiled = self.compiled_kernels(work, grad)
        if (compiled is not None and "projector" not in state
                and (layout is None or group["subset_size"] == "auto")
                and (shards is None or layout is None or not layout[2])
                and all(state[k].dtype == work.dtype and state[k].is_contiguous()
                        for k in ("exp_avg", "exp_avg_sq"))):
            # one fused sweep per row (or a column-sum pass and a sweep), same math
            compiled.adamsn_step(
                work, grad, state["exp_avg"], state["exp_avg_sq"], layout is not None and layout[2],
                1 - beta1, beta2,
                group["lr"] / bias_correction1, math.sqrt(1 - beta2**t), group["eps"],
                1 - group["lr"] * group["weight_decay"])
            increment_version([work, state["exp_avg"], state["exp_avg_sq"]])  # written by pointer
            return
        if "projector" in state:
            numerator = _subspace_numerator(state, grad, t, beta1, bias_correction1,
                                            group["gap"], shards)
            momentum_weight, step_size = None, group["lr"]
        else:
            numerator = state["exp_avg"]
            momentum_weight, step_size = 1 - beta1, group["lr"] / bias_correction1
        _adamsn_update(
            work, grad, numerator, state["exp_avg_sq"], layout, scratch, shards,
            momentum_weight=momentum_weight, beta2=beta2, step_size=step_size,
            bias_correction2_sqrt=math.sqrt(1 - beta2**t), eps=group["eps"],
            decay=1 - group["lr"] * group["weight_decay"],
        )


def _check_hparams(group: dict) -> None:
    check_lr(group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
    for i, beta in enumerate(betas):
        check_beta(beta, i)
    check_nonnegative(group["eps"], "epsilon")
    check_nonnegative(group["weight_decay"], "weight_decay")
    size = group["subset_size"]
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"Invalid subset_size value: {size!r} (must be 'auto' or a positive integer)")
    check_bool(group["subset_norm"], "subset_norm")
    check_bool(group["maximize"], "maximize")
    check_positive_int(group["rank"], "rank", allow_none=True)
    check_positive_int(group["gap"], "gap")


def _subspace_numerator(state: dict, grad: torch.Tensor, t: float, beta1: float,
                        bias_correction1: float, gap: int, shards: Shards | None) -> torch.Tensor:
    """Update the low-rank momentum and return the full-size numerator N (fresh tensor).

    Sharded, the projector comes from the whole gradient, and the products that contract
    over dim 0 (with the (n, r) projector of an n < m weight) are summed over the ranks.
    """
    exp_avg, projector = state["exp_avg"], state["projector"]
    m = math.prod(grad.shape[1:])
    n = grad.size(0) if shards is None else shards.rows
    g = grad.view(grad.size(0), m)  # (local rows, m)
    right = _projector_side(n, m) == "right"
    if (int(t) - 1) % gap == 0:
        whole = g if shards is None else shards.gather(g, (n, m))
        svd_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        u, _, vh = torch.linalg.svd(whole.to(svd_dtype), full_matrices=False)
        r = exp_avg.size(1) if right else exp_avg.size(0)
        new = (vh[:r] if right else u[:, :r]).to(g.dtype)  # (r, m) or (n, r)
        if shards is not None:
            new = shards.same_everywhere(new.contiguous())
            if not right:
                new = new[shards.offset:shards.offset + shards.local_rows]
        if t > 1:  # carry the momentum into the new subspace (see the class Note)
            if right:
                exp_avg.copy_(exp_avg @ (projector @ new.T))  # (n, r) @ (r, r)
            else:
                overlap = new.T @ projector  # (r, r)
                exp_avg.copy_(_summed(overlap, shards) @ exp_avg)  # (r, r) @ (r, m)
        projector.copy_(new)
    if right:
        low_rank = g @ projector.T  # (n, r)
    else:
        low_rank = _summed(projector.T @ g, shards)  # (r, m)
    exp_avg.lerp_(low_rank, 1 - beta1)
    # N = G + lift(M / bc1 - R): one lift for both the momentum and the orthogonal part
    low_rank.neg_().add_(exp_avg, alpha=1 / bias_correction1)
    if right:
        return torch.addmm(g, low_rank, projector).view_as(grad)
    return torch.addmm(g, projector, low_rank).view_as(grad)


def _summed(partial: torch.Tensor, shards: Shards | None) -> torch.Tensor:
    """A sum over dim 0 computed from this rank's rows, completed over the ranks."""
    return partial if shards is None else shards.sum(partial)


def _adamsn_update(param, grad, numerator, exp_avg_sq, layout, scratch: Scratch,
                   shards: Shards | None, *, momentum_weight, beta2, step_size,
                   bias_correction2_sqrt, eps, decay) -> None:
    """One AdamSN step on contiguous ``param`` and ``grad``, chunk by chunk.

    ``numerator`` is the first moment, updated here by ``lerp_(grad, momentum_weight)``,
    or, when ``momentum_weight`` is None, a ready numerator used as it is. Column subsets
    of a sharded param sum their squares over all ranks' rows first.
    """
    if layout is None:
        _per_element_update(param.view(-1), grad.view(-1), numerator.view(-1),
                            exp_avg_sq.view(-1), scratch, momentum_weight=momentum_weight,
                            beta2=beta2, step_size=step_size,
                            bias_correction2_sqrt=bias_correction2_sqrt, eps=eps, decay=decay)
        return
    n, m, along_columns = layout
    w, g, mom = param.view(n, m), grad.view(n, m), numerator.view(n, m)
    exp_avg_sq = exp_avg_sq.view(1, m) if along_columns else exp_avg_sq.view(n, 1)
    column_sums = None
    if along_columns:
        ones = g.new_ones(n)  # sums columns as a matrix-vector product
        ranges = list(chunks(m, scratch.chunk_size // max(n, 1)))
        if shards is not None:
            column_sums = shards.sum(torch.cat([
                ones @ torch.mul(g[:, start:stop], g[:, start:stop],
                                 out=scratch.get(n * (stop - start), g).view(n, stop - start))
                for start, stop in ranges]))
    else:
        ranges = chunks(n, scratch.chunk_size // m)
    for start, stop in ranges:
        if along_columns:  # a block of whole columns: strided, each row piece contiguous
            w_c, g_c, mom_c = w[:, start:stop], g[:, start:stop], mom[:, start:stop]
            v_c = exp_avg_sq[:, start:stop]  # (1, cols)
            squares = scratch.get(n * (stop - start), g).view(n, stop - start)
        else:
            w_c, g_c, mom_c = w[start:stop], g[start:stop], mom[start:stop]
            v_c = exp_avg_sq[start:stop]  # (rows, 1)
        if decay != 1:
            w_c.mul_(decay)
        if momentum_weight is not None:
            mom_c.lerp_(g_c, momentum_weight)
        if column_sums is not None:
            subset_sums = column_sums[start:stop]
        elif along_columns:
            # a sum over dim 0 is very slow on CPU; a matrix-vector product is not
            subset_sums = ones @ torch.mul(g_c, g_c, out=squares)
        else:  # one read of the chunk, no squares written out
            subset_sums = torch.linalg.vector_norm(g_c, dim=1).square_()
        v_c.mul_(beta2).add_(subset_sums.view_as(v_c), alpha=1 - beta2)
        denom = v_c.sqrt().div_(bias_correction2_sqrt).add_(eps)
        w_c.addcdiv_(mom_c, denom, value=-step_size)


def _per_element_update(w, g, mom, v, scratch: Scratch, *, momentum_weight, beta2,
                        step_size, bias_correction2_sqrt, eps, decay) -> None:
    """AdamW's single-tensor update, op for op, on flat tensors in chunks."""
    for start, stop in chunks(w.numel(), scratch.chunk_size):
        w_c, g_c, mom_c, v_c = w[start:stop], g[start:stop], mom[start:stop], v[start:stop]
        if decay != 1:
            w_c.mul_(decay)
        if momentum_weight is not None:
            mom_c.lerp_(g_c, momentum_weight)
        v_c.mul_(beta2).addcmul_(g_c, g_c, value=1 - beta2)
        denom = torch.sqrt(v_c, out=scratch.get(stop - start, v_c))
        denom.div_(bias_correction2_sqrt).add_(eps)
        w_c.addcdiv_(mom_c, denom, value=-step_size)
