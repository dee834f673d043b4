"""The codebook (ANNC) quantizer against a plain NumPy reference, bit for bit."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opq_core.codebook import (CODE_DTYPE, check_codebook, codebook_codes, dequantize_codebook,
                               fake_quant_codebook, midpoints)


def reference(w, mask, codebook):
    """Obviously-correct rule: count the float64 midpoints strictly below float64(w)."""
    c = np.asarray(codebook, np.float64)
    mid = (c[:-1] + c[1:]) / 2.0
    x = np.asarray(w).astype(np.float64)
    idx = np.array([int(np.sum(mid < v)) for v in x.reshape(-1)], np.int64).reshape(x.shape)
    out = np.where(mask, c[idx].astype(np.asarray(w).dtype), 0).astype(np.asarray(w).dtype)
    codes = np.where(mask, idx + 1, 0).astype(np.int16)
    return out, codes


def f32_codebook(rng, k):
    c = np.unique(rng.normal(size=k).astype(np.float32).astype(np.float64))
    return c[c != 0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 256), dtype=st.sampled_from([np.float32, np.float64]),
       rows=st.integers(1, 9), cols=st.integers(1, 40))
def test_equals_reference(seed, k, dtype, rows, cols):
    rng = np.random.default_rng(seed)
    c = f32_codebook(rng, k)
    w = rng.normal(size=(rows, cols)).astype(dtype)
    # put some weights exactly on midpoints and on centroids
    mid = midpoints(c)
    if mid.size:
        flat = w.reshape(-1)
        for j in range(0, flat.size, 3):
            flat[j] = mid[rng.integers(mid.size)]
    w.reshape(-1)[1::5] = c[rng.integers(c.size, size=w.reshape(-1)[1::5].size)]
    mask = rng.random(w.shape) < 0.7
    codes = np.zeros(w.shape, CODE_DTYPE)
    out = fake_quant_codebook(w, mask, c, codes=codes)
    ref_out, ref_codes = reference(w, mask, c)
    assert out.dtype == w.dtype
    assert np.array_equal(out, ref_out)
    assert np.array_equal(codes, ref_codes)
    assert np.array_equal(codebook_codes(w, mask, c), ref_codes)
    assert np.array_equal(dequantize_codebook(codes, c, dtype), out)
    # pruned are exactly 0, kept lie on the codebook
    assert np.all(out[~mask] == 0)
    assert np.all(np.isin(out[mask].astype(np.float64), c.astype(dtype).astype(np.float64)))


def test_midpoint_goes_to_the_lower_centroid():
    c = np.array([-1.0, 0.5, 2.0])
    w = np.array([-0.25, 1.25, 1.2500001, -0.2500001])
    out = fake_quant_codebook(w, np.ones(4, bool), c)
    assert out.tolist() == [-1.0, 0.5, 2.0, -1.0]


def test_float32_midpoint_decided_in_float64():
    # two float32 centroids whose float64 midpoint is not a float32: neighbours round right
    c = np.array([1.0, float(np.nextafter(np.float32(1.0), np.float32(2.0)))])
    m = (c[0] + c[1]) / 2
    w = np.array([np.float32(c[0]), np.float32(c[1])], np.float32)
    out = fake_quant_codebook(w, np.ones(2, bool), c)
    assert out.tolist() == [c[0], c[1]] and m not in out


def test_parallel_path_and_inplace():
    rng = np.random.default_rng(1)
    c = f32_codebook(rng, 16)
    w = rng.normal(size=(300, 400)).astype(np.float32)   # >= PARALLEL_MIN_SIZE
    mask = rng.random(w.shape) < 0.5
    ref, ref_codes = reference(w, mask, c)
    got = fake_quant_codebook(w, mask, c)
    assert np.array_equal(got, ref)
    w2 = w.copy()
    res = fake_quant_codebook(w2, mask, c, out=w2)
    assert res is w2 and np.array_equal(w2, ref)


def test_non_contiguous_and_out_view():
    rng = np.random.default_rng(2)
    c = np.array([-0.5, 0.25, 1.0])
    big = rng.normal(size=(6, 10))
    w = big[:, ::2]
    mask = np.ones(w.shape, bool)
    ref, _ = reference(w, mask, c)
    assert np.array_equal(fake_quant_codebook(w, mask, c), ref)
    out = np.zeros((6, 10))[:, ::2]
    fake_quant_codebook(w, mask, c, out=out)
    assert np.array_equal(out, ref)


def test_empty_and_one_element():
    c = np.array([0.5])
    assert fake_quant_codebook(np.zeros((0, 3), np.float32), np.zeros((0, 3), bool), c).shape == (0, 3)
    assert fake_quant_codebook(np.array([7.0]), np.array([True]), c).tolist() == [0.5]


@pytest.mark.parametrize("cb, msg", [
    ([], "1..256"), ([0.0, 1.0], "non-zero"), ([1.0, 1.0], "strictly increasing"),
    ([2.0, 1.0], "strictly increasing"), ([np.nan], "finite"), (np.ones((2, 2)), "1-D"),
    (list(range(1, 258)), "1..256"), (["a"], "real"),
])
def test_bad_codebooks(cb, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        fake_quant_codebook(np.ones(2), np.ones(2, bool), cb, name="fc")


def test_bad_inputs_name_argument_and_layer():
    c = [0.5]
    with pytest.raises(ValueError, match=r"w \(layer 'fc'\).*nan.*\(1,\)"):
        fake_quant_codebook(np.array([1.0, np.nan]), np.array([True, True]), c, name="fc")
    # a NaN that is pruned is fine
    assert fake_quant_codebook(np.array([1.0, np.nan]), np.array([True, False]), c).tolist() == [0.5, 0.0]
    with pytest.raises(TypeError, match="mask.*bool"):
        fake_quant_codebook(np.ones(2), np.ones(2), c)
    with pytest.raises(ValueError, match="mask.*shape"):
        fake_quant_codebook(np.ones(2), np.ones(3, bool), c)
    with pytest.raises(TypeError, match="float32 or float64"):
        fake_quant_codebook(np.ones(2, np.int32), np.ones(2, bool), c)
    with pytest.raises(TypeError, match="int16"):
        fake_quant_codebook(np.ones(2), np.ones(2, bool), c, codes=np.zeros(2, np.int8))
    with pytest.raises(ValueError, match=r"codes.*3.*outside 0..2"):
        dequantize_codebook(np.array([0, 1, 3], np.int16), [0.5, 1.0])
    assert check_codebook([1, 2]).dtype == np.float64


def test_dequantize_dtypes():
    c = [-0.1, 0.3]
    codes = np.array([[0, 1], [2, 0]], np.int16)
    for dt in (np.float16, np.float32, np.float64):
        out = dequantize_codebook(codes, c, dt)
        assert out.dtype == dt and out.shape == (2, 2)
        assert out[0, 1] == np.asarray(-0.1).astype(dt)
