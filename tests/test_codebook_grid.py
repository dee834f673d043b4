"""plan(grid="codebook"|"auto"): a shared codebook per layer in units of its channel scales."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import opq_core
from opq_core._codebook_grid import codebook_wins, fit_layer_codebook, fit_magnitudes
from opq_core.codebook import check_codebook, dequantize_codebook, fake_quant_codebook
from opq_core.format import read_opq, write_opq

DISTS = ("laplace", "gaussian", "student_t", "uniform")


def draw(rng, dist, shape):
    if dist == "laplace":
        x = rng.laplace(size=shape)
    elif dist == "gaussian":
        x = rng.normal(size=shape)
    elif dist == "student_t":
        x = rng.standard_t(3, size=shape)
    else:
        x = rng.uniform(-1, 1, size=shape)
    # channels of different scales, as in trained layers
    return (x * rng.uniform(0.2, 2.0, size=(shape[0], 1))).astype(np.float32)


def model(seed, dists=DISTS):
    rng = np.random.default_rng(seed)
    return {f"l{i}.{d}": draw(rng, d, (int(rng.integers(4, 24)), int(rng.integers(8, 60))))
            for i, d in enumerate(dists)}


def kept_error(w, dense, mask):
    d = (w.astype(np.float64) - dense.astype(np.float64))[mask]
    return float(np.dot(d, d))


def reference_scaled(w, mask, codebook, scale):
    """Obviously-correct scaled rule: count the midpoints strictly below w / s_r."""
    c = np.asarray(codebook, np.float64)
    mid = (c[:-1] + c[1:]) / 2.0
    x = np.asarray(w).astype(np.float64)
    s = np.asarray(scale, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    u = x / s
    idx = np.array([int(np.sum(mid < v)) for v in u.reshape(-1)], np.int64).reshape(x.shape)
    return np.where(mask, (s * c[idx]).astype(np.asarray(w).dtype), 0).astype(np.asarray(w).dtype)


# ---------------------------------------------------------------------------------------
# the kernels with channel scales
# ---------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 64),
       dtype=st.sampled_from([np.float32, np.float64]), rows=st.integers(1, 6),
       cols=st.integers(1, 30))
def test_scaled_kernel_equals_reference(seed, k, dtype, rows, cols):
    rng = np.random.default_rng(seed)
    w = (rng.laplace(size=(rows, cols)) * 3).astype(dtype)
    m = rng.random((rows, cols)) < 0.7
    cb = np.unique(rng.normal(size=k).astype(np.float32).astype(np.float64))
    cb = cb[cb != 0]
    s = rng.uniform(0.01, 5.0, rows).astype(np.float16).astype(np.float64)
    codes = np.zeros(w.shape, np.int16)
    got = fake_quant_codebook(w, m, cb, scale=s, codes=codes)
    assert np.array_equal(got, reference_scaled(w, m, cb, s))
    assert np.array_equal(dequantize_codebook(codes, cb, dtype, scale=s), got)


def test_scale_one_is_the_absolute_rule_and_bad_scales_are_named():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 7)).astype(np.float32)
    m = np.ones(w.shape, bool)
    cb = [-1.0, -0.25, 0.5, 2.0]
    assert np.array_equal(fake_quant_codebook(w, m, cb), fake_quant_codebook(w, m, cb, scale=np.ones(3)))
    with pytest.raises(ValueError, match=r"scale \(layer 'fc'\)\[1\] = 0.0 must be finite and > 0"):
        fake_quant_codebook(w, m, cb, scale=[1.0, 0.0, 1.0], name="fc")
    with pytest.raises(ValueError, match="one value per output channel"):
        fake_quant_codebook(w, m, cb, scale=[1.0, 2.0])


# ---------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------

def test_lloyd_levels_are_the_weighted_means_of_their_cells():
    rng = np.random.default_rng(2)
    a = np.abs(rng.laplace(size=3000))
    wt = rng.uniform(0.5, 2.0, a.size)
    c = fit_magnitudes(a, wt, 8)
    assert c.size == 8 and np.all(np.diff(c) > 0)
    cell = np.searchsorted((c[:-1] + c[1:]) / 2, a, side="left")
    for k in range(8):
        sel = cell == k
        assert c[k] == pytest.approx(np.sum(wt[sel] * a[sel]) / np.sum(wt[sel]), rel=1e-9)


def test_codebook_is_mirrored_float32_exact_and_fits_the_bits():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(16, 50))
    m = np.abs(w) > 0.3
    for bits in (1, 2, 3, 4, 8):
        cb = fit_layer_codebook(w, m, np.ones(16), bits)
        check_codebook(cb)
        assert cb.size <= 2 ** bits and np.array_equal(cb, -cb[::-1])
        assert np.array_equal(cb.astype(np.float32).astype(np.float64), cb)


def test_big_layer_is_fitted_on_a_bounded_sample():
    rng = np.random.default_rng(4)
    w = rng.laplace(size=(64, 2048))
    m = np.ones(w.shape, bool)
    a = fit_layer_codebook(w, m, np.ones(64), 3, sample=4096)
    b = fit_layer_codebook(w, m, np.ones(64), 3)
    assert a.size == b.size == 8
    np.testing.assert_allclose(a, b, rtol=0.1)  # a sample of 4096 already lands close


def test_auto_rule_counts_the_codebook_bits():
    assert codebook_wins(0.5, 1.0, 32 * 16, 10_000)
    assert not codebook_wins(0.99, 1.0, 32 * 16, 100)  # 5 extra bits per weight: no
    assert not codebook_wins(1.0, 1.0, 0, 100)
    assert not codebook_wins(0.0, 1.0, 32, 0)


# ---------------------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), bits=st.integers(2, 5),
       sparsity=st.sampled_from([0.0, 0.3, 0.7]),
       method=st.sampled_from(["opq", "global"]))
def test_auto_never_above_the_uniform_fitted_grid_on_the_same_kept_weights(seed, bits,
                                                                           sparsity, method):
    w = model(seed)
    base = opq_core.plan(w, sparsity=sparsity, bits=bits, method=method)
    auto = opq_core.plan(w, sparsity=sparsity, bits=bits, method=method, grid="auto")
    cb = opq_core.plan(w, sparsity=sparsity, bits=bits, method=method, grid="codebook")
    mb, ma, mc = base.masks(w), auto.masks(w), cb.masks(w)
    db, da = base.apply(w), auto.apply(w)
    assert auto.grid == "auto" and cb.grid == "codebook"
    for lp in auto.layers:
        n = lp.name
        assert np.array_equal(mb[n], ma[n]) and np.array_equal(mb[n], mc[n])
        eb, ea = kept_error(w[n], db[n], mb[n]), kept_error(w[n], da[n], ma[n])
        assert ea <= eb
        if lp.grid == "codebook":
            assert lp.rule_mask and ea < eb
            assert lp.predicted_error == pytest.approx(lp.pruning_error + ea, rel=1e-9, abs=1e-12)
        else:
            assert lp == base[n]
    assert {lp.grid for lp in cb.layers} == {"codebook"}


def test_codebook_wins_on_heavy_tails():
    rng = np.random.default_rng(5)
    w = {"fc": rng.standard_t(3, size=(128, 512)).astype(np.float32)}
    p = opq_core.plan(w, sparsity=0.5, bits=4, grid="auto")
    assert p["fc"].grid == "codebook"


def test_default_is_unchanged():
    w = model(6)
    p = opq_core.plan(w, sparsity=0.5, bits=3)
    assert p.layers == opq_core.plan(w, sparsity=0.5, bits=3, grid="offset").layers
    assert p.grid == "offset" and all(lp.grid == "offset" for lp in p.layers)
    assert all("rule_mask" not in d for d in p.to_dict()["layers"])
    with pytest.raises(ValueError, match="grid must be one of"):
        opq_core.plan(w, sparsity=0.5, grid="lloyd")


@pytest.mark.parametrize("grid", ["auto", "codebook"])
@pytest.mark.parametrize("rate", [6.0, 20.0])
def test_budget_counts_the_codebooks(grid, rate):
    w = model(7)
    p = opq_core.plan(w, rate=rate, grid=grid)
    assert p.success
    assert p.size_bits + sum(lp.side_bits for lp in p.layers) <= p.budget_bits
    if grid == "codebook":
        assert any(lp.grid == "codebook" for lp in p.layers)


def test_plan_json_round_trip():
    w = model(8)
    p = opq_core.plan(w, sparsity=0.5, bits=3, grid="codebook")
    q = opq_core.Plan.from_json(p.to_json())
    assert q == p and all(lp.rule_mask for lp in q.layers)
    for n, d in p.apply(w).items():
        assert np.array_equal(q.apply(w)[n], d)


# ---------------------------------------------------------------------------------------
# the file format
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["entropy", "packed"])
def test_format_round_trip_is_bit_exact(tmp_path, layout):
    w = model(9)
    p = opq_core.plan(w, sparsity=0.6, bits=3, grid="codebook")
    dense = p.apply(w)
    path = tmp_path / "m.opq"
    cf = write_opq(path, p, w, layout=layout)
    assert cf.compressed_bytes > 0
    f = read_opq(path)
    assert f.plan == p
    for n in p.names:
        assert np.array_equal(f.weights[n], dense[n])
        assert np.array_equal(f.masks[n], p.masks(w)[n])
    assert "codebook" in f.table()
