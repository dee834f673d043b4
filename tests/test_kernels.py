"""The JIT kernels against the NumPy oracles of tests/reference.py, bit for bit.

Also runs with ``NUMBA_DISABLE_JIT=1`` (plain Python kernels); sizes stay small for that.
"""
from __future__ import annotations

import concurrent.futures as cf
import doctest
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as ref
import strategies as S
from opq_core import kernels as K
from opq_core.kernels import _common as KC, masks as KM
from opq_core.kernels import code_dtype

UINT = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32,
        np.dtype(np.float64): np.uint64}


def same(a, b):
    """Exact equality: dtype, shape and every bit (so -0.0 != +0.0 and NaN == same NaN)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.dtype in UINT:
        a = np.ascontiguousarray(a).view(UINT[a.dtype])
        b = np.ascontiguousarray(b).view(UINT[b.dtype])
    bad = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
    assert bad.size == 0, f"{bad.size} entries differ, first at {bad[0]}: " \
                          f"{a.reshape(-1)[bad[0]]!r} != {b.reshape(-1)[bad[0]]!r}"


def qargs(p):
    return (p["scale"], p["threshold"], p["step"], p["bits"], p["grid"])


# --------------------------------------------------------------------------------------
# forward, codes, dequantize, clip mask
# --------------------------------------------------------------------------------------

@S.examples(100)
@given(p=S.quant_problems(), lw=S.layouts, lm=S.layouts)
def test_fake_quant_equals_reference(p, lw, lm):
    w = S.layout(p["w"], lw)
    m = S.layout(p["mask"], lm)
    want = ref.fake_quant(p["w"], p["mask"], *qargs(p))
    want_codes = ref.codes(p["w"], p["mask"], *qargs(p))

    same(K.fake_quant(w, m, *qargs(p)), want)

    cd = np.full(w.shape, 99, dtype=code_dtype(p["bits"]))
    got = K.fake_quant(w, m, *qargs(p), codes=cd)
    same(got, want)
    assert np.array_equal(cd.astype(np.int64), want_codes)

    same(K.dequantize(cd, *qargs(p), dtype=w.dtype), want)
    same(ref.dequantize(want_codes, *qargs(p), dtype=w.dtype), want)
    same(K.clip_mask(w, m, *qargs(p)), ref.clip_mask(p["w"], p["mask"], *qargs(p)))


@S.examples(40)
@given(p=S.quant_problems(), lo=S.layouts)
def test_fake_quant_out_and_in_place(p, lo):
    want = ref.fake_quant(p["w"], p["mask"], *qargs(p))
    out = S.layout(np.full(p["w"].shape, 7, p["w"].dtype), lo)
    cd = S.layout(np.zeros(p["w"].shape, code_dtype(p["bits"])), lo)
    res = K.fake_quant(p["w"], p["mask"], *qargs(p), out=out, codes=cd)
    assert res is out
    same(out, want)
    assert np.array_equal(cd.astype(np.int64), ref.codes(p["w"], p["mask"], *qargs(p)))
    w = p["w"].copy()
    res = K.fake_quant(w, p["mask"], *qargs(p), out=w)
    assert res is w
    same(w, want)
    # out overlapping the input in another layout: still right (goes through a copy)
    if w.ndim >= 2 and w.shape[0] == int(np.prod(w.shape[1:])):
        wt = p["w"].copy()
        o = wt.T
        mt = np.ascontiguousarray(p["mask"])
        K.fake_quant(wt, mt, *qargs(p), out=o.T)
        same(wt, want)


@S.examples(60)
@given(p=S.quant_problems())
def test_outputs_on_codebook_pruned_zero_kept_nonzero(p):
    w, m = p["w"], p["mask"]
    out = K.fake_quant(w, m, *qargs(p))
    bits = out.view(UINT[out.dtype])
    assert np.all(bits[~m] == 0)                   # exactly +0.0
    assert np.all(out[m] != 0)                     # a kept weight never becomes 0
    rows = out.reshape(w.shape[0], -1)
    mrows = m.reshape(w.shape[0], -1)
    for c in range(w.shape[0]):
        book = ref.codebook(p["scale"][c], p["threshold"][c], p["step"], p["bits"], p["grid"],
                            w.dtype)
        assert np.isin(rows[c][mrows[c]], book[1:]).all()
    # sign(0) = +1 and the sign of every other kept finite weight is kept
    pos = m & (w >= 0)
    assert np.all(out[pos] > 0) and np.all(out[m & (w < 0)] < 0)


@S.examples(60)
@given(p=S.quant_problems())
def test_forward_is_idempotent(p):
    once = K.fake_quant(p["w"], p["mask"], *qargs(p))
    twice = K.fake_quant(once, p["mask"], *qargs(p))
    same(twice, once)
    c1 = np.zeros(once.shape, code_dtype(p["bits"]))
    c2 = np.zeros(once.shape, code_dtype(p["bits"]))
    K.fake_quant(p["w"], p["mask"], *qargs(p), codes=c1)
    K.fake_quant(once, p["mask"], *qargs(p), codes=c2)
    assert np.array_equal(c1, c2)


@pytest.mark.parametrize("grid", S.GRIDS)
@pytest.mark.parametrize("dtype", S.FLOATS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_exact_boundaries_by_hand(grid, dtype, bits):
    """Values exactly on the offset cell edges and on the symmetric half-way points."""
    s, th, d = 0.5, 0.25, 0.25           # s D = 1/8; every value below is exact in float32
    sd = s * d
    kmax = 2 ** (bits - 1)
    j = np.arange(0, kmax + 3, dtype=np.float64)
    if grid == "offset":
        a = np.concatenate([th + sd * j, th + sd * (j + 0.5), [0.0, th / 2]])
        k = np.clip(np.floor((a - th) / sd) + 1, 1, kmax)
        level = th + s * ((k - 0.5) * d)
        assert np.array_equal(np.floor((th + sd * j - th) / sd), j)   # really on the edges
    else:
        a = np.concatenate([sd * j, sd * (j + 0.5), [0.0]])
        k = np.clip(np.rint(a / sd), 1, kmax)                  # half-way: to even
        level = k * sd
    w = np.concatenate([a, -a]).astype(dtype)[None, :]
    m = np.ones(w.shape, bool)
    cd = np.zeros(w.shape, code_dtype(bits))
    out = K.fake_quant(w, m, [s], [th], d, bits, grid, codes=cd)
    want = np.concatenate([level, np.where(a == 0, level, -level)]).astype(dtype)[None, :]
    same(out, want)
    kk = np.concatenate([k, np.where(a == 0, k, -k)]).astype(np.int64)[None, :]
    assert np.array_equal(cd.astype(np.int64), kk)
    same(out, ref.fake_quant(w, m, [s], [th], d, bits, grid))


def test_signed_zero_and_infinities():
    w = np.array([[-0.0, 0.0, np.inf, -np.inf, 5.0]], np.float32)
    m = np.array([[True, True, True, True, False]])
    cd = np.zeros(w.shape, np.int8)
    out = K.fake_quant(w, m, [1.0], [0.5], 0.5, 3, "offset", codes=cd)
    assert cd.tolist() == [[1, 1, 4, -4, 0]]
    assert out.tolist() == [[0.75, 0.75, 2.25, -2.25, 0.0]]
    same(out, ref.fake_quant(w, m, [1.0], [0.5], 0.5, 3, "offset"))
    # a pruned NaN is fine and gives +0.0
    w2 = np.array([np.nan, 1.0])
    out2 = K.fake_quant(w2, np.array([False, True]), [1.0, 1.0], [0.0, 0.0], 0.5, 2)
    same(out2, np.array([0.0, 0.75]))


def test_one_element_and_float64_scalar_broadcast():
    out = K.fake_quant(np.array([0.3]), np.array([True]), 1.0, 0.0, 0.25, 4, "symmetric")
    assert out.tolist() == [0.25]
    w = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    m = np.ones(w.shape, bool)
    same(K.fake_quant(w, m, 1.0, 0.1, 0.3, 3), ref.fake_quant(w, m, 1.0, 0.1, 0.3, 3))


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------

@S.examples(60)
@given(shape=S.shapes(), dtype=st.sampled_from(S.FLOATS), seed=st.integers(0, 2 ** 32 - 1),
       lg=S.layouts, use_clip=st.booleans())
def test_ste_backward_equals_reference(shape, dtype, seed, lg, use_clip):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(dtype)
    g.reshape(-1)[rng.random(g.size) < 0.1] = -0.0
    g.reshape(-1)[rng.random(g.size) < 0.05] = np.nan
    m = rng.random(shape) < 0.6
    clip = (rng.random(shape) < 0.3) if use_clip else None
    want = ref.ste_backward(g, m, clip)
    same(K.ste_backward(S.layout(g, lg), m, clip=clip), want)
    assert np.all(want.view(UINT[want.dtype])[~m] == 0)        # +0.0, even for NaN grads
    # in place and into a strided out
    gi = g.copy()
    assert K.ste_backward(gi, m, out=gi, clip=clip) is gi
    same(gi, want)
    o = S.layout(np.empty_like(g), "strided")
    K.ste_backward(g, m, out=o, clip=clip)
    same(o, want)


@S.examples(40)
@given(p=S.quant_problems())
def test_clipped_ste(p):
    cl = K.clip_mask(p["w"], p["mask"], *qargs(p))
    same(cl, ref.clip_mask(p["w"], p["mask"], *qargs(p)))
    assert not (cl & ~p["mask"]).any()
    g = np.ones(p["w"].shape, p["w"].dtype)
    got = K.ste_backward(g, p["mask"], clip=cl)
    same(got, (p["mask"] & ~cl).astype(g.dtype))
    # clipped kept weights sit on the top level
    out = K.fake_quant(p["w"], p["mask"], *qargs(p))
    top = 2 ** (p["bits"] - 1)
    cd = np.zeros(p["w"].shape, code_dtype(p["bits"]))
    K.fake_quant(p["w"], p["mask"], *qargs(p), codes=cd)
    assert np.all(np.abs(cd[cl].astype(int)) == top)
    assert np.all(np.isfinite(out))


# --------------------------------------------------------------------------------------
# scores and masks
# --------------------------------------------------------------------------------------

@S.examples(50)
@given(shape=S.shapes(), dtype=st.sampled_from((np.float16, np.float32, np.float64)),
       seed=st.integers(0, 2 ** 32 - 1), lw=S.layouts, data=st.data())
def test_scores_masks_equal_reference(shape, dtype, seed, lw, data):
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=shape)
    if data.draw(st.booleans()):                    # many ties
        w = np.round(w * 2) / 2
    w = w.astype(dtype)
    c = shape[0]
    q = rng.random(c) * 0.5
    dead = rng.random(c) < 0.2
    wl = S.layout(w, lw)
    sc = K.scores(wl, q, dead)
    same(sc, ref.scores(w, q, dead))
    th = rng.random(c)
    same(K.mask_from_threshold(wl, th), ref.mask_from_threshold(w, th))

    kept = data.draw(st.integers(0, w.size))
    mk = K.topk_mask_by_magnitude(wl, kept)
    same(mk, ref.topk_mask_by_magnitude(w, kept))
    a = np.abs(w.astype(np.float64))
    assert int(mk.sum()) == kept
    if 0 < kept < w.size:
        assert a[mk].min() >= a[~mk].max()

    # realized score mask: prune exactly k smallest, deterministic ties
    k = data.draw(st.integers(1, w.size))
    v, n_less, n_eq = K.select_smallest(sc, k)
    srt = np.sort(sc)
    assert v == srt[k - 1] and n_less == int((sc < v).sum()) and n_eq == int((sc == v).sum())
    keep = w.size - k
    ms = K.mask_from_scores(sc, v, keep)
    same(ms, ref.mask_from_scores(sc, v, keep))
    assert int(ms.sum()) == keep
    if 0 < keep < w.size:
        assert sc[ms].min() >= sc[~ms].max()


@S.examples(25)
@given(n=st.integers(40, 3000), seed=st.integers(0, 2 ** 32 - 1), data=st.data(),
       ties=st.booleans())
def test_select_smallest_band_path(n, seed, data, ties):
    """The sampled candidate band (forced on small arrays) and its full fallback."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    if ties:
        x = np.round(x * 3)
    x[rng.random(n) < 0.01] = -np.inf
    k = data.draw(st.integers(1, n))
    want = np.sort(x)[k - 1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KM, "_SELECT_MIN", 16)
        mp.setattr(KM, "_SELECT_SAMPLE", 32)
        v, nl, ne = K.select_smallest(x, k)
    assert v == want and nl == int((x < want).sum()) and ne == int((x == want).sum())
    for slack in (-1e9, 0.0):                       # a band that misses -> full selection
        v2, nl2, ne2, path = KM._select_band(x, k, sample=16, slack=slack)
        assert (v2, nl2, ne2) == (v, nl, ne)
        if slack < 0:
            assert path == "full"


# --------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------

@S.examples(60)
@given(bits=st.integers(1, 8), n=st.integers(0, 70), seed=st.integers(0, 2 ** 32 - 1))
def test_pack_bits_and_symbols(bits, n, seed):
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, 2 ** bits, size=n).astype(np.uint8)
    buf = K.pack_bits(sym, bits)
    same(buf, ref.pack_bits(sym, bits))
    assert buf.size == (n * bits + 7) // 8
    same(K.unpack_bits(buf, bits, n), sym)
    same(ref.unpack_bits(buf, bits, n), sym)
    cd = K.symbols_to_codes(sym, bits)
    assert cd.dtype == code_dtype(bits)
    assert cd.tolist() == [ref.code_of_symbol(s, bits) for s in sym]
    same(K.codes_to_symbols(cd, bits), sym)
    same(ref.symbols(cd, bits), sym)


@S.examples(60)
@given(bits=st.integers(1, 8), shape=st.sampled_from([(0,), (1,), (7, 9), (3, 4, 5)]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 32 - 1))
def test_symbols_to_codes_with_a_mask_scatters_in_one_pass(bits, shape, density, seed):
    rng = np.random.default_rng(seed)
    m = rng.random(shape) < density
    sym = rng.integers(0, 2 ** bits, size=int(m.sum())).astype(np.uint8)
    want = np.zeros(shape, code_dtype(bits))
    want[m] = [ref.code_of_symbol(s, bits) for s in sym]
    got = K.symbols_to_codes(sym, bits, mask=m)
    assert got.dtype == want.dtype and got.shape == want.shape
    same(got, want)
    with pytest.raises(ValueError, match="sym holds"):
        K.symbols_to_codes(np.append(sym, np.uint8(0)), bits, mask=m)
    if sym.size:
        with pytest.raises(ValueError, match="sym holds"):
            K.symbols_to_codes(sym[1:], bits, mask=m)
        if bits < 8:
            bad = sym.copy()
            bad[-1] = 1 << bits
            with pytest.raises(ValueError, match="does not fit"):
                K.symbols_to_codes(bad, bits, mask=m)


@S.examples(60)
@given(m=S.masks())
def test_mask_codes_round_trip_and_cost(m):
    bm = K.pack_mask(m)
    same(bm, ref.pack_mask(m))
    same(bm, np.packbits(m, bitorder="little"))
    same(K.unpack_mask(bm, m.size), m)
    gap = K.gap_encode(m)
    same(gap, ref.gap_encode(m))
    same(K.gap_decode(gap, m.size), m)
    same(ref.gap_decode(gap, m.size), m)
    cost = K.mask_coding_cost(m)
    assert (cost.bitmask, cost.gap, cost.kept, cost.n) == (bm.size, gap.size, int(m.sum()), m.size)
    assert cost["gap"] == gap.size and cost.nbytes == min(bm.size, gap.size)
    assert cost.best == ("gap" if gap.size < bm.size else "bitmask")
    assert "best=" in repr(cost)


@S.examples(60)
@given(p=S.quant_problems(), lm=S.layouts)
def test_pack_codes_round_trip(p, lm):
    bits = p["bits"]
    cd = np.zeros(p["w"].shape, code_dtype(bits))
    K.fake_quant(p["w"], p["mask"], *qargs(p), codes=cd)
    m = S.layout(p["mask"], lm)
    buf = K.pack_codes(S.layout(cd, lm), m, bits)
    same(buf, ref.pack_codes(cd, p["mask"], bits))
    back = K.unpack_codes(buf, m, bits)
    same(back, cd)
    assert np.array_equal(ref.unpack_codes(buf, p["mask"], bits), cd.astype(np.int64))


def test_multi_block_packing_and_long_gaps():
    """Arrays over several parallel blocks; gaps needing 1, 2 and 3 varint bytes."""
    n = 2 * KC._BLOCK + 4321
    rng = np.random.default_rng(3)
    m = rng.random(n) < 0.3
    m[100:20000] = False                  # a gap of ~2e4: three varint bytes
    m[-1] = True
    for par in (0, 1 << 62):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(KC, "PARALLEL_MIN_SIZE", par)
            same(K.pack_mask(m), np.packbits(m, bitorder="little"))
            gap = K.gap_encode(m)
            same(K.gap_decode(gap, n), m)
            assert K.mask_coding_cost(m).gap == gap.size
            cd = np.where(m, rng.integers(1, 5, n) * rng.choice([-1, 1], n), 0).astype(np.int8)
            buf = K.pack_codes(cd, m, 4)
            assert buf.size == (int(m.sum()) * 4 + 7) // 8
            same(K.unpack_codes(buf, m, 4), cd)
    same(gap, ref.gap_encode(m))


# --------------------------------------------------------------------------------------
# parallel vs serial, threads
# --------------------------------------------------------------------------------------

def _all_ops(w, m, args, g):
    cd = np.zeros(w.shape, code_dtype(args[3]))
    out = K.fake_quant(w, m, *args, codes=cd)
    sc = K.scores(w, np.full(w.shape[0], 0.01))
    kept = int(m.sum())
    v = K.select_smallest(sc, w.size - kept)[0] if kept < w.size else -np.inf
    return dict(out=out, codes=cd, deq=K.dequantize(cd, *args, dtype=w.dtype),
                ste=K.ste_backward(g, m, clip=K.clip_mask(w, m, *args)), scores=sc,
                thr=K.mask_from_threshold(w, args[1]), topk=K.topk_mask_by_magnitude(w, kept),
                msc=K.mask_from_scores(sc, v, kept), bm=K.pack_mask(m), gap=K.gap_encode(m),
                pc=K.pack_codes(cd, m, args[3]), uc=K.unpack_codes(K.pack_codes(cd, m, args[3]),
                                                                    m, args[3]))


def _problem(rng, shape, bits=4, grid="offset", dtype=np.float32):
    w = rng.laplace(size=shape).astype(dtype)
    c = shape[0]
    s = np.abs(w.reshape(c, -1)).mean(axis=1)
    th = 0.5 * s
    m = np.abs(w) >= th.reshape((c,) + (1,) * (w.ndim - 1))
    return w, m, (s, th, 0.6, bits, grid)


@pytest.mark.parametrize("shape", [(40, 1, 3, 3 * 256), (3 * KC._BLOCK + 17,)])
def test_parallel_equals_serial(shape):
    rng = np.random.default_rng(7)
    w, m, args = _problem(rng, shape, grid="symmetric")
    g = rng.standard_normal(shape).astype(np.float32)
    res = {}
    for par in (0, 1 << 62):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(KC, "PARALLEL_MIN_SIZE", par)
            res[par] = _all_ops(w, m, args, g)
    for key in res[0]:
        same(res[0][key], res[1 << 62][key])
    same(res[0]["out"], ref.fake_quant(w, m, *args))


def test_use_parallel_rules(monkeypatch):
    monkeypatch.setattr(KC, "PARALLEL_MIN_SIZE", 100)
    assert not KC._use_parallel(99) and KC._use_parallel(100)
    seen = {}
    monkeypatch.setattr(KC, "threading_layer_is_safe", lambda: False)
    t = threading.Thread(target=lambda: seen.update(unsafe=KC._use_parallel(10 ** 6)))
    t.start()
    t.join()
    monkeypatch.setattr(KC, "threading_layer_is_safe", lambda: True)
    t = threading.Thread(target=lambda: seen.update(safe=KC._use_parallel(10 ** 6)))
    t.start()
    t.join()
    assert seen == {"unsafe": False, "safe": True}


@pytest.mark.parametrize("layer_safe", [None, False])
def test_concurrent_threads(monkeypatch, layer_safe):
    """Several Python threads at once (parallel kernels where the layer allows it)."""
    monkeypatch.setattr(KC, "PARALLEL_MIN_SIZE", 2048)
    if layer_safe is not None:
        monkeypatch.setattr(KC, "threading_layer_is_safe", lambda: layer_safe)
    rng = np.random.default_rng(11)
    jobs = []
    for i in range(12):
        shape = [(16, 8, 3, 3), (64, 96), (5000,), (4, 1, 3, 3)][i % 4]
        w, m, args = _problem(rng, shape, bits=1 + i % 8, grid=S.GRIDS[i % 2],
                              dtype=S.FLOATS[i % 2])
        jobs.append((w, m, args))

    def work(job):
        w, m, args = job
        cd = np.zeros(w.shape, code_dtype(args[3]))
        out = K.fake_quant(w, m, *args, codes=cd)
        buf = K.pack_codes(cd, m, args[3])
        return out, K.unpack_codes(buf, m, args[3]), K.ste_backward(out, m)

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(work, jobs * 2))
    for (w, m, args), (out, cd, g) in zip(jobs * 2, results):
        want = ref.fake_quant(w, m, *args)
        same(out, want)
        assert np.array_equal(cd.astype(np.int64), ref.codes(w, m, *args))
        same(g, ref.ste_backward(want, m))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

W = np.ones((2, 3), np.float32)
M = np.ones((2, 3), bool)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(w=np.array([[1.0, np.nan, 2.0], [1.0, 1.0, 1.0]], np.float32)), ValueError,
     ["NaN", "(0, 1)"]),
    (dict(mask=np.ones((3, 2), bool)), ValueError, ["mask", "(3, 2)"]),
    (dict(mask=np.ones((2, 3), np.int8)), TypeError, ["mask", "int8"]),
    (dict(bits=0), ValueError, ["bits", "0"]),
    (dict(bits=9), ValueError, ["bits", "9"]),
    (dict(bits=4.0), TypeError, ["bits", "4.0"]),
    (dict(scale=[1.0, -0.5]), ValueError, ["scale[1]", "-0.5"]),
    (dict(scale=[1.0, 1.0, 1.0]), ValueError, ["scale", "(3,)"]),
    (dict(threshold=[np.inf, 0.0]), ValueError, ["threshold[0]", "inf"]),
    (dict(step=0.0), ValueError, ["step", "0.0"]),
    (dict(step=float("nan")), ValueError, ["step", "nan"]),
    (dict(grid="uniform"), ValueError, ["grid", "'uniform'"]),
    (dict(w=W.astype(np.float16)), TypeError, ["w", "float16", "astype"]),
    (dict(w=W.astype(np.int32)), TypeError, ["w", "int32"]),
    (dict(w=np.float32(1.0), mask=np.bool_(True)), ValueError, ["w", "ndim"]),
])
def test_fake_quant_bad_input(kwargs, exc, words):
    a = dict(w=W, mask=M, scale=[1.0, 1.0], threshold=[0.0, 0.0], step=0.5, bits=4,
             grid="offset")
    a.update(kwargs)
    with pytest.raises(exc) as ei:
        K.fake_quant(a["w"], a["mask"], a["scale"], a["threshold"], a["step"], a["bits"],
                     a["grid"], layer="conv1")
    msg = str(ei.value)
    assert "fake_quant" in msg and "layer 'conv1'" in msg
    for word in words:
        assert word in msg, (word, msg)


def test_other_bad_input():
    with pytest.raises(TypeError, match="codes.*int8.*bits=8"):
        K.fake_quant(W, M, 1.0, 0.0, 0.5, 8, codes=np.zeros((2, 3), np.int8))
    with pytest.raises(ValueError, match=r"out shape \(3, 2\)"):
        K.fake_quant(W, M, 1.0, 0.0, 0.5, 4, out=np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError, match="out dtype float64"):
        K.fake_quant(W, M, 1.0, 0.0, 0.5, 4, out=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"codes\(1, 0\) = 9 .*bits=4"):
        K.dequantize(np.array([[1, 2], [9, 0]], np.int8), 1.0, 0.0, 0.5, 4, layer="fc")
    with pytest.raises(ValueError, match=r"ste_backward: mask shape \(3, 2\)"):
        K.ste_backward(W, np.ones((3, 2), bool))
    with pytest.raises(ValueError, match=r"w has a non-finite value nan at index \(1,\)"):
        K.scores(np.array([1.0, np.nan]), [0.0, 0.0])
    with pytest.raises(ValueError, match="kept must be in 0..6, got 7"):
        K.topk_mask_by_magnitude(W, 7)
    with pytest.raises(ValueError, match="more than kept=1"):
        K.mask_from_scores(np.array([3.0, 2.0, 1.0]), 1.0, 1)
    with pytest.raises(ValueError, match="score has a NaN"):
        K.select_smallest(np.array([1.0, np.nan]), 1)
    with pytest.raises(ValueError, match="symbols\\[1\\] = 8 does not fit 3 bits"):
        K.pack_bits(np.array([1, 8], np.uint8), 3)
    with pytest.raises(ValueError, match="buf has 1 bytes"):
        K.unpack_bits(np.zeros(1, np.uint8), 3, 3)
    with pytest.raises(ValueError, match=r"codes\(1,\) = 0 with mask\(1,\) = True"):
        K.pack_codes(np.array([1, 0], np.int8), np.array([True, True]), 2, layer="fc")
    with pytest.raises(ValueError, match="need exactly 1"):
        K.unpack_codes(np.zeros(2, np.uint8), np.array([True, True]), 2)
    with pytest.raises(ValueError, match="truncated"):
        K.gap_decode(np.array([0x80], np.uint8), 10)
    with pytest.raises(ValueError, match="beyond n=3"):
        K.gap_decode(np.array([5], np.uint8), 3)
    with pytest.raises(ValueError, match="beyond n=100"):  # the largest 9-byte varint, 2**63 - 1
        K.gap_decode(np.array([0xFF] * 8 + [0x7F], np.uint8), 100)
    with pytest.raises(ValueError, match="longer than 9 bytes"):
        K.gap_decode(np.array([0xFF] * 9 + [0x01], np.uint8), 100)
    with pytest.raises(ValueError, match="padding bits"):
        K.unpack_mask(np.array([0xFF], np.uint8), 3)
    with pytest.raises(ValueError, match="not a kept code"):
        K.codes_to_symbols(np.array([0], np.int8), 2)


def test_doctests():
    import importlib
    attempted = 0
    for name in ("quantize", "ste", "masks", "pack", "index", "codebook"):
        mod = importlib.import_module(f"opq_core.kernels.{name}")
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.failed == 0, name
        attempted += res.attempted
    assert attempted > 15


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_blocks_unaligned_and_empty(bits):
    """Blocks starting at any bit offset, an all-pruned block, a block with one kept code."""
    if S.JIT_DISABLED and bits not in (3, 8):
        pytest.skip("plain-Python run: two bit widths suffice")
    n = 4 * KC._BLOCK + 77
    rng = np.random.default_rng(bits)
    m = rng.random(n) < 0.37
    m[KC._BLOCK:2 * KC._BLOCK] = False
    m[2 * KC._BLOCK:3 * KC._BLOCK] = False
    m[2 * KC._BLOCK + 5] = True
    kmax = 2 ** (bits - 1)
    cd = np.where(m, rng.integers(1, kmax + 1, n) * rng.choice([-1, 1], n), 0)
    cd = cd.astype(code_dtype(bits))
    want = K.pack_bits(K.codes_to_symbols(cd[m], bits), bits)
    for par in (0, 1 << 62):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(KC, "PARALLEL_MIN_SIZE", par)
            buf = K.pack_codes(cd, m, bits)
            same(buf, want)
            same(K.unpack_codes(buf, m, bits), cd)
    head = int(m[:40].sum())
    same(want[:head * bits // 8], ref.pack_codes(cd[:40], m[:40], bits)[:head * bits // 8])


def test_compile_timer():
    from opq_core import _jit

    @_jit.jit()
    def _twice(x):
        return 2 * x

    with _jit.compile_timer() as log:
        assert _twice(21) == 42
    if S.JIT_DISABLED:
        assert log == []
    else:
        assert [r.name for r in log] == ["_twice"] and log[0].seconds > 0
        assert _jit.compile_seconds(log)["_twice"] == log[0].seconds
        assert "_twice" in repr(log[0])
