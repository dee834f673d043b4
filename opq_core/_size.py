"""A size budget in bytes of the written ``.opq`` file (side information included).

The size-budget solver (:mod:`opq_core._budget`, reached through :func:`opq_core.plan`
with ``budget_bits=``) plans in bits of codes: ``S = sum_i B_i nnz_i``. The file also
holds the header (the zlib-compressed plan description, the tensor index), every layer's
channel scales and codebook, its symbol model, the coded sparsity pattern, the tensors
kept float, and the entropy coder's rounding to 32-bit words. None of that is a fixed
fraction of ``S``, and the entropy-coded parts depend on the data, so the budget in bytes
is met by measurement, not by a model:

- ``F(S)`` is the exact size of the file of the plan with ``budget_bits=S``, computed by
  encoding every layer in memory with the writer's own code
  (:func:`opq_core.format.opq_file_bytes`; a layer whose plan did not change since the
  previous trial is not encoded again);
- a safeguarded secant search on ``S`` (bracketing once a trial over and one under the
  budget are known, a bisection step whenever the secant step does not shrink the bracket
  enough) keeps the largest ``F(S) <= size_bytes`` found, and stops once it is within
  ``TOLERANCE`` of the budget.

The file's header does not hold the budget or the size (only ``budget_bits``), so the
smallest file of a model does not depend on the budget asked; nor does it hold the plan's
timings, so the same weights and plan always give the same bytes. The chosen plan is the one
whose size was measured: writing it with the same ``other``
tensors, ``layout`` and ``metadata`` gives a file of exactly ``Plan.predicted_bytes``
bytes, never more than ``size_bytes``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

__all__ = ["plan_for_size", "TOLERANCE", "MAX_TRIALS"]

#: The search stops at the first plan whose file is within this fraction below the budget.
TOLERANCE = 0.004

#: The most plans the search tries (each is one solve and the encoding of changed layers).
MAX_TRIALS = 24


class Subset(Mapping):
    """A read-only view of some names of a (lazy) weight mapping: the tensors of
    ``weights`` that the plan does not compress (what ``opq compress`` stores as they
    are), read only when the file is written."""

    def __init__(self, weights, names):
        self._w = weights
        self._names = list(names)

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._w[name]

    def tensor_info(self, name):
        from .io import tensor_info
        if name not in self._names:
            raise KeyError(name)
        return tensor_info(self._w, name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def check_size_bytes(size_bytes) -> int:
    """``size_bytes`` as an int >= 1 (an integral float is accepted)."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, (int, float, np.integer,
                                                                    np.floating)):
        raise TypeError(f"size_bytes must be a number of bytes, got {size_bytes!r}")
    v = float(size_bytes)
    if not math.isfinite(v) or v < 1 or v != math.floor(v):
        raise ValueError(f"size_bytes must be a whole number of bytes >= 1, got {size_bytes!r}")
    return int(v)


def _fixed_bytes(other) -> int:
    """Bytes of the tensors stored as they are (a lower bound of the non-code part)."""
    from .io import tensor_info
    total = 0
    for name in other:
        shape, dtype = tensor_info(other, name)
        total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


def plan_for_size(weights, size_bytes, *, planner, layout="entropy", other=None,
                  metadata=None, finish=None, **kw):
    """The plan whose written ``.opq`` file is the largest found that fits in ``size_bytes``.

    ``planner`` is :func:`opq_core.plan` (passed in: this module sits below it) and ``kw``
    its keyword arguments other than the target;
    ``other`` (default: the tensors of ``weights`` the plan does not compress), ``layout``
    and ``metadata`` are those the file will be written with (:func:`opq_core.write_opq`);
    ``finish`` (private) maps every trial plan to the plan that will be written (the
    torch adapter renames ``skipped``). Raises ``ValueError`` naming ``size_bytes`` and
    the smallest size when even the smallest plan (every layer at its floor of kept
    weights, the narrowest width) does not fit.
    """
    from .format import LAYOUTS, opq_file_bytes
    from .io import tensor_info
    from ._solver import _select_layers
    budget = check_size_bytes(size_bytes)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    names, skipped = _select_layers(weights, kw.get("exclude"))
    if other is None:
        other = Subset(weights, skipped)
    n_total = sum(int(np.prod(tensor_info(weights, k)[0])) for k in names)
    bits = kw.get("bits")
    if isinstance(bits, (list, tuple, range)) and len(bits):
        widest = max(int(b) for b in bits)
    elif isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        widest = int(bits)
    else:
        widest = 8
    s_all = float(n_total * widest)  # every weight kept at the widest width
    cache: dict = {}
    trials: dict = {}  # S -> (plan, bytes or None, warnings)

    def trial(S):
        S = float(S)
        if S in trials:
            return trials[S]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = planner(weights, budget_bits=S, **kw)
        if p.status == 2:  # below the smallest feasible budget in bits
            trials[S] = (p, None, caught)
            return trials[S]
        head = (f"the largest plan in bits ({widest} bits) fits in budget_bytes" if S >= s_all
                else f"the largest plan found whose {layout} .opq file fits in budget_bytes")
        p = replace(p, budget_bytes=budget, status=1 if S >= s_all else p.status,
                    message=f"{head}: budget_bits {S:.0f}; {p.message}")
        if finish is not None:
            p = finish(p)
        nbytes = opq_file_bytes(p, weights, other=other, layout=layout, metadata=metadata,
                                _cache=cache)
        trials[S] = (replace(p, predicted_bytes=int(nbytes)), int(nbytes), caught)
        return trials[S]

    # the first trial: every byte the tensors kept float leave, spent on codes
    S = min(8.0 * max(budget - _fixed_bytes(other), 0), s_all)
    p0, b0, _ = trial(S)
    s_min = float(p0.min_budget_bits or 0.0)
    lo = hi = None  # (S, bytes): largest fitting / smallest overflowing trial
    if b0 is None:
        S = s_min
    last_width = None
    for _ in range(MAX_TRIALS):
        S = min(max(S, s_min), s_all)
        _, b, _ = trial(S)
        if b is None:
            S = s_min
            continue
        if b <= budget:
            if lo is None or S > lo[0]:
                lo = (S, b)
            if b >= (1.0 - TOLERANCE) * budget or S >= s_all:
                break
        else:
            if hi is None or S < hi[0]:
                hi = (S, b)
            if S <= s_min:
                break
        target = (1.0 - TOLERANCE / 2) * budget
        if lo is not None and hi is not None:
            width = hi[0] - lo[0]
            if width <= max(64.0, 1e-4 * hi[0]):  # a jump of F (a layer changed width)
                break
            slope = (hi[1] - lo[1]) / width
            nxt = lo[0] + (target - lo[1]) / slope if slope > 0 else 0.5 * (lo[0] + hi[0])
            # a step that would not shrink the bracket to at most 3/4: bisect instead
            if last_width is not None and width > 0.75 * last_width:
                nxt = 0.5 * (lo[0] + hi[0])
            nxt = min(max(nxt, lo[0] + 0.01 * width), hi[0] - 0.01 * width)
            last_width = width
        else:
            ref = lo if lo is not None else hi
            pts = sorted((s, v[1]) for s, v in trials.items() if v[1] is not None)
            slope = None
            if len(pts) >= 2:
                (sa, ba), (sb, bb) = pts[0], pts[-1]
                slope = (bb - ba) / (sb - sa) if sb > sa and bb > ba else None
            if slope is None:  # bytes per bit of codes: at most 1/8 for codes, side info apart
                slope = 1.0 / 8.0
            nxt = ref[0] + (target - ref[1]) / slope
            if hi is None:
                nxt = min(max(nxt, ref[0] * 1.001 + 8.0), s_all)
            else:
                nxt = max(min(nxt, ref[0] * 0.999 - 8.0), s_min)
        S = nxt
    if lo is None:
        p_min, b_min, _ = trial(s_min)
        if b_min is None or b_min > budget:
            smallest = b_min if b_min is not None else float("nan")
            raise ValueError(
                f"size_bytes: {budget} bytes is below the smallest .opq file of these weights, "
                f"{smallest} bytes ({layout} layout: every layer at its floor of kept weights "
                f"and the narrowest width; exclude layers, lower min_density "
                f"or give a larger size)")
        lo = (s_min, b_min)
    best_p, best_b, caught = trials[lo[0]]
    for w in caught:  # the chosen plan's own warnings, once
        warnings.warn(w.message, w.category, stacklevel=3)
    return best_p
