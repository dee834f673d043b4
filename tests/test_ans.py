"""The entropy-layout decoder of opq_core._ans against constriction (the encoder of the
streams), and the one-pass layer decode against the general path, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import opq_core
from opq_core import _ans
from opq_core._container import _PREFIX
from opq_core._codec import _bernoulli_byte_probs, _decode_layer_blob, decode_layer
from opq_core.format import OpqFormatError, OpqStream, read_opq, write_opq

constriction = pytest.importorskip("constriction")
_Coder = constriction.stream.stack.AnsCoder


def _model(p):
    return constriction.stream.model.Categorical(np.asarray(p, np.float64), perfect=False)


def _starts_by_constriction(p):
    """Symbol s's first quantile, read off constriction: encoding s alone into an empty
    coder leaves exactly that as the state."""
    m = _model(p)
    out = []
    for s in range(len(p)):
        c = _Coder()
        c.encode_reverse(np.array([s], np.int32), m)
        w = c.get_compressed()
        assert w.size <= 1
        out.append(int(w[0]) if w.size else 0)
    return out


def _tables():
    rng = np.random.default_rng(7)
    t = [_bernoulli_byte_probs(k, n) for k, n in
         ((1, 10 ** 6), (5, 7), (10 ** 6 - 1, 10 ** 6), (1, 3), (123456, 234567), (1, 2 ** 40))]
    t += [rng.random(16), rng.integers(0, 1000, 16).astype(float),
          np.r_[rng.integers(0, 1 << 20, 15), 0].astype(float), rng.random(256) ** 8,
          np.r_[1e-300, np.ones(15)], np.r_[np.zeros(15), 5.0], np.r_[2.0 ** 33, np.ones(15)],
          np.array([0.0, 1.0]), np.array([3.0, 1e-9])]
    return t


@pytest.mark.parametrize("k", range(len(_tables())))
def test_model_and_streams_match_constriction(k):
    p = _tables()[k]
    cdf = _ans.categorical_cdf(p)
    assert cdf[-1] == 1 << 24 and np.all(np.diff(cdf.astype(np.int64)) >= 1)
    assert cdf[:-1].tolist() == _starts_by_constriction(p)
    rng = np.random.default_rng(k)
    q = (p + 1e-3 * p.max()) / (p + 1e-3 * p.max()).sum()
    for count in (0, 1, 7, 5000):
        sym = rng.choice(p.size, size=count, p=q).astype(np.int32)
        c = _Coder()
        c.encode_reverse(sym, _model(p))
        words = c.get_compressed()
        got, status = _ans.decode_symbols(words, cdf, count)
        assert got.tolist() == sym.tolist() and status == 0
        if count:  # one symbol short: the same verdict on the coder's end as constriction's
            got, status = _ans.decode_symbols(words, cdf, count - 1)
            ref = _Coder(words)
            assert got.tolist() == ref.decode(_model(p), count - 1).tolist()
            assert (status == 0) == ref.is_empty()
        # random words (not a stream): the same symbols and verdict as constriction
        junk = rng.integers(1, 1 << 32, size=3, dtype=np.uint64).astype(np.uint32)
        ref = _Coder(junk)
        got, status = _ans.decode_symbols(junk, cdf, 40)
        assert got.tolist() == ref.decode(_model(p), 40).tolist()
        assert (status == 0) == ref.is_empty()


def test_a_stream_ending_in_a_zero_word_is_refused():
    cdf = _ans.categorical_cdf(np.ones(16))
    with pytest.raises(Exception):
        _Coder(np.array([3, 0], np.uint32))
    assert _ans.decode_symbols(np.array([3, 0], np.uint32), cdf, 1)[1] == 2


def test_categorical_cdf_refuses_what_constriction_refuses():
    for bad in ([1.0], [0.0, 0.0], [1.0, -1.0], [1.0, np.nan], [np.inf, 1.0]):
        with pytest.raises(ValueError):
            _ans.categorical_cdf(np.array(bad))


def _layers(seed, huge=1e30, tiny=1e-30):
    rng = np.random.default_rng(seed)
    w = {"dw.weight": rng.laplace(size=(16, 1, 3, 3)),          # rows of 9 (< a byte)
         "odd.weight": rng.laplace(size=(7, 13)),                # n not a multiple of 8
         "fc.weight": rng.laplace(size=(40, 300)) * rng.uniform(1e-2, 1e2, (40, 1)),
         "tiny.weight": rng.laplace(size=(3, 5)) * tiny,
         "big.weight": rng.laplace(size=(2, 64)) * huge,
         "edge.weight": np.r_[np.zeros(50), -np.zeros(50), np.full(28, 0.5)].reshape(4, 32)}
    return {k: v.astype(np.float32) for k, v in w.items()}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.filterwarnings("ignore:plan")
def test_one_pass_decode_equals_the_general_path(tmp_path, monkeypatch, bits, sparsity, dtype):
    import opq_core._codec as codec
    general = []  # layers the one-pass decoder left to the general path
    blob_decoder = codec._decode_layer_blob
    monkeypatch.setattr(codec, "_decode_layer_blob",
                        lambda lp, *a, **k: (general.append(lp.name), blob_decoder(lp, *a, **k))[1])
    small = dtype == np.float16
    w = {k: v.astype(dtype) for k, v in _layers(bits, *((10.0, 1e-3) if small else ())).items()}
    p = opq_core.plan(w, sparsity=sparsity, bits=bits)
    f = tmp_path / "m.opq"
    write_opq(f, p, w)
    whole = read_opq(f)
    with OpqStream(f) as s:
        streamed = dict(s.decoded(workers=3))
        masks = dict(s.decoded(p.names, masks=True, workers=2))
        for lp in p.layers:
            mask, codes = s.layer_codes(lp.name)  # the general path
            ref = decode_layer(lp, codes)
            for got in (whole.weights[lp.name], lp.to_stored(streamed[lp.name])):
                assert got.dtype == ref.dtype and got.shape == ref.shape
                assert got.tobytes() == ref.tobytes(), lp.name  # bit for bit, -0.0 included
            assert np.array_equal(masks[lp.name], mask)
            assert np.array_equal(whole.masks[lp.name], mask)
    assert sorted(set(general)) == sorted(lp.name for lp in p.layers if lp.kept == 0)
    applied = p.apply(w)
    for lp in p.layers:
        assert whole.weights[lp.name].tobytes() == applied[lp.name].tobytes()


@pytest.mark.filterwarnings("ignore:plan")
def test_a_corrupt_stream_gives_the_general_error(tmp_path):
    """A blob the one-pass decoder does not finish cleanly goes to the general path, whose
    error names the layer."""
    w = _layers(3)
    p = opq_core.plan(w, sparsity=0.5, bits=4)
    f = tmp_path / "m.opq"
    write_opq(f, p, w)
    lp = p["fc.weight"]
    with OpqStream(f) as s:
        info = s._infos[lp.name]
        a, b = s._header[_PREFIX + lp.name]["data_offsets"]
        blob = bytearray(s._fb[s._start + a:s._start + b])
    off = sum(info["parts"][:4]) + 4  # inside the codes' stream
    blob[off] ^= 0x5A
    from opq_core._codec import _decode_layer_dense
    with pytest.raises(OpqFormatError) as e1:
        _decode_layer_dense(lp, bytes(blob), info)
    with pytest.raises(OpqFormatError) as e2:
        _decode_layer_blob(lp, bytes(blob), info)
    assert str(e1.value) == str(e2.value) and "fc.weight" in str(e1.value)


def test_decoded_raises_in_order_and_keeps_the_order(tmp_path):
    w = _layers(4)
    p = opq_core.plan(w, sparsity=0.5, bits=3)
    f = tmp_path / "m.opq"
    write_opq(f, p, w)
    with OpqStream(f) as s:
        names = s.names[::-1]
        assert [n for n, _ in s.decoded(names, workers=4)] == names
        it = s.decoded(names + ["nope"], workers=2)
        got = [next(it)[0] for _ in names]
        assert got == names
        with pytest.raises(KeyError):
            next(it)


def test_a_symbol_model_beyond_the_writers_range_is_refused():
    from opq_core._codec import _read_varints, _varints
    from opq_core._container import OpqFormatError, _MODEL_MAX
    assert _read_varints(_varints([0, 7, _MODEL_MAX]), 3, "layer 'fc'").tolist() == \
        [0.0, 7.0, float(_MODEL_MAX)]
    for bad in (_varints([1, _MODEL_MAX + 1]), _varints([1]) + bytes([0x80]),
                _varints([1, 2]) + b"\x00"):
        with pytest.raises(OpqFormatError, match="layer 'fc': .*symbol model"):
            _read_varints(bad, 2, "layer 'fc'")
