"""Allocation: from the weights alone, per-layer sparsity, masks and quantizer steps.

The OPQ rule (one global Lagrange multiplier for the joint pruning + quantization error):
pruning a weight ``w`` of channel ``(i, c)`` changes the total squared error by
``w^2 - q_ic``, where ``q_ic = c_{B_i} s_ic^2`` is the predicted quantization error of that
weight if it were kept. Minimizing the total error under a global sparsity target therefore
prunes exactly the weights with the smallest *score* ``w^2 - q_ic``:

.. math::

    \\text{prune } w \\iff w^2 < \\lambda + q_{ic}, \\qquad
    \\theta_{ic} = \\sqrt{\\max(0, \\lambda + q_{ic})}.

The rule itself is :func:`opq_core._plan.opq_scores`; the solvers are here (sparsity
mode) and in :mod:`opq_core._budget` (size-budget mode). See :func:`plan`.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from . import error_model as em
from .stats import check_weight, layer_stats
from ._plan import LayerPlan, Plan, channel_thresholds, rate_budget_bits, score_layer  # noqa: F401
from ._solver import (_Context, _LazyList, _Reread, _build_layers, _channel_table, _dead, _is_lazy,
                      _layer_constants, _mean_threshold, _predicted_sparsity_lam,
                      _pruned_per_channel, _round_scales, _select_layers)
from ._budget import _solve_budget
from .select import recount, select_global
from ._importance import check_importance

__all__ = ["LayerPlan", "Plan", "plan", "METHODS", "CHANNELWISE", "ERROR_MODELS", "GRID_CHOICES"]

METHODS = ("opq", "global", "uniform")
#: ``plan(grid=)``: the uniform grids, a shared codebook per layer, or the better per layer.
GRID_CHOICES = ("offset", "symmetric", "codebook", "auto")
CHANNELWISE = ("unified", "layer")
ERROR_MODELS = ("fitted", "laplace", "empirical")

#: Default floor of kept weights: every layer keeps at least ``ceil(MIN_DENSITY * n_i)``
#: weights (its largest scores), in both modes; ``min_density=`` changes it.
MIN_DENSITY = 0.002

#: Layers pruned beyond this fraction are named in a warning and in ``Plan.message``.
WARN_SPARSITY = 0.99

# ---------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------

_UNSET = object()


def plan(weights: Mapping, *, sparsity: float | None = None, bits=_UNSET,
         rate: float | None = None, budget_bits: float | None = None,
         method: str = "opq", channelwise: str = "unified", grid: str = "offset",
         error_model: str = "fitted", exclude: Sequence[str] | None = None,
         min_density: float = MIN_DENSITY, importance: Mapping | None = None,
         size_bytes: int | None = None, layout: str | None = None,
         other: Mapping | None = None, metadata: Mapping | None = None) -> Plan:
    """Plan pruning + quantization of every compressible layer from the weights alone.

    Parameters
    ----------
    weights : mapping name -> array
        Every float tensor with ``ndim >= 2`` is compressed (conv, linear, embeddings);
        other tensors (biases, norms, integer or bool tensors of any shape, excluded names)
        are listed in ``Plan.skipped`` and left alone.
    sparsity : float in [0, 1)
        Global fraction of the compressed weights to prune (sparsity mode).
    bits : int in 1..8, a sequence of candidates, or None
        Bits per kept weight. In sparsity mode an int (default 4). In budget mode
        (``rate``/``budget_bits``) the default (also ``bits=None``, as in
        :func:`opq_torch.compress`) is every width 1..8, chosen per layer; an int fixes it.
    rate : float > 1
        Target ``paper_rate = 32 N / sum_i bits_i nnz_i``; same as
        ``budget_bits = 32 N / rate``.
    method : "opq" | "global" | "uniform"
        "opq": prune the smallest scores ``w^2 - q_ic`` over the whole network (one global
        multiplier). "global": one magnitude threshold (``q := 0``). "uniform": the same
        sparsity in every layer, magnitude within the layer. All share the quantizer.
    channelwise : "unified" | "layer"
        Per-channel scales ``s_c = mean|w_c|`` (one normalized codebook per layer), or one
        scale per layer.
    grid : "offset" | "symmetric" | "codebook" | "auto"
        The quantizer of the kept weights: a uniform grid with a fitted step (default
        "offset"), or "codebook": every layer gets a shared codebook of ``2^B`` non-zero
        levels in units of its channel scales (Lloyd-Max on its kept normalized weights,
        :mod:`opq_core._codebook_grid`; the masks are the "offset" plan's), or "auto": per
        layer the codebook when its measured error, with its float32 levels counted as
        bits, is lower than the offset grid's, else the offset grid. ``LayerPlan.grid``
        says which; in budget mode the codebooks' bits are counted in the budget.
    error_model : "fitted" | "laplace" | "empirical"
        "fitted" (default): each layer's step ``D`` and kept-weight error ``q`` are fitted
        to its own weights on the histogram of ``|w| / s_c`` gathered in the statistics
        pass (:mod:`opq_core._fit`; no extra read of the weights): the step minimizing the
        measured error of the kept weights at the layer's thresholds. The thresholds come
        from the Laplace-predicted multiplier, the steps and errors are fitted there (twice),
        the masks are selected once, and the steps and errors are fitted again at the
        realized thresholds (the masks stay). "laplace": the closed-form constants
        ``c_B, D*_B`` of :mod:`opq_core.error_model`. "empirical": the same fit on the
        weights themselves (slow; reads every layer again).
    exclude : names of tensors not to compress.
    min_density : float in [0, 1)
        Floor of kept weights: every layer with a non-zero weight keeps at least
        ``ceil(min_density * n_i)`` of them (default ``MIN_DENSITY`` = 0.2 %), in both
        modes, so that no layer silently collapses. Layers pruned beyond 99 % are named in
        a ``UserWarning`` and in ``Plan.message``. In sparsity mode the floor can make the
        plan prune fewer weights than asked (status 1, said in the message).
    importance : mapping layer name -> (out, in), optional
        The diagonal of each layer's output-error metric: ``out`` one weight ``g_c > 0``
        per output channel, ``in`` one weight ``h_j > 0`` per input channel (``shape[1]``;
        a convolution's applies to all its kernel positions); either may be ``None``, a dict
        ``{"out": ..., "in": ...}`` works too, layers not named weigh 1. The cost of
        pruning ``w_cj`` becomes ``g_c h_j (w_cj^2 - q_c)`` for the threshold rule, the
        measured steps (``error_model="empirical"``) and the size-budget solver, still with
        one global multiplier (see :mod:`opq_core._importance`). All ones gives exactly the
        unweighted plan. Not used by ``method="uniform"``.
    size_bytes : int, optional
        A budget in bytes of the written ``.opq`` file, side information included (header,
        per-layer scales, steps and thresholds, codebooks, symbol models, the coded mask,
        the tensors kept float, the entropy coder's word rounding): the plan is the largest
        found whose file fits, within 0.4 % below the budget when the search converges
        (:mod:`opq_core._size`: the budget-in-bits solver under a search on its budget,
        every trial plan's file size measured exactly by encoding it in memory). It is
        never exceeded: ``Plan.predicted_bytes`` is the exact size of the file that
        :func:`opq_core.write_opq` writes for the plan with the same ``other``, ``layout``
        and ``metadata``; ``Plan.budget_bytes`` the budget. Bits as in budget mode. A budget
        below the smallest file raises ``ValueError`` naming that size.
    layout, other, metadata
        With ``size_bytes`` only: the file the budget counts, as :func:`opq_core.write_opq`
        takes them (default ``"entropy"``, every tensor of ``weights`` not compressed, no
        metadata: what ``opq compress`` stores, bar its source metadata).

    Returns
    -------
    Plan

    Notes
    -----
    The OPQ rule prunes the weights of smallest score; the realized masks prune exactly
    ``round(sparsity * N)`` weights (ties broken by position: among equal scores the later
    ones are pruned first), and ``lam`` is the largest pruned score:

    .. math:: \\text{keep } w \\iff w^2 - c_{B} s_{c}^2 > \\lambda \\;(\\text{or a kept tie})

    With ``importance`` the score is :math:`g_c h_j (w_{cj}^2 - c_B s_c^2)`.

    The analytic sparsity of layer ``i`` under the Laplace model is
    ``p_i = sum_c n_ic (1 - exp(-theta_ic / s_ic)) / n_i`` with the multiplier solved by
    root finding on ``sum_i n_i p_i = p N``. Channels whose weights are all zero are
    pruned whole (they cost nothing and have no scale).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> w = {"fc1": rng.laplace(size=(64, 32)), "fc2": 0.1 * rng.laplace(size=(10, 64))}
    >>> p = plan(w, sparsity=0.8, bits=4)
    >>> p.kept == round(0.2 * (64 * 32 + 10 * 64))
    True
    """
    if size_bytes is not None:
        for arg, v in (("sparsity", sparsity), ("rate", rate), ("budget_bits", budget_bits)):
            if v is not None:
                raise ValueError(f"give size_bytes= or {arg}=, not both")
        from ._size import plan_for_size
        kw = dict(method=method, channelwise=channelwise, grid=grid, error_model=error_model,
                  exclude=exclude, min_density=min_density, importance=importance)
        if bits is not _UNSET:
            kw["bits"] = bits
        return plan_for_size(weights, size_bytes, planner=plan,
                             layout="entropy" if layout is None else layout,
                             other=other, metadata=metadata, **kw)
    for arg, v in (("layout", layout), ("other", other), ("metadata", metadata)):
        if v is not None:
            raise ValueError(f"{arg}= describes the file of a budget in bytes; give size_bytes=")
    t0 = time.perf_counter()
    sparsity, bits_set, budget = _check_args(weights, sparsity, bits, rate, budget_bits,
                                             method, channelwise, grid, error_model)
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float, np.floating,
                                                                      np.integer)):
        raise TypeError(f"min_density must be a number in [0, 1), got {min_density!r}")
    if not 0.0 <= float(min_density) < 1.0:
        raise ValueError(f"min_density must be in [0, 1), got {min_density!r}")
    names, skipped = _select_layers(weights, exclude)
    # A lazy source (a file opened with opq_core.open_weights) is read again tensor by
    # tensor on every pass instead of being held: peak memory is bounded by the largest
    # tensor, not the model (both modes; the budget mode adds a bounded per-layer sample).
    lazy = _is_lazy(weights)
    arrays = _Reread(weights) if lazy else {}
    stats = []
    dtypes = []
    for name in names:
        arr = check_weight(name, weights[name])
        if not lazy:
            arrays[name] = arr
        dtypes.append(str(np.dtype(arr.dtype)))
        stats.append(layer_stats(name, arr, histogram=(error_model == "fitted"
                                                       and channelwise == "unified")))
        del arr
    t1 = time.perf_counter()
    scales = [_round_scales(st.channel_scale if channelwise == "unified"
                            else np.full(st.channels, st.scale)) for st in stats]
    # "codebook"/"auto" solve the offset plan, then give layers their codebooks
    base_grid = "offset" if grid in ("codebook", "auto") else grid
    ctx = _Context(names, arrays, stats, scales, base_grid, error_model, method, dtypes)
    ctx.floors = _floors(ctx, float(min_density))
    ctx.importance = check_importance(importance, names, [st.shape for st in stats])
    if ctx.importance and method == "uniform":
        raise ValueError("importance: method='uniform' (the same sparsity in every layer) "
                         "does not use it; use method='opq' or 'global'")
    if budget is None:
        layers, lam, status, message = _solve_sparsity(ctx, sparsity, bits_set[0])
        min_budget = None
        if base_grid != grid:
            from ._codebook_grid import choose_grids
            layers = choose_grids(layers, ctx.arrays, grid)
    elif base_grid != grid:
        from ._codebook_grid import solve_budget_with_codebooks
        S = budget[1] if budget[0] == "bits" else rate_budget_bits(int(ctx.sizes.sum()), budget[1])
        layers, lam, status, message, min_budget = solve_budget_with_codebooks(
            _solve_budget, ctx, S, bits_set, grid)
    else:
        layers, lam, status, message, min_budget = _solve_budget(ctx, budget, bits_set)
    message = _warn_collapse(layers, ctx, message)
    t2 = time.perf_counter()
    if budget is not None:
        budget = budget[1] if budget[0] == "bits" else rate_budget_bits(int(ctx.sizes.sum()), budget[1])
    return Plan(layers=tuple(layers), method=method, channelwise=channelwise, grid=grid,
                error_model=error_model, target_sparsity=sparsity,
                budget_bits=None if budget is None else float(budget), lam=float(lam),
                skipped=tuple(skipped), success=status < 2, status=status, message=message,
                min_budget_bits=min_budget, stats_seconds=t1 - t0,
                solve_seconds=t2 - t1 - ctx.select_seconds, select_seconds=ctx.select_seconds)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _check_args(weights, sparsity, bits, rate, budget_bits, method, channelwise, grid,
                error_model):
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights: the mapping is empty")
    for arg, val, allowed in (("method", method, METHODS), ("channelwise", channelwise, CHANNELWISE),
                              ("grid", grid, GRID_CHOICES), ("error_model", error_model, ERROR_MODELS)):
        if val not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, got {val!r}")
    budget_mode = rate is not None or budget_bits is not None
    if rate is not None and budget_bits is not None:
        raise ValueError("give rate= or budget_bits=, not both")
    if budget_mode and sparsity is not None:
        raise ValueError("give sparsity= (sparsity mode) or rate=/budget_bits= (budget mode), not both")
    if not budget_mode and sparsity is None:
        raise ValueError("give sparsity= (e.g. 0.9) or rate= (e.g. 100) or budget_bits=")
    if budget_mode and method == "uniform":
        raise ValueError("method='uniform' takes sparsity=, not a size budget")
    if bits is None and not budget_mode:
        raise ValueError("bits=None (every layer chooses its width) needs rate= or budget_bits=; "
                         "give bits= (e.g. 4) with sparsity=")
    if bits is _UNSET or bits is None:
        bits_set = tuple(range(1, 9)) if budget_mode else (4,)
    elif isinstance(bits, (list, tuple, range)):
        if not budget_mode:
            raise ValueError(f"bits: a set of candidates {tuple(bits)} needs rate= or budget_bits=")
        bits_set = tuple(bits)
        if not bits_set:
            raise ValueError("bits: empty set of candidates")
    else:
        bits_set = (bits,)
    for b in bits_set:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
            raise ValueError(f"bits must be integers in 1..8, got {b!r}")
    bits_set = tuple(sorted(set(int(b) for b in bits_set)))
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
            raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        sparsity = float(sparsity)
        if not (0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    budget = None
    if rate is not None:
        rate = float(rate)
        if not (rate > 1.0) or not math.isfinite(rate):
            raise ValueError(f"rate must be a finite number > 1 (32-bit floats are rate 1), got {rate!r}")
        budget = ("rate", rate)
    if budget_bits is not None:
        bb = float(budget_bits)
        if not math.isfinite(bb) or bb < 0:
            raise ValueError(f"budget_bits must be a finite number >= 0, got {budget_bits!r}")
        budget = ("bits", bb)
    return sparsity, bits_set, budget


# ---------------------------------------------------------------------------
# the sparsity solvers
# ---------------------------------------------------------------------------

def _analytic_lambda(ctx, qn, target):
    """Root of sum_i n_i p_i(lambda) = target * N (Laplace model)."""
    if target <= 0:
        return -np.inf
    s, fan, q, _ = _channel_table(ctx, qn)
    N = float(ctx.sizes.sum())
    goal = target * N - (N - float(fan.sum()))  # all-zero channels are pruned anyway
    if s.size == 0 or goal <= 0:
        return -np.inf

    def f(lam):
        return _serial_dot(fan, _pruned_per_channel(s, q, lam)) - goal

    lo = -float(np.max(q)) if q.size else 0.0
    if f(lo) >= 0:
        return lo
    hi = max(1e-30, float(np.max(s)) ** 2)
    for _ in range(400):
        if f(hi) >= 0:
            break
        hi *= 2.0
    return optimize.brentq(f, lo, hi, xtol=1e-15 * hi, rtol=4 * np.finfo(float).eps, maxiter=500)

#: Longest vector that OpenBLAS dots on one thread.
_DOT_SERIAL = 10_000


def _serial_dot(a, b) -> float:
    """``np.dot(a, b)`` in pieces that BLAS dots on one thread: a multi-threaded dot of a
    few ten thousand channels costs tens of ms on a loaded machine (waking the BLAS
    threads), and its rounding depends on the thread count. Up to ``_DOT_SERIAL``
    elements this is exactly ``np.dot``."""
    if a.size <= _DOT_SERIAL:
        return float(np.dot(a, b))
    tot = 0.0
    for i in range(0, a.size, _DOT_SERIAL):
        tot += float(np.dot(a[i:i + _DOT_SERIAL], b[i:i + _DOT_SERIAL]))
    return tot


def _solve_sparsity(ctx: _Context, sparsity: float, bits: int):
    L = len(ctx.names)
    qn = np.full(L, em.quantization_constant(bits, ctx.grid, 0.0))
    steps = np.full(L, em.optimal_step(bits, ctx.grid, 0.0))
    use_q = ctx.method == "opq"
    score_q = qn if use_q else np.zeros(L)
    lams = np.full(L, -np.inf)
    n_iter = 1 if (ctx.grid == "offset" and ctx.error_model == "laplace") else 3
    if ctx.error_model == "fitted":
        # fit at the thresholds of the predicted multiplier (twice: the multiplier moves
        # with the fitted errors), select the masks once, refit at the realized thresholds
        for _ in range(2):
            alam = _analytic_lambda(ctx, score_q, sparsity)
            for i in range(L):
                steps[i], qn[i] = _layer_constants(ctx, i, bits, None, alam, score_q[i])
            score_q = qn.copy() if use_q else np.zeros(L)
        n_iter = 1
    realize = _realize_sparsity
    if ctx.importance:
        from ._importance_solver import realize_sparsity as realize
    for it in range(n_iter):
        kept, lams, glam, perr, ps2 = realize(ctx, sparsity, score_q)
        if it == n_iter - 1:
            break
        # refine the per-layer constants at the realized thresholds
        for i in range(L):
            t_mean = _mean_threshold(ctx, i, lams[i], score_q[i])
            steps[i], qn[i] = _layer_constants(ctx, i, bits, t_mean, lams[i], score_q[i])
        score_q = qn if use_q else np.zeros(L)
    if ctx.error_model == "fitted":
        qn = qn.copy()
        for i in range(L):
            steps[i], qn[i] = _layer_constants(ctx, i, bits, None, lams[i], score_q[i])
    if ctx.method == "uniform":
        pred = np.full(L, float(sparsity))
    else:
        alam = _analytic_lambda(ctx, score_q, sparsity)
        pred = _predicted_sparsity_lam(ctx, score_q, alam)
    layers = _build_layers(ctx, [bits] * L, steps, qn, score_q, lams, kept, pred,
                           errors=(perr, ps2))
    total_pruned = int(ctx.sizes.sum() - sum(kept))
    want = round(sparsity * int(ctx.sizes.sum()))
    status, msg = 0, f"pruned {total_pruned} of {int(ctx.sizes.sum())} weights (target {want})"
    if ctx.method == "uniform" and total_pruned != want:
        status = 1
        msg += "; the uniform baseline rounds per layer"
    elif total_pruned < want:
        status = 1
        msg += ("; the floor of kept weights per layer (min_density) keeps "
                f"{want - total_pruned} more")
    elif total_pruned != want:
        status = 1
        msg += "; all-zero channels are pruned whole, beyond the target"
    return layers, glam, status, msg


def _floors(ctx, min_density):
    """Kept-weight floor per layer: ceil(min_density n_i), at most its live weights."""
    out = np.zeros(len(ctx.names), dtype=np.int64)
    for i, st in enumerate(ctx.stats):
        live = int(np.count_nonzero(ctx.scales[i] > 0)) * (st.n // max(st.channels, 1))
        out[i] = min(live, math.ceil(min_density * st.n - 1e-9)) if min_density > 0 else 0
    return out


def _warn_collapse(layers, ctx, msg):
    """Name every layer (with a non-zero weight) pruned beyond WARN_SPARSITY."""
    bad = [(lp.name, lp.sparsity) for lp, st in zip(layers, ctx.stats)
           if st.scale > 0 and lp.sparsity > WARN_SPARSITY]
    if not bad:
        return msg
    names = ", ".join(f"{n} ({100 * sp:.2f} %)" for n, sp in bad)
    emptied = [n for n, sp in bad if sp >= 1.0]
    msg += f"; {len(bad)} layer(s) pruned beyond {100 * WARN_SPARSITY:g} %: {names}"
    extra = (f"; it prunes every weight of {', '.join(emptied)}" if emptied else "")
    warnings.warn(f"plan: {len(bad)} layer(s) pruned beyond {100 * WARN_SPARSITY:g} %: {names}"
                  f"{extra}; exclude them, raise min_density or lower the compression to keep "
                  "more", UserWarning, stacklevel=3)
    return msg

def _realize_sparsity(ctx: _Context, sparsity: float, score_q: np.ndarray):
    """Exact-count masks: (kept, lam per layer, global lam, pruning error, pruned s^2)."""

    L = len(ctx.names)
    sizes = ctx.sizes
    ws = _LazyList(ctx.arrays, ctx.names) if isinstance(ctx.arrays, _Reread) else \
        [ctx.arrays[n] for n in ctx.names]
    s2s = [ctx.scales[i] * ctx.scales[i] for i in range(L)]
    qcs = [float(score_q[i]) * s2s[i] for i in range(L)]
    deads = [_dead(ctx, i) for i in range(L)]
    n_dead = np.array([int(np.count_nonzero(d)) * (sizes[i] // max(len(d), 1))
                       for i, d in enumerate(deads)], dtype=np.int64)
    if ctx.method == "uniform":
        kept = np.zeros(L, dtype=np.int64)
        lams = np.full(L, -np.inf)
        perr = np.zeros(L)
        ps2 = np.zeros(L)
        for i in range(L):
            k = max(min(round(sparsity * int(sizes[i])), int(sizes[i] - ctx.floors[i])),
                    int(n_dead[i]))
            t0 = time.perf_counter()
            sel = select_global([ws[i]], [qcs[i]], [s2s[i]], [deads[i]], k,
                                sizes=sizes[i:i + 1])
            ctx.select_seconds += time.perf_counter() - t0
            kept[i] = sizes[i] - k
            lams[i] = sel.lam
            perr[i] = sel.pruning_error[0]
            ps2[i] = sel.pruned_s2[0]
        return kept, lams, -np.inf, perr, ps2
    N = int(sizes.sum())
    floors = getattr(ctx, "floors", np.zeros(L, dtype=np.int64))
    k = max(round(sparsity * N), int(n_dead.sum()))
    k = min(k, N - int(floors.sum()))  # the floor wins over the target
    # layers that the global selection would leave below their floor keep exactly the
    # floor (their own threshold); the others share the global one. Repeat until none
    # falls below (a layer fixed at its floor stays fixed).
    fixed = np.zeros(L, dtype=bool)
    kept = np.zeros(L, dtype=np.int64)
    lams = np.full(L, -np.inf)
    perr = np.zeros(L)
    ps2 = np.zeros(L)
    glam = -np.inf
    band = {}  # layer -> its entry of the last selection's band pass
    while True:
        free = np.flatnonzero(~fixed)
        k_free = k - int(np.sum(sizes[fixed] - floors[fixed]))
        t0 = time.perf_counter()
        # which layers fall below their floor: counted on the last band pass when it holds
        # the new k-th score (the counts are exact; a round whose outcome stands, the
        # last, always runs the selection itself)
        pruned = recount([band[i] for i in free], max(k_free, 0)) if band else None
        if pruned is None or not np.any(sizes[free] - pruned < floors[free]):
            band = {}
            sel = select_global([ws[i] for i in free], [qcs[i] for i in free],
                                [s2s[i] for i in free], [deads[i] for i in free],
                                max(k_free, 0), sizes=sizes[free], keep_band=True)
            band = dict(zip(free.tolist(), sel.band)) if sel.band is not None else {}
            pruned = sel.pruned
            kept[free] = sizes[free] - sel.pruned
            lams[free] = sel.lam
            perr[free] = sel.pruning_error
            ps2[free] = sel.pruned_s2
            glam = sel.lam
        ctx.select_seconds += time.perf_counter() - t0
        low = free[sizes[free] - pruned < floors[free]]
        if low.size == 0:
            break
        fixed[low] = True
        for i in low:
            t0 = time.perf_counter()
            one = select_global([ws[i]], [qcs[i]], [s2s[i]], [deads[i]],
                                int(sizes[i] - floors[i]), sizes=sizes[i:i + 1])
            ctx.select_seconds += time.perf_counter() - t0
            kept[i] = floors[i]
            lams[i] = one.lam
            perr[i] = one.pruning_error[0]
            ps2[i] = one.pruned_s2[0]
    return kept, lams, glam, perr, ps2
