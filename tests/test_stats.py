import numpy as np
import pytest

from opq_core.stats import layer_stats


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_channel_scales(dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 2, 2)).astype(dtype)
    s = layer_stats("conv", w)
    ref = np.abs(w.astype(np.float64)).reshape(6, -1).mean(axis=1)
    np.testing.assert_allclose(s.channel_scale, ref, rtol=1e-12)
    assert s.scale == pytest.approx(np.abs(w.astype(np.float64)).mean(), rel=1e-12)


def test_non_contiguous_and_large():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 500)).astype(np.float32).T  # non-contiguous, parallel path
    s = layer_stats("fc", w)
    np.testing.assert_allclose(s.channel_scale, np.abs(w.astype(np.float64)).mean(axis=1), rtol=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_layer_and_index(bad):
    w = np.ones((3, 4), np.float32)
    w[2, 1] = bad
    with pytest.raises(ValueError, match=r"'layer3'.*index \(2, 1\)"):
        layer_stats("layer3", w)


def test_integer_rejected():
    with pytest.raises(TypeError, match="'fc'.*int64"):
        layer_stats("fc", np.ones((2, 2), np.int64))


def test_all_zero_layer():
    s = layer_stats("z", np.zeros((4, 5), np.float32))
    assert s.scale == 0.0 and not s.channel_scale.any()
