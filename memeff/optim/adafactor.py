"""Adafactor: factored second moment, relative step, update clipping (Shazeer and Stern, 2018)."""

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
    chunks,
)
from memeff.optim.sharding import Shards, StateFactory, local

__all__ = ["Adafactor", "statistics_dtype"]


def statistics_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Second-moment statistics are float32 at least (float64 for float64 params)."""
    return torch.promote_types(param_dtype, torch.float32)


class Adafactor(ChunkedOptimizer):
    r"""Adafactor, as in the paper, with torch.optim.Adafactor's conventions where they agree.

    `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_ (Shazeer and Stern), Algorithms 4 and 5.

    For a parameter :math:`X` with gradient :math:`G` at step :math:`t`; a tensor of 2 or
    more dims is factored over its last two dims (each (n, m) matrix separately):

    .. math::
        \begin{aligned}
            &\hat\beta_{2t} \leftarrow 1 - t^{\tau}, \quad
                \rho_t \leftarrow \min(\gamma, 1/\sqrt{t}), \quad
                \alpha_t \leftarrow \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\,\rho_t \\
            &X \leftarrow X (1 - \gamma\lambda)                                   && \text{decoupled decay} \\
            &\textbf{if factored:} \\
            &\quad R \leftarrow \hat\beta_{2t} R + (1 - \hat\beta_{2t})\,
                \mathrm{mean}_j(G^2 + \epsilon_1)                                && \text{(n, 1)} \\
            &\quad C \leftarrow \hat\beta_{2t} C + (1 - \hat\beta_{2t})\,
                \mathrm{mean}_i(G^2 + \epsilon_1)                                && \text{(1, m)} \\
            &\quad \hat V \leftarrow R\,C / \mathrm{mean}_i(R) \\
            &\textbf{else:} \\
            &\quad \hat V \leftarrow \hat\beta_{2t} \hat V + (1 - \hat\beta_{2t}) (G^2 + \epsilon_1) \\
            &U \leftarrow G / \sqrt{\hat V}, \quad
                \hat U \leftarrow U / \max(1, \mathrm{RMS}(U) / d) \\
            &\textbf{if } \beta_1: \ M \leftarrow \beta_1 M + (1 - \beta_1) \hat U, \
                X \leftarrow X - \alpha_t M \quad
            \textbf{else: } X \leftarrow X - \alpha_t \hat U
        \end{aligned}

    Means instead of the paper's sums give the same :math:`\hat V` and keep the
    statistics at the scale of :math:`G^2` (as torch does). RMS is over the whole tensor.

    Args:
        params (iterable): parameters or dicts defining parameter groups. Any argument
            below except ``chunk_size`` may be set per group.
        lr (float, optional): :math:`\gamma`, the cap on the relative step size
            :math:`\rho_t` (the paper's 0.01), and the scale of weight decay (default: 1e-2)
        beta2_decay (float, optional): :math:`\tau` <= 0 in :math:`\hat\beta_{2t} = 1 - t^\tau`
            (default: -0.8)
        eps (Tuple[float, float], optional): :math:`(\epsilon_1, \epsilon_2)`: the first is
            added to :math:`G^2` (whatever the param dtype), the second floors the
            parameter scale (default: (1e-30, 1e-3))
        d (float, optional): update clipping threshold, >= 1 (default: 1.0)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0)
        beta1 (float, optional): first-moment decay :math:`\beta_1` in [0, 1), or None for
            no first moment (default: None)
        factored (bool, optional): False keeps a per-element second moment for every
            tensor of the group (default: True)
        relative_step (bool, optional): False uses :math:`\rho_t = \gamma` (default: True)
        scale_parameter (bool, optional): False uses :math:`\alpha_t = \rho_t` (default: True)
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        chunk_size (int, optional): elements per chunk of the eager loop (default: 2**20)
        backend (str, optional): ``"auto"`` steps float32 and float64 CPU parameters
            with compiled C++ kernels, built at first use (see
            :mod:`memeff.optim.kernels`), and other parameters with PyTorch ops; if the
            kernels cannot be built it warns once and uses PyTorch ops throughout.
            ``"eager"``: PyTorch ops only. ``"compiled"``: as ``"auto"``, but raises
            RuntimeError if the kernels cannot be built (default: "auto")

    State per parameter: ``step`` (float32 scalar); for a factored tensor of shape
    (..., n, m) with elements, ``row_var`` (..., n, 1) and ``col_var`` (..., 1, m); otherwise
    ``variance`` of the param's shape; with ``beta1``, ``exp_avg`` of the param's shape and
    dtype. Statistics are float32 (float64 for float64 params), also for bfloat16 and
    float16 params. An (n, m) float32 weight without ``beta1`` holds n + m numbers
    against AdamW's 2*n*m.

    What a step allocates: one scratch buffer of ``chunk_size`` elements per dtype and
    device, reused by every chunk of every parameter, and vectors of n or m values per
    matrix. Non-contiguous parameters are updated in a contiguous copy. The compiled
    kernels allocate only vectors: for a factored tensor m column scales, two m-vectors of
    column sums per thread, and one value per matrix.

    .. note::
        :math:`\epsilon_1` is added to :math:`G^2` inside the statistics, as the paper
        writes it. torch.optim.Adafactor instead clamps :math:`\mathrm{mean}(R)` at
        :math:`\epsilon_1` and :math:`\hat V` at :math:`\epsilon_1^2`, with
        :math:`\epsilon_1` defaulting to the param dtype's machine epsilon (7.8e-3 in
        bfloat16, which shrinks updates of gradients below that size). With gradients
        well above :math:`\epsilon_1` the two agree, and the updates then match torch's
        in float32. Here :math:`\epsilon_1` never depends on the dtype.
    .. note::
        As in torch, :math:`\gamma` replaces the paper's constant 0.01 as the cap on
        :math:`\rho_t` and scales the decoupled weight decay (which the paper does not
        specify). The statistics are float32 for low-precision params (the paper and
        torch keep them in the param dtype).
    .. note::
        The step reads the gradient twice, not three times: the row statistics of a chunk
        of rows are final once the chunk is seen, so :math:`\sum_{ij} G_{ij}^2 / (R_i C_j)`
        (hence RMS(U)) comes from column sums weighted by :math:`1/R_i`, gathered in the
        same pass as the column statistics. Column sums are matrix products, because a
        reduction over dim -2 is very slow on CPU. The compiled kernels do the same ops
        in the same order in two passes: pass 1 reads G for the statistics and, with
        ``scale_parameter``, X for RMS(X); pass 2 reads G and X and writes X (and, with
        ``beta1``, reads and writes M). That is 5 reads and writes per element (G, X; G,
        X, X), 7 with ``beta1``, one fewer without ``scale_parameter``. Only the summation
        order of the statistics and of :math:`\sum X^2` differs from the eager path. On
        both paths RMS(X) comes from the parameter as it is when the step begins, so a
        write to it between steps (through ``p.data`` too) enters the next update alike.
    """

    NAME = "Adafactor"

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float, float] = (1e-30, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, beta1: float | None = None,
                 factored: bool = True, relative_step: bool = True, scale_parameter: bool = True,
                 maximize: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto"):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        beta1=beta1, factored=factored, relative_step=relative_step,
                        scale_parameter=scale_parameter, maximize=maximize)
        super().__init__(params, defaults, chunk_size, backend)

    @staticmethod
    def check_hparams(group: dict) -> None:
        _check_hparams(group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the statistics keep their float32 dtype for low-precision params.

        (torch casts every floating-point state tensor to its param's dtype on load.)
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(ids, params):
            for key in ("row_var", "col_var", "variance"):
                if key in saved.get(index, {}):
                    self.state[p][key] = saved[index][key].to(
                        device=p.device, dtype=statistics_dtype(p.dtype), copy=True)

    def init_state(self, p: torch.Tensor, group: dict, state: dict, new: StateFactory) -> None:
        stat = statistics_dtype(p.dtype)
        if group["factored"] and p.dim() >= 2 and p.numel() > 0:
            state["row_var"] = new.rows((*p.shape[:-1], 1), stat)
            col_shape = (*p.shape[:-2], 1, p.shape[-1])
            # a matrix's column statistic spans dim 0; a batch of matrices is split by matrix
            state["col_var"] = new.whole(col_shape, stat) if p.dim() == 2 else new.rows(col_shape, stat)
        else:
            state["variance"] = new.rows(p.shape, stat)
        if group["beta1"] is not None:
            state["exp_avg"] = new.rows(p.shape, p.dtype)

    def update(self, work, grad, state: dict, group: dict, t: float, scratch: Scratch,
               shards: Shards | None) -> None:
        eps1, eps2 = group["eps"]
        rho = min(group["lr"], 1 / math.sqrt(t)) if group["relative_step"] else group["lr"]
        numel = work.numel() if shards is None else math.prod(work.shape[1:]) * shards.rows
        step = _Step(beta2_weight=t ** group["beta2_decay"], eps1=eps1, d=group["d"],
                     alpha=rho, decay=1 - group["lr"] * group["weight_decay"],
                     beta1=group["beta1"], numel=numel,
                     eps2=eps2 if group["scale_parameter"] else None)
        state = {key: local(value) for key, value in state.items()}
        # a matrix split by rows needs its column statistics summed between the passes,
        # which the kernels do not stop for
        split_matrix = shards is not None and "row_var" in state and work.dim() == 2
        compiled = None if split_matrix else self.compiled_kernels(work, grad)
        if compiled is not None and all(
                value.dtype == work.dtype and value.is_contiguous()
                for key, value in state.items() if key != "step"):
            _compiled_update(compiled, work, grad, state, step, shards)
            return
        sum_param_squared = (torch.linalg.vector_norm(work, dtype=statistics_dtype(work.dtype))
                             .square() if group["scale_parameter"] else work.new_zeros(()))
        if "row_var" in state:
            _factored_update(work, grad, state, step, scratch, sum_param_squared,
                             shards if split_matrix else None, shards)
        else:
            _unfactored_update(work, grad, state, step, scratch, sum_param_squared, shards)


class _Step:
    """The scalars of one parameter's step; ``alpha`` and the clipping scale are final once
    the step's sums are in (:meth:`finish`)."""

    def __init__(self, *, beta2_weight, eps1, d, alpha, decay, beta1, numel, eps2):
        self.beta2_weight = beta2_weight  # 1 - beta2_t, the weight of the new statistics
        self.eps1, self.d, self.alpha, self.decay, self.beta1 = eps1, d, alpha, decay, beta1
        self.numel = numel  # of the whole parameter
        self.eps2 = eps2  # None: alpha is not scaled by RMS(X)

    def finish(self, sum_u_squared: float, sum_param_squared: float) -> float:
        """Scale ``alpha`` by max(eps2, RMS(X)) and return 1 / max(1, RMS(U) / d), from the
        sums of U^2 and X^2 over the whole parameter."""
        numel = max(self.numel, 1)
        if self.eps2 is not None:
            self.alpha *= max(self.eps2, math.sqrt(sum_param_squared / numel))
        rms = math.sqrt(sum_u_squared / numel)
        return 1.0 / max(1.0, rms / self.d)


def _summed(values: list, shards: Shards | None) -> list[float]:
    """Sums over this rank's part of a parameter, completed over the ranks (one collective)."""
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return (totals if shards is None else shards.sum(totals)).tolist()


def _check_hparams(group: dict) -> None:
    check_lr(group["lr"])
    tau = group["beta2_decay"]
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau <= 0.0):
        raise ValueError(f"Invalid beta2_decay value: {tau} (must be finite and <= 0)")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"Invalid eps: {eps!r} (must be a pair (eps1, eps2))")
    check_nonnegative(eps[0], "epsilon1 (eps[0])")
    check_nonnegative(eps[1], "epsilon2 (eps[1])")
    d = group["d"]
    if not (isinstance(d, (int, float)) and d >= 1.0):
        raise ValueError(f"Invalid clipping threshold d value: {d} (must be >= 1)")
    check_nonnegative(group["weight_decay"], "weight_decay")
    if group["beta1"] is not None:
        check_beta(group["beta1"], 0, name="beta1")
    for flag in ("factored", "relative_step", "scale_parameter", "maximize"):
        check_bool(group[flag], flag)


def _squares(g_c: torch.Tensor, stat: torch.dtype, scratch: Scratch) -> torch.Tensor:
    """G^2 of a chunk in a scratch buffer of the statistics dtype (squared after upcasting)."""
    out = scratch.get(g_c.numel(), g_c, dtype=stat).view(g_c.shape)
    if g_c.dtype == stat:
        return torch.mul(g_c, g_c, out=out)
    return out.copy_(g_c).square_()


def _apply(w_c, u, exp_avg_c, scale_rows, step: _Step, clip: float) -> None:
    """X_c <- X_c * decay - alpha * (clipped U_c, or its running mean), U_c = u * scale_rows.

    ``u`` is a scratch chunk holding the update before its row scale (None: no row scale).
    """
    if step.decay != 1:
        w_c.mul_(step.decay)
    if exp_avg_c is None:
        if scale_rows is None:
            w_c.add_(u, alpha=-step.alpha * clip)
        else:
            w_c.addcmul_(u, scale_rows, value=-step.alpha * clip)
        return
    if scale_rows is not None:
        u.mul_(scale_rows)
    u.mul_(clip)
    exp_avg_c.lerp_(u if u.dtype == exp_avg_c.dtype else u.to(exp_avg_c.dtype), 1 - step.beta1)
    w_c.add_(exp_avg_c, alpha=-step.alpha)


def _factored_update(work, grad, state, step: _Step, scratch: Scratch, sum_param_squared,
                     split: Shards | None, shards: Shards | None) -> None:
    """The factored step; ``split`` when this rank holds some rows of a single matrix, whose
    column sums, mean(R) and the sum of X^2 are then completed over the ranks in one
    collective; ``shards`` when it holds some matrices of a batch of them."""
    n, m = work.shape[-2:]
    batch = math.prod(work.shape[:-2])
    rows_in_matrix = n if split is None else split.rows
    stat = state["row_var"].dtype
    ws, gs = work.view(batch, n, m), grad.view(batch, n, m)
    rows, cols = state["row_var"].view(batch, n, 1), state["col_var"].view(-1, 1, m)
    exp_avgs = state["exp_avg"].view(batch, n, m) if "exp_avg" in state else None
    rows_per_chunk = scratch.chunk_size // m
    sum_u_squared = 0.0
    row_means = []
    for g, row_var, col_var in zip(gs, rows, cols):
        # pass 1: row statistics per chunk of rows; column sums of G^2 and of G^2 / R_i
        col_sums = torch.zeros(2, m, dtype=stat, device=g.device)
        for start, stop in chunks(n, rows_per_chunk):
            squares = _squares(g[start:stop], stat, scratch)  # (rows, m)
            r_c = row_var[start:stop]
            r_c.lerp_(squares.sum(dim=1, keepdim=True).div_(m).add_(step.eps1), step.beta2_weight)
            weights = torch.ones(2, stop - start, dtype=stat, device=g.device)
            torch.reciprocal(r_c.view(-1), out=weights[1])
            col_sums.addmm_(weights, squares)  # (2, m)
        if split is None:
            row_mean = row_var.mean()
        else:
            totals = split.sum(torch.cat([col_sums.view(-1), row_var.sum().view(1),
                                          sum_param_squared.to(stat).view(1)]))
            col_sums, row_mean = totals[:2 * m].view(2, m), totals[2 * m] / rows_in_matrix
            sum_param_squared = totals[2 * m + 1]
        col_var.lerp_(col_sums[0].div(rows_in_matrix).add_(step.eps1), step.beta2_weight)
        # sum_ij G^2 / V_ij = mean(R) * sum_j (sum_i G_ij^2 / R_i) / C_j
        sum_u_squared += (row_mean * (col_sums[1] / col_var.view(-1)).sum()).item()
        row_means.append(row_mean)
    if split is None:
        sum_u_squared, sum_param_squared = _summed([sum_u_squared, sum_param_squared], shards)
    clip = step.finish(sum_u_squared, float(sum_param_squared))
    for b, (w, g, row_var, col_var) in enumerate(zip(ws, gs, rows, cols)):
        # pass 2: X <- X * decay - alpha * clip * G * sqrt(mean(R) / R_i) / sqrt(C_j)
        scale_cols = col_var.rsqrt()  # (1, m)
        for start, stop in chunks(n, rows_per_chunk):
            scale_rows = row_var[start:stop].reciprocal().mul_(row_means[b]).sqrt_()  # (rows, 1)
            exp_avg_c = None if exp_avgs is None else exp_avgs[b][start:stop]
            g_c = g[start:stop]
            u = scratch.get(g_c.numel(), g_c, dtype=stat).view(g_c.shape)
            torch.mul(g_c, scale_cols, out=u)
            _apply(w[start:stop], u, exp_avg_c, scale_rows, step, clip)


def _compiled_update(compiled, work, grad, state, step: _Step, shards: Shards | None) -> None:
    """``_factored_update`` or ``_unfactored_update``, and the parameter scale, in the
    compiled kernels' two passes (each matrix whole on this rank).

    Pass 1 reads G, and X for RMS(X_{t-1}) with ``scale_parameter``; pass 2 reads G and X
    and writes X.
    """
    scale_parameter = step.eps2 is not None
    exp_avg = state.get("exp_avg")
    momentum = (exp_avg if exp_avg is not None else work, exp_avg is not None,
                0.0 if step.beta1 is None else step.beta1)
    if "row_var" in state:
        n, m = work.shape[-2:]
        row_means = torch.empty(work.numel() // (n * m), dtype=work.dtype)  # mean(R) per matrix
        statistics = (state["row_var"], state["col_var"], row_means)
        sum_u_squared, sum_param_squared = compiled.adafactor_factored_statistics(
            grad, work, *statistics, step.beta2_weight, step.eps1, scale_parameter)
        apply = compiled.adafactor_factored_apply
    else:
        statistics = (state["variance"],)
        sum_u_squared, sum_param_squared = compiled.adafactor_unfactored_statistics(
            grad, work, *statistics, step.beta2_weight, step.eps1, scale_parameter)
        apply = compiled.adafactor_unfactored_apply
    clip = step.finish(*_summed([sum_u_squared, sum_param_squared], shards))
    apply(work, grad, *statistics, *momentum, step.decay, step.alpha, clip)
    # the kernels write through pointers: count their writes as in-place ops would, so
    # that autograd's checks see them
    increment_version([work] + [t for key, t in state.items() if key != "step"])


def _unfactored_update(work, grad, state, step: _Step, scratch: Scratch, sum_param_squared,
                       shards: Shards | None) -> None:
    w, g, variance = work.view(-1), grad.view(-1), state["variance"].view(-1)
    exp_avg = state["exp_avg"].view(-1) if "exp_avg" in state else None
    sum_u_squared = torch.zeros((), dtype=variance.dtype, device=variance.device)
    for start, stop in chunks(w.numel(), scratch.chunk_size):
        squares = _squares(g[start:stop], variance.dtype, scratch)
        v_c = variance[start:stop]
        v_c.lerp_(squares, step.beta2_weight).add_(step.beta2_weight * step.eps1)
        sum_u_squared += squares.div_(v_c).sum()  # G^2 / V
    clip = step.finish(*_summed([sum_u_squared, sum_param_squared], shards))
    for start, stop in chunks(w.numel(), scratch.chunk_size):
        u = torch.rsqrt(variance[start:stop], out=scratch.get(stop - start, variance))
        u.mul_(g[start:stop])
        exp_avg_c = None if exp_avg is None else exp_avg[start:stop]
        _apply(w[start:stop], u, exp_avg_c, None, step, clip)
