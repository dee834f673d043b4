"""ANNC quantization projection, the joint projection, budgets and the plan."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .._check import BITS, _check_masks
from .._results import table_repr
from .._plan import LayerPlan, Plan, compute_dtype, paper_rate, rate_budget_bits
from ..kernels.codebook import check_codebook, fake_quant_codebook
from ._common import _bad_weight, _check_budget, _layers, _per_layer_int
from .kmeans import kmeans_zero_anchored
from .mckp import BitChoice, choose_bits
from .prune import PruneResult, prune_to_budget

# ---------------------------------------------------------------------------
# quantization projection and the joint projection
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class QuantResult:
    """Outcome of :func:`quantize_projection` (network order).

    ``errors[l, i]``: k-means error of layer ``l`` at ``bits_choices[i]``; ``bits``: the
    chosen bit-widths; ``codebooks``: name -> sorted non-zero float32-exact centroids;
    ``choice``: the :class:`BitChoice`.
    """

    names: tuple
    bits: np.ndarray
    codebooks: dict
    errors: np.ndarray
    kept: np.ndarray
    bits_choices: tuple
    choice: BitChoice

    @property
    def size_bits(self) -> int:
        return int((self.bits * self.kept).sum())

    def __repr__(self):
        nw = max([28] + [len(n) for n in self.names])  # names are never cut

        def row(i):
            n = self.names[i]
            j = self.bits_choices.index(int(self.bits[i]))
            return (f"{n:<{nw}} {int(self.kept[i]):>10d} {int(self.bits[i]):>4d} "
                    f"{self.codebooks[n].size:>9d} {self.errors[i, j]:>10.4g}")
        return table_repr("QuantResult",
                          f"{'layer':<{nw}} {'kept':>10} {'bits':>4} {'centroids':>9} {'error':>10}",
                          range(len(self.names)), row,
                          f"size_bits={self.size_bits} method={self.choice.method}")


def quantize_projection(weights: Mapping, masks: Mapping, budget_bits, *, bits=BITS,
                        exact_max: int = 2048, max_iter: int = 50,
                        method: str = "auto", layer_bits=None) -> QuantResult:
    """ANNC's quantization projection: per-layer codebooks and bit-widths under the budget.

    For every layer and every candidate ``b``, :func:`kmeans_zero_anchored` on the kept
    weights gives ``E[l, b]`` and a codebook; :func:`choose_bits` then picks one ``b`` per
    layer with ``sum_l kept_l b_l <= budget_bits``. A layer with nothing kept gets the
    codebook ``[1.0]`` and the smallest ``b`` (it costs nothing).

    ``layer_bits`` (int / sequence / mapping, optional): fix every layer's bit-width
    instead of choosing it (each must be one of ``bits``; ``choice.method == "fixed"``).

    Examples
    --------
    >>> w = {"fc": np.array([[-1.0, 0.5, 0.6, 2.0]])}
    >>> q = quantize_projection(w, {"fc": np.array([[True, True, True, True]])}, 8)
    >>> q.bits.tolist(), q.codebooks["fc"].tolist()
    ([2], [-1.0, 0.5, 0.6000000238418579, 2.0])
    """
    names, flats, shapes = _layers(weights)
    choices = tuple(int(x) for x in bits)
    if not choices or any(not 1 <= x <= 8 for x in choices):
        raise ValueError(f"bits must be integers in 1..8, got {bits!r}")
    ms = _check_masks(masks, names, shapes)
    L = len(names)
    fixed = None
    if layer_bits is not None:
        fixed = _per_layer_int(layer_bits, names, "layer_bits", 1, 8)
        for i, n in enumerate(names):
            if int(fixed[i]) not in choices:
                raise ValueError(f"layer_bits[{n!r}]={int(fixed[i])} is not one of the "
                                 f"candidate bits {choices}")
    E = np.zeros((L, len(choices)))
    books = []
    kept = np.zeros(L, np.int64)
    for i in range(L):
        v = flats[i][ms[i]]
        kept[i] = v.size
        if not np.all(np.isfinite(v)):
            raise _bad_weight(names[i], flats[i], shapes[i])
        if v.size == 0:
            books.append(tuple(np.array([1.0]) for _ in choices))
            continue
        r = kmeans_zero_anchored(v, choices, exact_max=exact_max, max_iter=max_iter)
        E[i] = r.errors
        books.append(r.codebooks)
    if fixed is not None:
        S = _check_budget(budget_bits)
        cost = int((fixed * kept).sum())
        if cost > S:
            raise ValueError(f"layer_bits: the masks at these bit-widths cost {cost} bits, "
                             f"above budget_bits={budget_bits!r}")
        err = float(sum(E[i, choices.index(int(fixed[i]))] for i in range(L)))
        ch = BitChoice(fixed.copy(), err, cost, S, "fixed", err, 0.0)
    else:
        try:
            ch = choose_bits(E, kept, budget_bits, bits=choices, method=method)
        except ValueError as exc:
            raise ValueError(f"masks: {exc}") from None
    cbs = {n: books[i][choices.index(int(ch.bits[i]))] for i, n in enumerate(names)}
    return QuantResult(tuple(names), ch.bits, cbs, E, kept, choices, ch)


@dataclass(frozen=True, repr=False)
class Projection:
    """The joint ANNC projection: masks, codebooks and bit-widths within the budget."""

    names: tuple
    masks: dict
    codebooks: dict
    bits: dict
    kept: dict
    budget_bits: int
    errors: np.ndarray
    prune: PruneResult
    quant: QuantResult

    @property
    def size_bits(self) -> int:
        return int(sum(self.bits[n] * self.kept[n] for n in self.names))

    def apply(self, weights: Mapping) -> dict:
        """The projected weights ``V``: pruned and snapped to the codebooks (dtype kept)."""
        out = {}
        for n in self.names:
            w = np.asarray(weights[n])
            dt = compute_dtype(w.dtype)
            out[n] = fake_quant_codebook(w.astype(dt, copy=False), self.masks[n],
                                         self.codebooks[n], name=n).astype(w.dtype, copy=False)
        return out

    def __repr__(self):
        nw = max([28] + [len(n) for n in self.names])  # names are never cut
        return table_repr("Projection", f"{'layer':<{nw}} {'kept':>10} {'bits':>4} {'centroids':>9}",
                          self.names,
                          lambda n: f"{n:<{nw}} {self.kept[n]:>10d} {self.bits[n]:>4d} "
                                    f"{self.codebooks[n].size:>9d}",
                          f"size_bits={self.size_bits} budget_bits={self.budget_bits}")


def _lagrangian_bits(flats, tau, per_weight, choices):
    r"""Per layer, the bit-width minimizing pruning + quantization error + ``tau`` * bits.

    With the price ``tau`` (error per bit at the knapsack cut), layer ``l`` at ``b`` bits
    keeps the weights with ``w^2 > tau b + e_l(b)`` (``e_l(b)``: quantization error per kept
    weight) and costs

    .. math:: L_l(b) = \sum_{\text{pruned}} w^2 + n_l(b) \,(e_l(b) + \tau b).
    """
    out = np.empty(len(flats), np.int64)
    c = np.asarray(choices, np.float64)
    for i, f in enumerate(flats):
        v = f.astype(np.float64)
        sq = np.sort(v * v)
        pre = np.concatenate([[0.0], np.cumsum(sq)])
        t = tau * c + per_weight[i]
        cut = np.searchsorted(sq, t, side="right")
        nnz = sq.size - cut
        L = pre[cut] + nnz * (per_weight[i] + tau * c)
        out[i] = choices[int(np.argmin(L))]
    return out


def project(weights: Mapping, budget_bits, *, bits=None, freeze_bits: bool = False,
            iterations: int = 3, exact_max: int = 2048, max_iter: int = 50,
            method: str = "auto") -> Projection:
    r"""The joint projection: pruning and quantization projections, bit-widths re-chosen.

    Each round prunes with the current bit-widths (:func:`prune_to_budget`, whose cut
    density ``tau`` is the error a bit buys at the margin) and quantizes the kept weights
    (:func:`quantize_projection`: codebooks and a multiple-choice knapsack over the bits
    for these masks). The fixed-mask knapsack alone would never trade bits for weights, so
    between rounds every layer re-chooses its bit-width by the Lagrangian
    ``pruning error + quantization error + tau * bits`` (per-weight quantization errors from
    the k-means table). The round with the smallest total error

    .. math:: \sum_{\text{pruned}} w^2 + \sum_l E_l(b_l)

    is returned; every round fits ``budget_bits``.

    The rounds start from ``min(8, budget_bits // layers)`` bits in every layer (a cold
    start). With ``bits`` (int / sequence / mapping), for instance the bit-widths of the
    previous ADMM projection, the rounds also run from ``bits`` (a warm start) and the
    better of the two is returned: every layer stays free to change its bit-width, and
    the result is never worse than either start alone.

    ``freeze_bits=True`` (needs ``bits``) keeps ``bits`` exactly: one pruning projection
    at these bit-widths and the k-means codebooks at these bit-widths, no re-choice.

    >>> rng = np.random.default_rng(0)
    >>> w = {"a": rng.laplace(size=(8, 16)), "b": rng.laplace(size=(4, 8))}
    >>> p = project(w, 200)
    >>> p.size_bits <= 200
    True
    """
    names, flats, shapes = _layers(weights)
    S = _check_budget(budget_bits)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(freeze_bits, (bool, np.bool_)):
        raise TypeError(f"freeze_bits must be True or False, got {freeze_bits!r}")
    ws = {n: f.reshape(s) for n, f, s in zip(names, flats, shapes)}
    if freeze_bits:
        if bits is None:
            raise ValueError("freeze_bits=True needs bits (the bit-widths to keep)")
        cur = _per_layer_int(bits, names, "bits", 1, 8)
        pr = prune_to_budget(ws, cur, S)
        q = quantize_projection(ws, pr.masks, S, exact_max=exact_max, max_iter=max_iter,
                                layer_bits=cur)
    else:
        cold = np.full(len(names), max(1, min(8, S // max(len(names), 1))), np.int64)
        starts = [cold]
        if bits is not None:
            warm = _per_layer_int(bits, names, "bits", 1, 8)
            if not np.array_equal(warm, cold):
                starts.insert(0, warm)
        best = None
        done = {}  # bit-widths -> (pruning, quantization), shared by the starts
        for cur in starts:
            path = set()
            for it in range(iterations):
                key = tuple(int(x) for x in cur)
                if key in path:
                    break
                path.add(key)
                if key not in done:
                    pr = prune_to_budget(ws, cur, S)
                    q = quantize_projection(ws, pr.masks, S, exact_max=exact_max,
                                            max_iter=max_iter, method=method)
                    done[key] = (pr, q)
                    total = float(pr.pruning_error.sum()) + q.choice.error
                    if best is None or total < best[0]:
                        best = (total, pr, q)
                pr, q = done[key]
                if it + 1 < iterations:
                    per_weight = q.errors / np.maximum(q.kept, 1)[:, None]
                    cur = _lagrangian_bits(flats, pr.threshold, per_weight, q.bits_choices)
        _, pr, q = best
    return Projection(tuple(names), pr.masks, q.codebooks,
                      {n: int(q.bits[i]) for i, n in enumerate(names)},
                      {n: int(q.kept[i]) for i, n in enumerate(names)}, S, q.errors, pr, q)


# ---------------------------------------------------------------------------
# budgets and the plan
# ---------------------------------------------------------------------------

def min_budget_bits(weights: Mapping) -> int:
    """Smallest feasible budget: 1 bit x 1 kept weight in every layer."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping name -> array")
    return len(weights)


def annc_budget(weights: Mapping, *, rate=None, budget_bits=None) -> int:
    r"""The budget ``S`` in bits from a paper rate (``S = floor(32 N / rate)``) or as given.

    ``N`` is the number of weights of the compressed layers (values or shapes). A budget
    below :func:`min_budget_bits` (1 bit x 1 weight per layer), a rate ``<= 1`` or a rate
    above ``32 N / layers`` is refused with the smallest feasible budget in the message.

    >>> annc_budget({"fc": np.zeros((10, 10))}, rate=32)
    100
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping name -> array (or shape)")
    N = 0
    for n, w in weights.items():
        shp = w if isinstance(w, (tuple, list)) else np.shape(w)
        N += int(np.prod(tuple(int(s) for s in shp)))
    L = len(weights)
    if (rate is None) == (budget_bits is None):
        raise ValueError("give exactly one of rate= or budget_bits=")
    if rate is not None:
        if isinstance(rate, (bool, np.bool_)) or not isinstance(
                rate, (int, float, np.integer, np.floating)):
            raise TypeError(f"rate must be a number > 1, got {rate!r}")
        r = float(rate)
        if not (math.isfinite(r) and r > 1.0):
            raise ValueError(f"rate must be a finite number > 1 (32-bit floats are rate 1), "
                             f"got {rate!r}")
        S = int(math.floor(rate_budget_bits(N, r)))
        if S < L:
            raise ValueError(
                f"rate={rate!r} gives budget_bits={S} for {N} weights, below the smallest "
                f"feasible budget {L} bits (1 bit x 1 weight in each of {L} layers); the "
                f"largest feasible rate is {paper_rate(N, L):.6g}")
        return S
    S = _check_budget(budget_bits)
    if S < L:
        raise ValueError(f"budget_bits={budget_bits!r} is below the smallest feasible budget "
                         f"{L} bits (1 bit x 1 weight in each of {L} layers)")
    return S


def annc_plan(weights: Mapping, masks: Mapping, codebooks: Mapping, bits: Mapping, *,
              budget_bits=None, skipped=(), message: str | None = None):
    """A :class:`~opq_core.allocate.Plan` (``method="annc"``) from masks and codebooks.

    Every layer gets ``grid="codebook"``, its codebook and bit-width, ``channel_scale`` of
    ones, ``step = lam = score_q = 0``; ``kept`` is the mask count,
    ``pruning_error`` the sum of the squared pruned weights, ``predicted_error`` the
    *measured* squared error ``||w - fake_quant_codebook(w)||^2`` of the projection (pruning
    included) and ``quant_error`` its kept part per kept weight. ``success`` is False (status
    2) when ``sum bits * kept`` exceeds ``budget_bits``.

    >>> w = {"fc": np.array([[-1.0, 0.5, 0.0, 2.0]], np.float32)}
    >>> m = {"fc": np.array([[True, True, False, True]])}
    >>> p = annc_plan(w, m, {"fc": [-1.0, 0.5, 2.0]}, {"fc": 2}, budget_bits=6)
    >>> p.size_bits, p.method, p["fc"].grid
    (6, 'annc', 'codebook')
    """
    names, flats, shapes = _layers(weights)
    ms = _check_masks(masks, names, shapes)
    layers = []
    for i, n in enumerate(names):
        if n not in codebooks:
            raise ValueError(f"codebooks: no codebook for layer {n!r}")
        if n not in bits:
            raise ValueError(f"bits: no bit-width for layer {n!r}")
        b = bits[n]
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) \
                or not 1 <= int(b) <= 8:
            raise ValueError(f"bits[{n!r}] must be an integer in 1..8, got {b!r}")
        b = int(b)
        cb = check_codebook(codebooks[n], fn="annc_plan", name=n)
        if cb.size > (1 << b):
            raise ValueError(f"codebooks[{n!r}]: {cb.size} centroids do not fit bits={b} "
                             f"(at most {1 << b})")
        if not np.array_equal(cb.astype(np.float32).astype(np.float64), cb):
            raise ValueError(f"codebooks[{n!r}]: centroids must be exactly representable in "
                             f"float32, e.g. codebook[{int(np.flatnonzero(cb.astype(np.float32) != cb)[0])}]")
        w = np.asarray(weights[n])
        dt = w.dtype if w.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        x = flats[i].astype(dt, copy=False)
        m = ms[i]
        wh = fake_quant_codebook(x, m, cb, name=n)
        x64 = x.astype(np.float64)
        diff = x64 - wh.astype(np.float64)
        kept = int(np.count_nonzero(m))
        perr = float(np.dot(x64[~m], x64[~m]))
        qerr = float(np.dot(diff[m], diff[m]))
        layers.append(LayerPlan(
            name=n, shape=shapes[i], dtype=str(w.dtype), bits=b, grid="codebook", step=0.0,
            channel_scale=np.ones(shapes[i][0] if shapes[i] else 1), scale_dtype="float16",
            lam=0.0, score_q=0.0, quant_error=qerr / kept if kept else 0.0, kept=kept,
            predicted_sparsity=1.0 - kept / x.size if x.size else 0.0, pruning_error=perr,
            predicted_error=perr + qerr, codebook=cb))
    size = sum(lp.size_bits for lp in layers)
    S = None if budget_bits is None else _check_budget(budget_bits)
    ok = S is None or size <= S
    if message is None:
        message = (f"size {size} bits" + ("" if S is None else f" <= budget {S} bits")
                   if ok else f"size {size} bits exceeds the budget {S} bits")
    return Plan(layers=tuple(layers), method="annc", channelwise="layer", grid="codebook",
                error_model="empirical", target_sparsity=None,
                budget_bits=None if S is None else float(S), lam=0.0, skipped=tuple(skipped),
                success=ok, status=0 if ok else 2, message=message,
                min_budget_bits=float(len(layers)))
