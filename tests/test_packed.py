"""Packed layers (opq_core._packed): bit-exact decode, the sparse low-bit matmul kernel
against the slow oracle in tests/reference.py, memory accounting, one-line errors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import opq_core
from opq_core._packed import MAX_BLOCKS, PackedLayer, pack_layer, packed_matmul
from opq_core.format import decode_layer, layer_codes, write_opq, read_opq

import reference as ref

CASES = [  # shape, sparsity, bits, grid
    ((8, 16), 0.75, 4, "offset"),
    ((13, 7), 0.5, 3, "symmetric"),
    ((5, 3, 3, 3), 0.9, 5, "offset"),
    ((6, 9), 0.0, 2, "offset"),
    ((20, 31), 0.95, 8, "symmetric"),
    ((9, 17), 0.6, 1, "offset"),
    ((4, 12), 0.3, 6, "codebook"),
]


def _layer(shape, sparsity, bits, grid, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=shape).astype(np.float32)
    p = opq_core.plan({"w": w}, sparsity=sparsity, bits=bits,
                      grid="offset" if grid == "codebook" else grid)
    lp = p.layers[0]
    m = p.masks({"w": w})["w"]
    if grid == "codebook":
        cb = np.unique(rng.normal(size=2 ** bits).astype(np.float32).astype(np.float64))
        lp = replace(lp, grid="codebook", codebook=cb[cb != 0])
    return lp, w, m, layer_codes(lp, w, m)


@pytest.mark.parametrize("shape,sparsity,bits,grid", CASES)
@pytest.mark.parametrize("index", ["auto", "bitmask", "gap"])
def test_decode_bit_exact_and_matmul_equals_oracle(shape, sparsity, bits, grid, index):
    lp, w, m, cd = _layer(shape, sparsity, bits, grid)
    want = decode_layer(lp, cd)
    rng = np.random.default_rng(1)
    for blocks in sorted({1, 2, shape[0]}):
        pl = pack_layer(lp, cd, m, index=index, blocks=blocks)
        assert pl.index == ("none" if lp.kept in (0, lp.n) else
                            pl.index if index == "auto" else index)
        got = pl.decode()
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
        assert np.array_equal(pl.mask(), m) and np.array_equal(pl.codes(), cd)
        for batch in (1, 3):
            x = rng.standard_normal((batch, pl.cols)).astype(np.float32)
            oracle = ref.packed_matmul(x, cd, lp.kernel_scale, lp.thresholds, lp.step, bits,
                                       grid, lp.codebook)
            for parallel in (False, True):
                y = packed_matmul(pl, x, parallel=parallel)
                assert y.dtype == np.float32 and y.shape == (batch, shape[0])
                assert np.array_equal(y, oracle), (blocks, batch, parallel)
        assert np.array_equal(packed_matmul(pl, x[0]), oracle[0])


def test_index_auto_is_the_cheaper_one_like_the_packed_file(tmp_path):
    from opq_core.kernels import mask_coding_cost
    for sparsity in (0.3, 0.97):
        lp, w, m, cd = _layer((40, 64), sparsity, 4, "offset")
        pl = pack_layer(lp, cd, m)
        cost = mask_coding_cost(m)
        assert pl.index == ("gap" if cost["gap"] < cost["bitmask"] else "bitmask")
        assert pl.index_bytes.nbytes == min(cost["gap"], cost["bitmask"])
        assert pl.code_bytes.nbytes == (lp.kept * 4 + 7) // 8
        # the payload is what the packed file stores (its scales at float16/32, ours float64)
        p = replace(opq_core.plan({"w": w}, sparsity=sparsity, bits=4), layers=(lp,))
        f = write_opq(tmp_path / f"{sparsity}.opq", p, {"w": w}, masks={"w": m}, layout="packed")
        rec = read_opq(tmp_path / f"{sparsity}.opq", decode=False).layers[0]
        assert rec.parts["mask"] == pl.index_bytes.nbytes
        assert rec.parts["codes"] == pl.code_bytes.nbytes
        assert pl.nbytes <= 1.2 * rec.nbytes + 32 * (min(40, MAX_BLOCKS) + 1) + 16 * 40
        del f


def test_empty_and_full_layers():
    lp, w, m, cd = _layer((6, 10), 0.5, 4, "offset")
    empty = replace(lp, kept=0)
    pl = pack_layer(empty, np.zeros_like(cd), np.zeros_like(m))
    assert pl.index == "none" and pl.kept == 0 and pl.code_bytes.size == 0
    x = np.ones((2, 10), np.float32)
    assert np.array_equal(packed_matmul(pl, x), np.zeros((2, 6), np.float32))
    assert np.array_equal(pl.decode(), np.zeros((6, 10), np.float32))


def test_float16_and_float64_layers_decode_bit_exact():
    for dt in (np.float16, np.float64):
        lp, w, m, cd = _layer((7, 11), 0.6, 4, "offset")
        lp = replace(lp, dtype=np.dtype(dt).name)
        pl = pack_layer(lp, cd, m)
        want = decode_layer(lp, cd)
        assert pl.decode().dtype == dt and np.array_equal(pl.decode(), want)


def test_errors_are_one_line_and_name_the_layer():
    lp, w, m, cd = _layer((6, 10), 0.5, 4, "offset")
    cases = [
        (lambda: pack_layer(lp, cd, m.astype(np.uint8)), "mask must be a bool"),
        (lambda: pack_layer(lp, cd, m[:, :5]), "shape (6, 10)"),
        (lambda: pack_layer(lp, cd.astype(np.float32), m), "codes must be an integer"),
        (lambda: pack_layer(replace(lp, kept=lp.kept + 1), cd, m), "the plan keeps"),
        (lambda: pack_layer(lp, cd, m | np.eye(6, 10, dtype=bool) | ~m), "mask keeps 60"),
        (lambda: pack_layer(lp, cd, m, index="rle"), "index must be"),
        (lambda: pack_layer(lp, cd, m, blocks=7), "blocks must be in 1..6"),
    ]
    for f, text in cases:
        with pytest.raises(ValueError) as ei:
            f()
        msg = str(ei.value)
        assert text in msg and "\n" not in msg
    pl = pack_layer(lp, cd, m)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 10\)"):
        packed_matmul(pl, np.ones((2, 9), np.float32))
    with pytest.raises(TypeError, match="x must be a float array"):
        packed_matmul(pl, np.ones((2, 10), np.int32))
    with pytest.raises(TypeError, match="layer must be a PackedLayer"):
        packed_matmul(lp, np.ones((2, 10), np.float32))
    cd2 = cd.copy()
    cd2[~m] = 1
    with pytest.raises(ValueError, match="must be nonzero exactly where the mask"):
        pack_layer(lp, cd2, m)


def test_repr_and_accounting():
    lp, w, m, cd = _layer((8, 16), 0.75, 4, "offset")
    pl = pack_layer(lp, cd, m)
    assert isinstance(pl, PackedLayer) and "sparsity=0.7500" in repr(pl)
    assert pl.nbytes == sum(a.nbytes for a in pl.arrays().values())
    assert pl.payload_bytes < pl.nbytes


def test_doctests():
    import doctest
    import opq_core._packed as P
    res = doctest.testmod(P, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("shape,sparsity,bits", [((3, 5003), 0.2, 4), ((2, 4801), 0.0, 4),
                                                 ((3, 4500), 0.3, 3), ((4, 4104), 0.1, 8)])
@pytest.mark.parametrize("index", ["bitmask", "gap"])
def test_rows_longer_than_a_chunk_match_the_oracle(shape, sparsity, bits, index):
    # rows of more kept weights than the kernel decodes per chunk (_CHUNK), rows that start
    # inside a byte of the bitmask (odd fan-in) and inside a byte of the symbol stream
    from opq_core._packed import _CHUNK
    lp, w, m, cd = _layer(shape, sparsity, bits, "offset", seed=3)
    assert m.sum(axis=1).max() > _CHUNK
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    oracle = ref.packed_matmul(x, cd, lp.kernel_scale, lp.thresholds, lp.step, bits, "offset")
    for blocks in (1, shape[0]):
        pl = pack_layer(lp, cd, m, index=index, blocks=blocks)
        for parallel in (False, True):
            assert np.array_equal(packed_matmul(pl, x, parallel=parallel), oracle)
            assert np.array_equal(packed_matmul(pl, x[1], parallel=parallel), oracle[1])
