"""Mask realization: scores, exact-count selection, masks from thresholds."""
from __future__ import annotations

import math

import numpy as np

from .._jit import jit, prange, twins
from .._check import _as_array, _check_bool, _check_channels, _check_int, _check_weight, _fn
from ._common import _bounds, _BLOCK, _finish, _index, _rows, _target, _use_parallel

#: Arrays at least this long use the sampled candidate band in :func:`select_smallest`.
_SELECT_MIN = 1 << 16
_SELECT_SAMPLE = 1 << 15
_SELECT_SEED = 0x5EED


# --------------------------------------------------------------------------------------
# mask realization
# --------------------------------------------------------------------------------------

@jit()
def _scores_row(x, o, q, dead):
    bad = 0
    if dead:
        for j in range(x.shape[0]):
            v = np.float64(x[j])
            o[j] = -np.inf
            bad += 0 if abs(v) < np.inf else 1
    else:
        for j in range(x.shape[0]):
            v = np.float64(x[j])
            o[j] = v * v - q
            bad += 0 if abs(v) < np.inf else 1
    return bad


def _scores(x, o, q, dead, bad):
    for c in prange(x.shape[0]):
        bad[c] = _scores_row(x[c], o[c], q[c], dead[c])


_scores, _scores_par = twins(_scores)


def scores(w, q_c, dead=None, out=None, *, layer=None):
    r"""Pruning scores of one layer, flattened: :math:`w^2 - q_c` (float64).

    Pruning a kept weight of channel ``c`` changes the error by ``w**2 - q_c`` (see
    docs/model.md); the network keeps the largest scores. Channels marked ``dead`` (scale 0)
    score ``-inf`` and go first.

    Parameters
    ----------
    w : float16/32/64 ndarray, ndim >= 1 (non-finite weights are refused)
    q_c : array_like (C,)
        Predicted quantization MSE of a kept weight per channel (finite).
    dead : bool array (C,), optional
    out : float64 ndarray (w.size,), optional

    >>> scores(np.array([[1.0, -2.0], [3.0, 0.5]]), [0.5, 1.0], dead=np.array([False, True]))
    array([ 0.5,  3.5, -inf, -inf])
    """
    fn = _fn("scores", layer)
    x = _check_weight(fn, w, allow_half=True)
    c, n = _rows(x.shape)
    q = _check_channels(fn, "q_c", q_c, c)
    if dead is None:
        dd = np.zeros(c, dtype=np.bool_)
    else:
        dd = _check_bool(fn, "dead", dead, (c,))
    o, o_user = _target(fn, "out", out, (x.size,), np.float64, (x,))
    bad = np.zeros(c, dtype=np.int64)
    kern = _scores_par if _use_parallel(x.size) else _scores
    kern(x.reshape(c, n), o.reshape(c, n), q, dd, bad)
    if bad.any():
        flat = x.reshape(-1)
        i = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise ValueError(f"{fn}: w has a non-finite value {float(flat[i])!r} at index "
                         f"{_index(x.shape, i)}")
    return _finish(o, o_user)


@jit()
def _mfs_take(s, m, lam, take):
    """Keep, in each block, its first take[b] entries equal to lam."""
    n = s.shape[0]
    for b in range(take.shape[0]):
        t = take[b]
        if t == 0:
            continue
        j = b * _BLOCK
        hi = min(j + _BLOCK, n)
        while t > 0 and j < hi:
            if s[j] == lam:
                m[j] = True
                t -= 1
            j += 1


def mask_from_scores(score, lam, kept):
    r"""Keep every score > ``lam``, then the first (flat order) scores equal to ``lam``
    until exactly ``kept`` are kept.

    With ``lam`` the realized score quantile (:func:`select_smallest`) this prunes exactly
    the smallest scores with deterministic ties (earlier positions are kept first).

    Parameters
    ----------
    score : float64 ndarray (any shape; NaN refused)
    lam : float (may be ``-inf``; not NaN)
    kept : int, 0..score.size

    Returns
    -------
    bool ndarray, shape of ``score``

    Raises
    ------
    ValueError
        More than ``kept`` scores exceed ``lam``, or too few are ``>= lam``.

    >>> mask_from_scores(np.array([3.0, 1.0, 2.0, 1.0, 1.0]), 1.0, 3).tolist()
    [True, True, True, False, False]
    """
    fn = "mask_from_scores"
    s = _as_array(fn, "score", score)
    if s.dtype != np.float64:
        raise TypeError(f"{fn}: score must be float64, got dtype {s.dtype}")
    s = np.ascontiguousarray(s)
    if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: lam must be a real number, got {lam!r}")
    lam = float(lam)
    if math.isnan(lam):
        raise ValueError(f"{fn}: lam must not be NaN")
    n = s.size
    kept = _check_int(fn, "kept", kept, 0, n)
    flat = s.reshape(-1)
    m = np.empty(n, dtype=np.bool_)
    below, eq, nan = _band_counts(flat, lam, lam, m)
    if nan.any():
        i = int(np.flatnonzero(np.isnan(flat))[0])
        raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
    n_eq = int(eq.sum())
    n_gt = n - int(below.sum()) - n_eq
    if n_gt > kept:
        raise ValueError(f"{fn}: {n_gt} scores are > lam={lam!r}, more than kept={kept}")
    need = kept - n_gt
    if need > n_eq:
        raise ValueError(f"{fn}: only {n_gt + n_eq} scores are >= lam={lam!r}, fewer than "
                         f"kept={kept}")
    if need:
        before = np.cumsum(eq) - eq
        take = np.clip(need - before, 0, eq)
        _mfs_take(flat, m, lam, take)
    return m.reshape(s.shape)


@jit()
def _band_block(x, lo_v, hi_v, m, lo, hi):
    """Counts of ``x[lo:hi]`` below ``lo_v``, inside ``[lo_v, hi_v]`` and NaN; when ``m``
    is not empty, also ``m[j] = x[j] > hi_v``."""
    below = 0
    band = 0
    nan = 0
    xx = x[lo:hi]
    mark = m.shape[0] > 0
    mm = m[lo:hi] if mark else m  # slices, not offsets: the loop vectorizes
    for j in range(xx.shape[0]):
        v = xx[j]
        if mark:
            mm[j] = v > hi_v
        below += 1 if v < lo_v else 0
        band += 1 if (v >= lo_v and v <= hi_v) else 0
        nan += 1 if v != v else 0
    return below, band, nan


def _band_count(x, lo_v, hi_v, m, below, band, nan):
    n = x.shape[0]
    for b in prange(below.shape[0]):
        lo, hi = _bounds(b, n)
        below[b], band[b], nan[b] = _band_block(x, lo_v, hi_v, m, lo, hi)


_band_count, _band_count_par = twins(_band_count)


def _band_counts(x, lo_v, hi_v, m=None):
    """Per block of ``_BLOCK`` values: how many are below ``lo_v``, inside ``[lo_v, hi_v]``,
    NaN (three int64 arrays); ``m`` (bool, like ``x``) receives ``x > hi_v``."""
    n = x.shape[0]
    nb = (n + _BLOCK - 1) // _BLOCK
    below, band, nan = (np.zeros(nb, np.int64) for _ in range(3))
    mm = np.empty(0, np.bool_) if m is None else m
    (_band_count_par if _use_parallel(n) else _band_count)(x, lo_v, hi_v, mm, below, band, nan)
    return below, band, nan


@jit()
def _band_collect_block(x, lo_v, hi_v, cand, at, lo, hi):
    xx = x[lo:hi]
    for j in range(xx.shape[0]):
        v = xx[j]
        if v >= lo_v and v <= hi_v:
            cand[at] = v
            at += 1


def _band_collect(x, lo_v, hi_v, offsets, cand):
    n = x.shape[0]
    for b in prange(offsets.shape[0]):
        lo, hi = _bounds(b, n)
        _band_collect_block(x, lo_v, hi_v, cand, offsets[b], lo, hi)


_band_collect, _band_collect_par = twins(_band_collect)


def _select_full(x, k):
    """Fallback: np.partition of the whole array (O(N), extra memory)."""
    v = np.partition(x, k - 1)[k - 1]
    return float(v), int(np.count_nonzero(x < v)), int(np.count_nonzero(x == v))


def _select_band(x, k, sample=None, slack=None):
    """k-th smallest of a flat finite-or-inf float64 array by a sampled candidate band.

    A fixed-seed sample locates a value band ``[lo, hi]`` around the k/N quantile; one
    pass counts the values below it and inside it, a second copies the candidates, and
    the selection runs on the candidates only. When the band misses the k-th value (rare:
    ``slack`` is six standard deviations of the sample rank), :func:`_select_full` is used.
    Returns ``(v, n_less, n_equal, path)``, or None when ``x`` holds a NaN.
    """
    n = x.shape[0]
    if sample is None:
        sample = _SELECT_SAMPLE
    rng = np.random.default_rng(_SELECT_SEED)
    smp = np.sort(x[rng.integers(0, n, size=sample)])
    q = k / n
    r = q * sample
    if slack is None:
        slack = 6.0 * math.sqrt(sample * q * (1.0 - q)) + 16.0
    i_lo = min(int(math.floor(r - slack)) - 1, sample - 1)
    i_hi = max(int(math.ceil(r + slack)), 0)
    lo_v = -np.inf if i_lo < 0 else float(smp[i_lo])
    hi_v = np.inf if i_hi >= sample else float(smp[i_hi])
    below, band, nan = _band_counts(x, lo_v, hi_v)
    if nan.any():
        return None
    n_below = int(below.sum())
    n_band = int(band.sum())
    if not (n_below < k <= n_below + n_band):
        v, nl, ne = _select_full(x, k)
        return v, nl, ne, "full"
    if lo_v == hi_v:
        return float(lo_v), n_below, n_band, "band"
    offsets = np.cumsum(band) - band
    cand = np.empty(n_band, dtype=np.float64)
    (_band_collect_par if _use_parallel(n) else _band_collect)(x, lo_v, hi_v, offsets, cand)
    r_in = k - n_below
    v = np.partition(cand, r_in - 1)[r_in - 1]
    return (float(v), n_below + int(np.count_nonzero(cand < v)),
            int(np.count_nonzero(cand == v)), "band")


def select_smallest(score, k):
    r"""The ``k``-th smallest value (1-based) of a float64 array by O(N) selection.

    Returns ``(v, n_less, n_equal)``: ``v == np.sort(score.ravel())[k - 1]``,
    ``n_less`` values are ``< v`` and ``n_equal`` are ``== v`` (so
    ``n_less < k <= n_less + n_equal``). Large arrays use a sampled candidate band (two
    parallel passes, selection on ~2 % of the values) with a deterministic fixed-seed
    sample; small ones ``np.partition``. NaN is refused; ``+-inf`` are ordinary values.

    >>> select_smallest(np.array([5.0, 1.0, 3.0, 3.0, 2.0]), 3)
    (3.0, 2, 2)
    """
    fn = "select_smallest"
    s = _as_array(fn, "score", score)
    if s.dtype != np.float64:
        raise TypeError(f"{fn}: score must be float64, got dtype {s.dtype}")
    x = np.ascontiguousarray(s).reshape(-1)
    n = x.size
    if n == 0:
        raise ValueError(f"{fn}: score is empty")
    k = _check_int(fn, "k", k, 1, n)
    if n < _SELECT_MIN:
        if np.isnan(x).any():
            i = int(np.flatnonzero(np.isnan(x))[0])
            raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
        return _select_full(x, k)
    res = _select_band(x, k)
    if res is None:
        i = int(np.flatnonzero(np.isnan(x))[0])
        raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
    return res[:3]


@jit()
def _abs_row(x, o):
    for j in range(x.shape[0]):
        o[j] = abs(np.float64(x[j]))


@jit(parallel=True)
def _abs_flat_par(x, o):
    n = x.shape[0]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        lo, hi = _bounds(b, n)
        _abs_row(x[lo:hi], o[lo:hi])


def topk_mask_by_magnitude(w, kept, *, layer=None):
    r"""Per-layer magnitude baseline: keep the ``kept`` largest ``|w|``.

    Ties at the cut are kept first in flat order. NaN weights are refused.

    >>> topk_mask_by_magnitude(np.array([[0.5, -2.0], [0.5, 1.0]]), 3).tolist()
    [[True, True], [False, True]]
    """
    fn = _fn("topk_mask_by_magnitude", layer)
    x = _check_weight(fn, w, allow_half=True)
    n = x.size
    kept = _check_int(fn, "kept", kept, 0, n)
    flat = x.reshape(-1)
    a = np.empty(n, dtype=np.float64)
    if _use_parallel(n):
        _abs_flat_par(flat, a)
    else:
        _abs_row(flat, a)
    if kept == 0:
        if n and np.isnan(a).any():
            i = int(np.flatnonzero(np.isnan(a))[0])
            raise ValueError(f"{fn}: w has a NaN at index {_index(x.shape, i)}")
        return np.zeros(x.shape, dtype=np.bool_)
    try:
        v = select_smallest(a, n - kept + 1)[0]
    except ValueError:
        i = int(np.flatnonzero(np.isnan(a))[0])
        raise ValueError(f"{fn}: w has a NaN at index {_index(x.shape, i)}") from None
    return mask_from_scores(a, v, kept).reshape(x.shape)


@jit()
def _thr_row(x, o, theta):
    for j in range(x.shape[0]):
        o[j] = abs(np.float64(x[j])) >= theta


def _mask_from_threshold(x, o, threshold):
    for c in prange(x.shape[0]):
        _thr_row(x[c], o[c], threshold[c])


_mask_from_threshold, _mask_from_threshold_par = twins(_mask_from_threshold)


def mask_from_threshold(w, threshold, *, layer=None):
    r"""Per-channel magnitude mask :math:`|w_{cj}| \ge \theta_c` (NaN -> pruned).

    >>> mask_from_threshold(np.array([[0.5, -2.0], [0.5, 1.0]]), [1.0, 0.5]).tolist()
    [[False, True], [True, True]]
    """
    fn = _fn("mask_from_threshold", layer)
    x = _check_weight(fn, w, allow_half=True)
    c, n = _rows(x.shape)
    th = _check_channels(fn, "threshold", threshold, c, finite=False)
    o = np.empty(x.shape, dtype=np.bool_)
    kern = _mask_from_threshold_par if _use_parallel(x.size) else _mask_from_threshold
    kern(x.reshape(c, n), o.reshape(c, n), th)
    return o
