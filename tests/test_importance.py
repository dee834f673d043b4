"""plan(importance=): the weighted OPQ rule g_c h_j (w^2 - q_c) < lam."""
from __future__ import annotations

import dataclasses
import itertools
import warnings

import numpy as np
import pytest

import opq_core
from opq_core._importance import weight_importance, weighted_scores
from opq_core.format import read_opq, write_opq


def _untimed(p):
    return dataclasses.replace(p, stats_seconds=0.0, solve_seconds=0.0, select_seconds=0.0)


def _weights(rng, shapes):
    return {f"l{i}": rng.laplace(size=s) * rng.uniform(0.2, 2.0) for i, s in enumerate(shapes)}


def _random_importance(rng, w, both=True):
    imp = {}
    for name, a in w.items():
        g = rng.uniform(0.05, 4.0, a.shape[0])
        h = rng.uniform(0.05, 4.0, a.shape[1]) if both else None
        imp[name] = (g, h)
    return imp


SHAPES = [(6, 5), (4, 3, 3, 3), (3, 7)]


@pytest.mark.parametrize("kw", [dict(sparsity=0.7, bits=4), dict(sparsity=0.5, bits=3, grid="symmetric"),
                                dict(sparsity=0.6, bits=4, error_model="empirical"),
                                dict(rate=12), dict(rate=9, method="global")])
def test_all_ones_is_the_unweighted_plan(kw):
    rng = np.random.default_rng(1)
    w = _weights(rng, SHAPES)
    ones = {n: (np.ones(a.shape[0]), np.ones(a.shape[1])) for n, a in w.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = opq_core.plan(w, **kw)
        p1 = opq_core.plan(w, importance=ones, **kw)
    assert _untimed(p0) == _untimed(p1)
    assert p0.to_dict()["layers"] == p1.to_dict()["layers"]


def test_constant_importance_keeps_the_masks_and_scales_lam():
    # the weighted code path with every weight x 3 is the unweighted problem in other units
    rng = np.random.default_rng(2)
    w = _weights(rng, SHAPES)
    c = {n: (np.full(a.shape[0], 3.0), None) for n, a in w.items()}
    p0 = opq_core.plan(w, sparsity=0.6, bits=4)
    p1 = opq_core.plan(w, sparsity=0.6, bits=4, importance=c)
    m0, m1 = p0.masks(w), p1.masks(w)
    for n in w:
        np.testing.assert_array_equal(m0[n], m1[n])
    assert p1.lam == pytest.approx(3.0 * p0.lam, rel=1e-12)


def _weighted_score_table(p, w):
    return {lp.name: weighted_scores(w[lp.name], lp.score_q, lp.channel_scale,
                                     lp.importance_out, lp.importance_in) for lp in p.layers}


@pytest.mark.parametrize("seed", range(6))
def test_sparsity_masks_minimize_the_weighted_objective(seed):
    rng = np.random.default_rng(seed)
    w = {"a": rng.laplace(size=(2, 3)), "b": 0.3 * rng.laplace(size=(2, 2, 1, 2))}
    imp = _random_importance(rng, w)
    p = opq_core.plan(w, sparsity=0.5, bits=3, importance=imp)
    sc = _weighted_score_table(p, w)
    flat = np.concatenate([sc[n] for n in w])
    masks = p.masks(w)
    pruned = ~np.concatenate([masks[n].reshape(-1) for n in w])
    k = int(pruned.sum())
    assert k == round(0.5 * flat.size)
    got = float(flat[pruned].sum())
    best = min(float(flat[list(c)].sum()) for c in itertools.combinations(range(flat.size), k))
    assert got == pytest.approx(best, rel=1e-12, abs=1e-12)
    # the global rule: every pruned score <= lam <= every kept score
    assert flat[pruned].max() <= p.lam <= flat[~pruned].min()


@pytest.mark.parametrize("seed", range(6))
def test_budget_masks_minimize_the_weighted_objective(seed):
    rng = np.random.default_rng(10 + seed)
    w = {"a": rng.laplace(size=(2, 4)), "b": 0.5 * rng.laplace(size=(2, 2, 1, 2))}
    imp = _random_importance(rng, w)
    bits = 3
    S = 3 * 5 + 1  # room for 5 weights
    p = opq_core.plan(w, budget_bits=S, bits=bits, importance=imp)
    assert p.size_bits <= S
    sc = _weighted_score_table(p, w)
    names = list(w)
    flat = np.concatenate([sc[n] for n in names])
    layer_of = np.concatenate([np.full(sc[n].size, i) for i, n in enumerate(names)])
    masks = p.masks(w)
    kept = np.concatenate([masks[n].reshape(-1) for n in names])
    # objective: sum_pruned g h w^2 + sum_kept g h q = const - sum_kept score
    got = float(flat[kept].sum())
    best = -np.inf
    for r in range(1, S // bits + 1):
        for c in itertools.combinations(range(flat.size), r):
            if len(set(layer_of[list(c)])) < len(names):  # at least one weight per layer
                continue
            best = max(best, float(flat[list(c)].sum()))
    assert got == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_weighted_rule_differs_and_reproduces_through_json_and_file(tmp_path):
    rng = np.random.default_rng(3)
    w = _weights(rng, SHAPES)
    imp = _random_importance(rng, w)
    p0 = opq_core.plan(w, sparsity=0.7, bits=4)
    p = opq_core.plan(w, sparsity=0.7, bits=4, importance=imp)
    assert p.kept == p0.kept
    masks = p.masks(w)
    assert any(not np.array_equal(masks[n], p0.masks(w)[n]) for n in w)
    q = opq_core.Plan.from_json(p.to_json())
    assert q == p
    for n in w:
        np.testing.assert_array_equal(q.masks(w)[n], masks[n])
        lp = p[n]
        # every kept weight lies at or above its channel's offset-grid threshold
        m = masks[n].reshape(lp.channels, -1)
        a = np.abs(w[n]).reshape(lp.channels, -1)
        assert np.all((a >= lp.thresholds[:, None] * (1 - 1e-12)) | ~m)
    dense = p.apply(w)
    f = tmp_path / "m.opq"
    write_opq(f, p, w)
    cf = read_opq(f)
    for n in w:
        np.testing.assert_array_equal(cf.masks[n], masks[n])
        np.testing.assert_array_equal(cf.weights[n], dense[n])
    # a plan read back relies on its stored masks
    with pytest.raises(ValueError, match="stored mask"):
        cf.plan.masks(w)
    np.testing.assert_array_equal(cf.plan.apply(w, masks=cf.masks)["l0"], dense["l0"])


def test_weight_importance_repeats_inputs_over_kernel_positions():
    g = np.array([1.0, 2.0])
    h = np.array([3.0, 5.0])
    m = weight_importance((2, 2, 1, 2), g, h)
    np.testing.assert_array_equal(m, [[3, 3, 5, 5], [6, 6, 10, 10]])


@pytest.mark.parametrize("bad, match", [
    ({"nope": (None, None)}, "not a compressed layer"),
    ({"l0": (np.ones(5), None)}, "out must be a 1-D array of 6"),
    ({"l0": (None, np.zeros(5))}, r"in\[0\] = 0.0 must be finite and > 0"),
    ({"l0": {"outs": np.ones(6)}}, "unknown keys"),
    ({"l0": np.ones(6)}, "expected a pair"),
])
def test_bad_importance_is_refused(bad, match):
    w = _weights(np.random.default_rng(0), SHAPES)
    with pytest.raises((ValueError, TypeError), match=match):
        opq_core.plan(w, sparsity=0.5, importance=bad)


def test_uniform_refuses_importance():
    w = _weights(np.random.default_rng(0), SHAPES)
    with pytest.raises(ValueError, match="uniform"):
        opq_core.plan(w, sparsity=0.5, method="uniform", importance={"l0": (np.full(6, 2.0), None)})
