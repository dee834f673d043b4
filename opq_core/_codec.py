"""Coding one layer of a .opq file: codes of the kept weights, the entropy (ANS) and packed
layouts of its mask and symbols, varints; decoding back to the plan's fake-quant weights."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._container import (OpqFormatError, _MODEL_MAX, _PARTS)

from ._plan import compute_dtype
from .kernels.index import _get_varint, _put_varint, _varint_len



# ---------------------------------------------------------------------------------------
# codes of one layer
# ---------------------------------------------------------------------------------------

def _is_codebook(lp) -> bool:
    return lp.grid == "codebook"


def _code_dtype(lp):
    from .kernels import code_dtype
    return np.int16 if _is_codebook(lp) else code_dtype(lp.bits)


def layer_codes(lp, w, mask) -> np.ndarray:
    """Integer codes of one layer (``0`` = pruned) from its latent weights and mask.

    Uniform grids: ``+-k`` of :func:`opq_core.kernels.fake_quant`; codebook layers:
    ``1 + index`` of :func:`opq_core.codebook.fake_quant_codebook`.
    """
    w = np.asarray(w)
    if tuple(w.shape) != tuple(lp.shape):
        raise ValueError(f"weights[{lp.name!r}]: shape {tuple(w.shape)} does not match the "
                         f"plan's {tuple(lp.shape)} (a plan for another model?)")
    m = np.asarray(mask)
    if m.dtype != np.bool_ or tuple(m.shape) != tuple(lp.shape):
        raise ValueError(f"masks[{lp.name!r}]: expected a bool array of shape {tuple(lp.shape)}, "
                         f"got dtype {m.dtype} and shape {tuple(m.shape)}")
    kept = int(np.count_nonzero(m))
    if kept != lp.kept:
        raise ValueError(f"masks[{lp.name!r}]: keeps {kept} weights, the plan keeps {lp.kept}")
    x = np.ascontiguousarray(w, dtype=compute_dtype(w.dtype))
    codes = np.zeros(lp.shape, dtype=_code_dtype(lp))
    if _is_codebook(lp):
        from .codebook import fake_quant_codebook
        fake_quant_codebook(x, m, lp.codebook, scale=lp.kernel_scale, codes=codes, name=lp.name)
    else:
        from .kernels import fake_quant
        fake_quant(x, m, lp.kernel_scale, lp.thresholds, lp.step, lp.bits, lp.grid,
                   codes=codes, layer=lp.name)
    return codes


def decode_layer(lp, codes) -> np.ndarray:
    """Dense weights (dtype of the plan's layer) from codes: the plan's fake-quant weights."""
    dt = np.dtype(lp.dtype)
    cdt = compute_dtype(dt)
    if _is_codebook(lp):
        from .codebook import dequantize_codebook
        out = dequantize_codebook(codes, lp.codebook, cdt, scale=lp.kernel_scale, name=lp.name)
    else:
        from .kernels import dequantize
        out = dequantize(codes, lp.kernel_scale, lp.thresholds, lp.step, lp.bits, lp.grid,
                         dtype=cdt, layer=lp.name)
    return out.astype(dt, copy=False)


def compress_weights(weights: Mapping, plan, *, masks: Mapping | None = None,
                     progress: bool = False) -> dict:
    """Codes of every layer of ``plan`` (name -> integer array, ``0`` = pruned).

    ``weights`` are the latent weights (the ones the plan was made from, or fine-tuned
    ones); ``masks`` default to the plan's realized masks (required for codebook layers).
    Reads one tensor at a time from a lazy mapping.
    """
    out = {}
    for lp in _bar(plan.layers, progress, "quantize"):
        w, m = _weight_and_mask(lp, weights, masks)
        out[lp.name] = layer_codes(lp, w, m)
    return out


def _weight_and_mask(lp, weights, masks):
    if lp.name not in weights:
        raise ValueError(f"weights: the plan's layer {lp.name!r} is missing (a file for "
                         f"another model?)")
    w = np.asarray(weights[lp.name])
    if tuple(w.shape) != tuple(lp.shape):
        raise ValueError(f"weights[{lp.name!r}]: shape {tuple(w.shape)} does not match the "
                         f"plan's {tuple(lp.shape)} (a plan for another model?)")
    if masks is not None and lp.name in masks:
        m = np.asarray(masks[lp.name])
        if m.dtype != np.bool_:
            raise TypeError(f"masks[{lp.name!r}]: must be a bool array, got dtype {m.dtype}")
        m = m.reshape(lp.shape) if m.size == lp.n else m
    else:
        if lp.mask_stored_only:
            raise ValueError(f"masks: the codebook layer {lp.name!r} needs its mask (not "
                             f"derivable from the plan)")
        from .apply import layer_mask
        m = layer_mask(lp, w)
    return w, m


def _bar(items, progress, desc):
    if not progress:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


# ---------------------------------------------------------------------------------------
# entropy models (constriction)
# ---------------------------------------------------------------------------------------

def _constriction():
    try:
        import constriction
    except ImportError:  # pragma: no cover
        raise ImportError("the entropy layout needs the 'constriction' package "
                          "(pip install constriction), or use layout='packed'") from None
    return constriction


def _bernoulli_byte_probs(kept: int, n: int) -> np.ndarray:
    # p^k (1-p)^(8-k) by repeated, correctly rounded multiplication: encoder and decoder
    # build the same float table on any platform
    p = kept / n
    q = (n - kept) / n
    pp = [1.0]
    qq = [1.0]
    for _ in range(8):
        pp.append(pp[-1] * p)
        qq.append(qq[-1] * q)
    pop = np.array([bin(i).count("1") for i in range(256)])
    return np.array([pp[k] * qq[8 - k] for k in pop], dtype=np.float64)


def _categorical(probs: np.ndarray):
    return _constriction().stream.model.Categorical(probs, perfect=False)


def _ans_encode(symbols: np.ndarray, model) -> bytes:
    coder = _constriction().stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decode(data: bytes, model, count: int, what: str) -> np.ndarray:
    if len(data) % 4:
        raise OpqFormatError(f"{what}: entropy-coded stream of {len(data)} bytes is not whole "
                             "32-bit words (corrupt file)")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        coder = _constriction().stream.stack.AnsCoder(words)
        out = coder.decode(model, count)
    except Exception as exc:
        raise OpqFormatError(f"{what}: cannot decode the entropy-coded stream ({exc})") from None
    if not coder.is_empty():
        raise OpqFormatError(f"{what}: entropy-coded stream has trailing data (corrupt file)")
    return np.asarray(out)


def _quantized_table(symbols: np.ndarray, nsym: int) -> np.ndarray:
    counts = np.bincount(symbols, minlength=nsym).astype(np.int64)
    mx = int(counts.max()) if counts.size else 0
    if mx <= _MODEL_MAX:
        return counts
    q = np.rint(counts * (_MODEL_MAX / mx)).astype(np.int64)
    return np.where(counts > 0, np.maximum(q, 1), 0)


# The one LEB128 writer and reader are the gap code's (kernels/index.py); a few hundred
# table entries run their Python bodies, which costs less than a Numba call per entry.
_PUT_VARINT = getattr(_put_varint, "py_func", _put_varint)
_VARINT_LEN = getattr(_varint_len, "py_func", _varint_len)
_GET_VARINT = getattr(_get_varint, "py_func", _get_varint)


def _varints(values) -> bytes:
    """LEB128 varints (7 bits per byte, high bit = more bytes follow) of non-negative ints."""
    vals = [int(v) for v in values]
    out = bytearray(sum(_VARINT_LEN(v) for v in vals))
    at = 0
    for v in vals:
        at = _PUT_VARINT(out, at, v)
    return bytes(out)


def _read_varints(data: bytes, count: int, what: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    vals = []
    i = 0
    for _ in range(count):
        v, i = _GET_VARINT(buf, i)
        if i < 0 or v > _MODEL_MAX:  # the writer's tables stop at _MODEL_MAX
            raise OpqFormatError(f"{what}: malformed symbol model (corrupt file)")
        vals.append(v)
    if i != len(data):
        raise OpqFormatError(f"{what}: symbol model has trailing bytes (corrupt file)")
    return np.array(vals, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# one layer <-> blob
# ---------------------------------------------------------------------------------------

def _symbols(lp, codes, mask) -> np.ndarray:
    kept_codes = codes[mask]
    if _is_codebook(lp):
        return (kept_codes.astype(np.int64) - 1).astype(np.uint8)
    from .kernels import codes_to_symbols
    return codes_to_symbols(kept_codes, lp.bits).reshape(-1)


def _scale_bytes(lp) -> tuple[bytes, str]:
    s = np.asarray(lp.channel_scale, dtype=np.float64)
    for dt in (lp.scale_dtype, "float32", "float64"):
        c = s.astype(dt)
        if np.array_equal(c.astype(np.float64), s):
            return c.astype(np.dtype(dt).newbyteorder("<")).tobytes(), dt
    raise AssertionError  # pragma: no cover - float64 is always exact


def _encode_layer(lp, codes, mask, layout) -> tuple[bytes, dict]:
    from .kernels import mask_coding_cost, pack_bits, pack_codes, pack_mask, gap_encode
    n, kept = lp.n, lp.kept
    mask = np.ascontiguousarray(mask).reshape(lp.shape)
    if int(np.count_nonzero(mask)) != kept:
        raise ValueError(f"masks[{lp.name!r}]: keeps {int(np.count_nonzero(mask))} weights, "
                         f"the plan keeps {kept}")
    scale, scale_dt = _scale_bytes(lp)
    codebook = b""
    if _is_codebook(lp):
        codebook = np.asarray(lp.codebook, dtype="<f4").tobytes()
    model = b""
    mask_b = b""
    code_b = b""
    sym = _symbols(lp, codes, mask) if kept else np.zeros(0, np.uint8)
    mask_coding = "none" if kept in (0, n) else None
    code_coding = "none" if kept == 0 else layout
    if layout == "entropy":
        if mask_coding is None:
            mask_coding = "entropy"
            model_m = _categorical(_bernoulli_byte_probs(kept, n))
            mask_b = _ans_encode(pack_mask(mask), model_m)
        if kept:
            table = _quantized_table(sym, 1 << lp.bits)
            model = _varints(table)
            code_b = _ans_encode(sym, _categorical(table.astype(np.float64)))
    else:
        if mask_coding is None:
            cost = mask_coding_cost(mask)
            if cost["gap"] < cost["bitmask"]:
                mask_coding, mask_b = "gap", gap_encode(mask).tobytes()
            else:
                mask_coding, mask_b = "bitmask", pack_mask(mask).tobytes()
        if kept:
            if _is_codebook(lp):
                code_b = pack_bits(sym, lp.bits).tobytes()
            else:
                code_b = pack_codes(codes, mask, lp.bits).tobytes()
    parts = [scale, codebook, model, mask_b, code_b]
    info = {"mask": mask_coding, "codes": code_coding, "scale_dtype": scale_dt,
            "parts": [len(p) for p in parts]}
    return b"".join(parts), info


def _blob_parts(blob: bytes, info: Mapping) -> dict:
    """A layer blob cut into its parts (:data:`_PARTS`) by the sizes its header lists."""
    offs = np.concatenate([[0], np.cumsum(info["parts"])]).astype(int)
    return {k: blob[offs[i]:offs[i + 1]] for i, k in enumerate(_PARTS)}


def _decode_layer_blob(lp, blob: bytes, info: Mapping, want_codes=True):
    """(mask, codes) of one layer from its blob."""
    from .kernels import gap_decode, symbols_to_codes, unpack_bits, unpack_codes, unpack_mask
    what = f"layer {lp.name!r}"
    part = _blob_parts(blob, info)
    n, kept = lp.n, lp.kept
    mc = info["mask"]
    try:
        if mc == "none":
            if kept not in (0, n):
                raise OpqFormatError(f"{what}: no mask stored but {kept} of {n} kept")
            mask = np.full(n, kept == n, dtype=bool)
        elif mc == "entropy":
            model_m = _categorical(_bernoulli_byte_probs(kept, n))
            by = _ans_decode(part["mask"], model_m, (n + 7) // 8, what).astype(np.uint8)
            mask = unpack_mask(by, n)
        elif mc == "bitmask":
            mask = unpack_mask(np.frombuffer(part["mask"], np.uint8), n)
        elif mc == "gap":
            mask = gap_decode(np.frombuffer(part["mask"], np.uint8), n)
        else:
            raise OpqFormatError(f"{what}: unknown mask coding {mc!r}")
        if int(np.count_nonzero(mask)) != kept:
            raise OpqFormatError(f"{what}: decoded mask keeps {int(np.count_nonzero(mask))} "
                                 f"weights, the plan keeps {kept}")
        mask = mask.reshape(lp.shape)
        if not want_codes:
            return mask, None
        cc = info["codes"]
        if cc == "none":
            if kept:
                raise OpqFormatError(f"{what}: no codes stored but {kept} kept")
            return mask, np.zeros(lp.shape, dtype=_code_dtype(lp))
        nsym = 1 << lp.bits
        if cc == "entropy":
            table = _read_varints(part["model"], nsym, what)
            if not table.sum() > 0:
                raise OpqFormatError(f"{what}: empty symbol model")
            sym = _ans_decode(part["codes"], _categorical(table), kept, what).astype(np.uint8)
        elif cc == "packed":
            if not _is_codebook(lp):
                return mask, unpack_codes(np.frombuffer(part["codes"], np.uint8), mask, lp.bits)
            sym = unpack_bits(np.frombuffer(part["codes"], np.uint8), lp.bits, kept)
        else:
            raise OpqFormatError(f"{what}: unknown code coding {cc!r}")
        if _is_codebook(lp):
            if sym.size and int(sym.max()) >= len(lp.codebook):
                raise OpqFormatError(f"{what}: a code is beyond the codebook (corrupt file)")
            codes = np.zeros(lp.shape, dtype=_code_dtype(lp))
            codes[mask] = sym.astype(np.int16) + 1
        else:
            codes = symbols_to_codes(sym, lp.bits, mask=mask)
        return mask, codes
    except OpqFormatError:
        raise
    except ValueError as exc:
        raise OpqFormatError(f"{what}: {exc}") from None


def _value_table(lp, cdt) -> np.ndarray:
    """``table[channel, symbol]``: the dequantized value of each symbol in each channel,
    from :func:`opq_core.kernels.dequantize` itself on every code (bit for bit what it
    gives a whole layer: its value depends on the code and the channel only)."""
    from .kernels import dequantize, symbols_to_codes
    code_of = symbols_to_codes(np.arange(1 << lp.bits, dtype=np.uint8), lp.bits)
    codes = np.ascontiguousarray(np.broadcast_to(code_of, (int(lp.shape[0]), code_of.size)))
    return dequantize(codes, lp.kernel_scale, lp.thresholds, lp.step, lp.bits, lp.grid,
                      dtype=cdt, layer=lp.name)


def _decode_layer_dense(lp, blob: bytes, info: Mapping, want_values=True, want_mask=True):
    """(mask, dense weights or None) of one layer from its blob, what
    ``_decode_layer_blob`` then :func:`decode_layer` give (same checks, same errors); the
    mask may be None when ``want_mask`` is False.

    An entropy-coded layer on a uniform grid decodes in one pass without codes
    (:mod:`opq_core._ans`); every other layer, and any stream that does not decode
    cleanly, takes the general path (which raises the error a corrupt blob deserves)."""
    from . import _ans
    n, kept = lp.n, lp.kept
    nsym = 1 << lp.bits
    fused = (not _is_codebook(lp) and info.get("codes") == "entropy" and 0 < kept
             and info.get("mask") in (("entropy",) if kept < n else ("none",))
             and int(lp.shape[0]) * nsym <= n + (1 << 16))
    if fused:
        part = _blob_parts(blob, info)
        fused = len(part["mask"]) % 4 == 0 and len(part["codes"]) % 4 == 0
    if fused:
        table = _read_varints(part["model"], nsym, f"layer {lp.name!r}")
        try:
            ccdf = _ans.categorical_cdf(table)
            if kept < n:
                mcdf = _ans.categorical_cdf(_bernoulli_byte_probs(kept, n))
            else:
                mcdf = np.array([0, 1 << _ans.PRECISION], np.uint32)
        except ValueError:
            fused = False
    if fused:
        dt = np.dtype(lp.dtype)
        cdt = compute_dtype(dt)
        vt = _value_table(lp, cdt) if want_values else np.zeros((1, 1), cdt)
        mask = np.empty(n if (want_mask or not want_values) else 0, dtype=bool)
        vals = np.empty(n if want_values else 0, dtype=cdt)
        got, status = _ans.decode_dense(n, np.frombuffer(part["mask"], "<u4"), mcdf, kept == n,
                                        np.frombuffer(part["codes"], "<u4"), ccdf, vt, mask,
                                        vals)
        if status == 0 and got == kept:
            mask = mask.reshape(lp.shape) if mask.size else None
            if not want_values:
                return mask, None
            return mask, vals.reshape(lp.shape).astype(dt, copy=False)
    mask, codes = _decode_layer_blob(lp, blob, info, want_codes=want_values)
    return mask, (decode_layer(lp, codes) if want_values else None)
