"""The .opq container: exact round trips, accounting, and clear errors for bad files."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import replace

import numpy as np
import pytest

import opq_core
from opq_core.allocate import Plan
from opq_core.format import (CompressedFile, OpqFormatError, compress_weights, read_opq,
                             write_opq)


def _weights(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {"conv.weight": (0.1 * rng.laplace(size=(6, 3, 3, 3))).astype(dtype),
            "fc.weight": rng.laplace(size=(5, 40)).astype(dtype),
            "head.weight": (3.0 * rng.laplace(size=(4, 20))).astype(dtype)}


def _masks(weights, densities, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.random(w.shape) < d for (k, w), d in zip(weights.items(), densities)}


def _with_masks(p: Plan, masks) -> Plan:
    """The plan with its kept counts set to hand-made masks (the oracle then uses them)."""
    layers = tuple(replace(lp, kept=int(masks[lp.name].sum())) for lp in p.layers)
    return replace(p, layers=layers)


def _codebook_plan(p: Plan, bits: int, seed=2) -> Plan:
    rng = np.random.default_rng(seed)
    layers = []
    for lp in p.layers:
        k = int(rng.integers(1, 2 ** bits + 1))
        cb = np.unique(rng.normal(size=k).astype(np.float32).astype(np.float64))
        cb = cb[cb != 0]
        layers.append(replace(lp, grid="codebook", codebook=cb, bits=bits))
    return replace(p, layers=tuple(layers), grid="codebook")


def _equal_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("layout", ["entropy", "packed"])
@pytest.mark.parametrize("grid", ["offset", "symmetric", "codebook"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_is_bit_exact(tmp_path, bits, grid, layout):
    w = _weights(bits)
    # empty, fully kept and ordinary layers
    masks = _masks(w, [0.0, 1.0, 0.3], seed=bits)
    p = opq_core.plan(w, sparsity=0.5, bits=bits, grid="offset" if grid == "codebook" else grid)
    p = _with_masks(p, masks)
    if grid == "codebook":
        p = _codebook_plan(p, bits)
    other = {"fc.bias": np.arange(5, dtype=np.float32), "steps": np.array(7, dtype=np.int64)}
    path = tmp_path / "m.opq"
    written = write_opq(path, p, w, masks=masks, other=other, layout=layout)
    got = read_opq(path)
    ref = p.apply(w, masks=masks)
    assert got.plan == p
    assert got.layout == layout
    for name in p.names:
        assert _equal_bits(got.weights[name], ref[name]), name
        assert np.array_equal(got.masks[name], masks[name])
    assert set(got.other) == set(other)
    for k, v in other.items():
        assert got.other[k].dtype == v.dtype and np.array_equal(got.other[k], v)
    assert got.file_bytes == os.path.getsize(path) == written.file_bytes
    assert [r.to_dict() for r in got.layers] == [r.to_dict() for r in written.layers]
    codings = {r.name: r.mask_coding for r in got.layers}
    assert codings["conv.weight"] == "none" and codings["fc.weight"] == "none"
    assert codings["head.weight"] == ("entropy" if layout == "entropy" else "bitmask")
    assert {r.name: r.code_coding for r in got.layers}["conv.weight"] == "none"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("layout", ["entropy", "packed"])
def test_round_trip_other_dtypes_and_plan_masks(tmp_path, dtype, layout):
    w = _weights(3, dtype)
    p = opq_core.plan(w, sparsity=0.8, bits=3)
    path = tmp_path / "m.opq"
    write_opq(path, p, w, layout=layout)
    got = read_opq(path)
    ref = p.apply(w)
    for name in p.names:
        assert _equal_bits(got.weights[name], ref[name])
    assert got.other == {}


def test_gap_code_for_sparse_masks_and_codes_input(tmp_path):
    w = _weights(4)
    p = opq_core.plan(w, sparsity=0.97, bits=4, method="uniform")
    codes = compress_weights(w, p)
    path = tmp_path / "m.opq"
    write_opq(path, p, codes=codes, layout="packed")
    got = read_opq(path)
    assert {r.mask_coding for r in got.layers} == {"gap"}
    ref = p.apply(w)
    for name in p.names:
        assert _equal_bits(got.weights[name], ref[name])


def test_fine_tuned_weights_with_stored_masks(tmp_path):
    # masks fixed at planning time; the latent weights moved afterwards
    w = _weights(5)
    p = opq_core.plan(w, sparsity=0.6, bits=4)
    masks = p.masks(w)
    rng = np.random.default_rng(9)
    tuned = {k: v + 0.01 * rng.normal(size=v.shape).astype(v.dtype) for k, v in w.items()}
    path = tmp_path / "m.opq"
    write_opq(path, p, tuned, masks=masks)
    got = read_opq(path)
    ref = p.apply(tuned, masks=masks)
    for name in p.names:
        assert _equal_bits(got.weights[name], ref[name])


def test_accounting_rates(tmp_path):
    w = {"a.weight": np.random.default_rng(0).laplace(size=(64, 256)).astype(np.float32)}
    p = opq_core.plan(w, sparsity=0.9, bits=4)
    path = tmp_path / "m.opq"
    f = write_opq(path, p, w, other={"a.bias": np.zeros(64, np.float32)})
    n = 64 * 256
    assert f.paper_rate == pytest.approx(32 * n / (4 * p.kept))
    assert f.compressed_bytes == os.path.getsize(path) - f.other_bytes
    assert f.other_bytes >= 64 * 4
    assert f.storage_rate == pytest.approx(4 * n / f.compressed_bytes)
    assert sum(r.nbytes for r in f.layers) == f.compressed_bytes
    # the file is far smaller than float32 and than a packed layout
    g = write_opq(tmp_path / "p.opq", p, w, layout="packed")
    assert f.storage_rate > g.storage_rate > 1
    assert "storage" in f.table() and "a.weight" in repr(f)
    d = json.loads(json.dumps(f.to_dict()))
    assert d["layers"][0]["kept"] == p.kept


def test_metadata_round_trip(tmp_path):
    w = _weights()
    p = opq_core.plan(w, sparsity=0.5, bits=2)
    path = tmp_path / "m.opq"
    write_opq(path, p, w, metadata={"model": "tiny"})
    assert read_opq(path).metadata == {"model": "tiny"}
    info = read_opq(path, decode=False)
    assert isinstance(info, CompressedFile) and info.weights == {} and info.plan == p
    with pytest.raises(TypeError, match="metadata"):
        write_opq(path, p, w, metadata={"x": 1})


def test_file_is_valid_safetensors(tmp_path):
    from safetensors import safe_open
    w = _weights()
    p = opq_core.plan(w, sparsity=0.5, bits=4)
    path = tmp_path / "m.opq"
    write_opq(path, p, w, other={"b": np.ones(3, np.float32)})
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["format"] == "opq"
        assert np.array_equal(f.get_tensor("b"), np.ones(3, np.float32))
        assert "opq/fc.weight" in f.keys()


# ---------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    w = _weights()
    p = opq_core.plan(w, sparsity=0.7, bits=4)
    path = tmp_path / "m.opq"
    write_opq(path, p, w, other={"fc.bias": np.ones(5, np.float32)})
    return path, w, p


def test_flipped_byte_anywhere_is_refused(good_file, tmp_path):
    path, _, _ = good_file
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    positions = sorted(set([9, 20, len(data) // 2, len(data) - 1]
                           + rng.integers(8, len(data), 12).tolist()))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        q = tmp_path / f"bad{pos}.opq"
        q.write_bytes(bytes(bad))
        with pytest.raises(OpqFormatError, match="corrupt|not a .opq|truncated|version"):
            read_opq(q)


def test_truncated_file_is_refused(good_file, tmp_path):
    path, _, _ = good_file
    data = path.read_bytes()
    for cut in (0, 4, 8, 30, len(data) // 2, len(data) - 1):
        q = tmp_path / f"cut{cut}.opq"
        q.write_bytes(data[:cut])
        with pytest.raises(OpqFormatError, match="truncated|not a .opq"):
            read_opq(q)


def test_newer_version_and_foreign_file_are_refused(good_file, tmp_path):
    path, _, _ = good_file
    data = path.read_bytes()
    q = tmp_path / "v9.opq"
    q.write_bytes(data.replace(b'"version":"1"', b'"version":"9"', 1))
    with pytest.raises(OpqFormatError, match="version 9.*newer"):
        read_opq(q)
    from safetensors.numpy import save_file
    s = tmp_path / "plain.safetensors"
    save_file({"x": np.ones(3, np.float32)}, str(s))
    with pytest.raises(OpqFormatError, match="not a .opq"):
        read_opq(s)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_opq(tmp_path / "missing.opq")


def test_failed_write_keeps_previous_file(good_file):
    path, w, p = good_file
    before = path.read_bytes()
    folder = sorted(os.listdir(path.parent))

    class Boom(dict):
        def __getitem__(self, k):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_opq(path, p, w, other=Boom({"fc.bias": None}))
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == folder
    read_opq(path)


def test_other_model_is_refused(good_file, tmp_path):
    path, w, p = good_file
    other = dict(w)
    other["fc.weight"] = np.zeros((5, 41), np.float32)
    with pytest.raises(ValueError, match=r"fc.weight.*shape \(5, 41\).*\(5, 40\)"):
        write_opq(tmp_path / "x.opq", p, other)
    del other["fc.weight"]
    with pytest.raises(ValueError, match="fc.weight.*missing"):
        write_opq(tmp_path / "x.opq", p, other)


def test_bad_arguments(good_file, tmp_path):
    path, w, p = good_file
    with pytest.raises(ValueError, match="layout.*'zip'"):
        write_opq(tmp_path / "x.opq", p, w, layout="zip")
    with pytest.raises(ValueError, match="weights= .*or codes="):
        write_opq(tmp_path / "x.opq", p)
    with pytest.raises(TypeError, match="plan"):
        write_opq(tmp_path / "x.opq", {"a": 1}, w)
    bad = p.masks(w)
    bad["fc.weight"] = ~bad["fc.weight"]
    with pytest.raises(ValueError, match="fc.weight.*keeps"):
        write_opq(tmp_path / "x.opq", p, w, masks=bad)
    with pytest.raises(ValueError, match="other.*fc.weight"):
        write_opq(tmp_path / "x.opq", p, w, other={"fc.weight": w["fc.weight"]})
    assert not (tmp_path / "x.opq").exists()


def test_header_length_lie_is_refused(good_file, tmp_path):
    path, _, _ = good_file
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10 ** 12)
    q = tmp_path / "lie.opq"
    q.write_bytes(bytes(data))
    with pytest.raises(OpqFormatError, match="truncated"):
        read_opq(q)


def test_other_tensors_are_read_once(tmp_path):
    """Shapes and dtypes come from metadata; each other tensor's data is read once."""
    from collections import Counter
    from collections.abc import Mapping

    rng = np.random.default_rng(3)
    w = {"fc.weight": rng.laplace(size=(16, 32)).astype(np.float32)}
    other = {"fc.bias": rng.normal(size=16).astype(np.float32),
             "bn.steps": np.arange(3, dtype=np.int64)}
    reads = Counter()

    class Counting(Mapping):
        def __getitem__(self, name):
            reads[name] += 1
            return other[name]

        def __iter__(self):
            return iter(other)

        def __len__(self):
            return len(other)

        def tensor_info(self, name):
            return other[name].shape, other[name].dtype

    p = opq_core.plan(w, sparsity=0.5)
    write_opq(tmp_path / "m.opq", p, w, other=Counting())
    assert reads == Counter({"fc.bias": 1, "bn.steps": 1})
    back = read_opq(tmp_path / "m.opq")
    for k, v in other.items():
        assert np.array_equal(back.other[k], v) and back.other[k].dtype == v.dtype
