"""Closed forms of the Laplace error model against Monte Carlo and the empirical model."""
import numpy as np
import pytest

from opq_core import error_model as em

N_MC = 1_000_000


def _tol(values, value):
    """2 % of the value, or 4 Monte Carlo standard errors where the clipped tail is too
    rare at n = 10^6 to pin the mean down to 2 % (high bit-widths, large thresholds)."""
    se = float(np.std(values) / np.sqrt(values.size))
    return max(0.02 * abs(value), 4.0 * se)


def _sq_err(x, bits, d, grid):
    K = em.levels(bits)
    if grid == "offset":
        k = np.clip(np.floor(x / d) + 1.0, 1.0, K)
        return (x - (k - 0.5) * d) ** 2
    k = np.clip(np.rint(x / d), 1.0, K)
    return (x - k * d) ** 2


@pytest.fixture(scope="module")
def laplace_abs():
    rng = np.random.default_rng(12345)
    return np.abs(rng.laplace(0.0, 1.0, N_MC))


@pytest.mark.parametrize("t", [0.05, 0.3, 1.0, 2.0, 3.5])
def test_pruning_terms_match_monte_carlo(laplace_abs, t):
    u = laplace_abs
    frac_mc = np.mean(u < t)
    err_mc = np.mean(np.where(u < t, u * u, 0.0))
    assert em.pruned_fraction(t) == pytest.approx(frac_mc, rel=0.02)
    assert em.pruning_error(t) == pytest.approx(err_mc, rel=0.02)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("t", [0.0, 0.5, 1.5, 3.0])
def test_offset_error_matches_monte_carlo(laplace_abs, bits, t):
    kept = laplace_abs[laplace_abs > t]
    d = em.optimal_step(bits)
    e = _sq_err(kept - t, bits, d, "offset")
    mc = em.empirical_quant_error(kept - t, bits, d, "offset")
    assert mc == pytest.approx(e.mean(), rel=1e-9)
    assert em.offset_error(bits, d) == pytest.approx(mc, abs=_tol(e, mc))
    # memorylessness: the same error whatever t is
    assert em.quantization_constant(bits) == pytest.approx(em.offset_error(bits, d), rel=1e-12)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("t", [0.0, 0.5, 1.5, 3.0])
def test_symmetric_error_matches_monte_carlo(laplace_abs, bits, t):
    kept = laplace_abs[laplace_abs > t]
    d = em.optimal_step(bits, "symmetric", t)
    e = _sq_err(kept, bits, d, "symmetric")
    mc = em.empirical_quant_error(kept, bits, d, "symmetric")
    assert mc == pytest.approx(e.mean(), rel=1e-9)
    assert em.symmetric_error(bits, d, t) == pytest.approx(mc, abs=_tol(e, mc))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("grid,t", [("offset", 0.0), ("symmetric", 0.0), ("symmetric", 1.0)])
def test_empirical_model_equals_closed_form_on_laplace(laplace_abs, bits, grid, t):
    kept = laplace_abs[laplace_abs > t]
    x = kept - t if grid == "offset" else kept
    d_emp, q_emp = em.empirical_optimal_step(x, bits, grid)
    q = em.quantization_constant(bits, grid, t)
    e = _sq_err(x, bits, em.optimal_step(bits, grid, t), grid)
    assert q_emp == pytest.approx(q, abs=_tol(e, q))
    # the empirical optimum is at least as good on its own data as the model's step
    assert q_emp <= e.mean() * (1 + 1e-9)


def test_known_constants_and_monotone_in_bits():
    # values quoted in the design (computed, not hard-coded in the library)
    expect = {2: (1.538, 0.393), 3: (1.034, 0.144), 4: (0.652, 0.0507),
              5: (0.396, 0.0174), 8: (0.0776, 0.0006)}
    for b, (d, c) in expect.items():
        assert em.optimal_step(b) == pytest.approx(d, abs=2e-3)
        assert em.quantization_constant(b) == pytest.approx(c, rel=0.02, abs=5e-5)
    cs = [em.quantization_constant(b) for b in range(1, 9)]
    assert all(a > b for a, b in zip(cs, cs[1:]))


def test_optimal_step_is_a_minimum():
    for b in range(1, 9):
        d = em.optimal_step(b)
        q = em.offset_error(b, d)
        assert q <= em.offset_error(b, d * 1.01) and q <= em.offset_error(b, d * 0.99)


def test_pruning_error_limits():
    assert em.pruning_error(0.0) == 0.0
    assert em.pruning_error(1e-6) == pytest.approx(1e-18 / 3, rel=1e-3)  # ~t^3/3, no cancellation
    assert em.pruning_error(60.0) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [0, 9, 2.5, True, -1])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        em.optimal_step(bad)
