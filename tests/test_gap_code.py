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


def test_gap_code_of_every_word_pattern_after_every_kind_of_gap():
    """Each of the 256 patterns of an 8-entry word, led by gaps of 0..7, 126..129 and
    16383..16385 (one to three varint bytes), packed into blocks so that words sit next to
    a block's end, where the writer has no room for its unconditional stores."""
    rng = np.random.default_rng(15)
    parts = []
    leads = [0, 1, 7, 126, 127, 128, 129, 16383, 16384, 16385]
    for p in rng.permutation(256):
        word = np.array([(p >> t) & 1 for t in range(8)], bool)
        lead = int(rng.choice(leads[:3] if rng.random() < 0.8 else leads[3:]))
        parts += [np.zeros(lead, bool), word]
    m = np.concatenate(parts)
    assert m.size > 3 * _BLOCK
    for shift in (0, 1, 5, 8, 8 * 1001 + 3):  # words at other offsets against the blocks
        mm = np.concatenate([np.zeros(shift, bool), m, np.ones(3, bool)])
        gap = K.gap_encode(mm)
        assert np.array_equal(gap, ref.gap_encode(mm)), shift
        assert K.mask_coding_cost(mm).gap == gap.size
        assert np.array_equal(K.gap_decode(gap, mm.size), mm)
    dense = np.ones(2 * _BLOCK + 5, bool)  # blocks with no slack at all
    dense[_BLOCK - 1] = False
    assert np.array_equal(K.gap_encode(dense), ref.gap_encode(dense))
