"""The branch-free gap code against the NumPy oracle: densities from empty to full, runs of
pruned entries that cross parallel blocks, gaps of 1..4 varint bytes."""
from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from opq_core import kernels as K
from opq_core.kernels._common import _BLOCK


@pytest.mark.parametrize("density", [0.0, 1e-5, 0.01, 0.1, 0.55, 0.97, 1.0])
def test_gap_code_matches_the_oracle(density):
    rng = np.random.default_rng(int(density * 1000))
    n = 5 * _BLOCK + 123  # several blocks, the last one short
    m = rng.random(n) < density
    if 0.0 < density < 1.0:
        m[_BLOCK - 3:3 * _BLOCK + 7] = False  # a run over two block boundaries (3 bytes)
        m[3 * _BLOCK + 7] = True               # kept right after it
        m[4 * _BLOCK - 1] = True               # kept at a block's last entry
        m[4 * _BLOCK - 200:4 * _BLOCK - 1] = False  # a 2-byte gap ending there
    gap = K.gap_encode(m)
    assert np.array_equal(gap, ref.gap_encode(m))
    assert K.mask_coding_cost(m).gap == gap.size
    assert np.array_equal(K.gap_decode(gap, n), m)


def test_gap_code_of_a_four_byte_gap():
    n = (1 << 21) + 10
    m = np.zeros(n, bool)
    m[[0, n - 1]] = True
    gap = K.gap_encode(m)
    assert np.array_equal(gap, ref.gap_encode(m)) and gap.size == 1 + 4
    assert np.array_equal(K.gap_decode(gap, n), m)
