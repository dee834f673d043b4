r"""The ``.opq`` compressed file: a safetensors container whose size is the reported figure.

A ``.opq`` file is a valid safetensors file (8-byte little-endian header length, a JSON
header, then the tensor bytes). Its ``__metadata__`` holds ``format = "opq"``, the format
``version``, the ``layout`` and ``sha256``, the checksum of the whole file (header with
the checksum digits set to ``0`` + every tensor byte). Its tensors are

- ``__opq__``: the zlib-compressed JSON description: the plan (without the per-channel
  scales and codebooks, stored in binary below) and, per compressed layer, how its bytes
  are coded;
- ``opq/<layer>``: one ``uint8`` blob per compressed layer, the concatenation of its parts
  ``scale`` (the channel scales at the plan's ``scale_dtype``, exact), ``codebook``
  (float32 centroids of a codebook layer), ``model`` (the entropy layout's quantized
  symbol frequencies, LEB128 varints), ``mask`` (the sparsity pattern) and ``codes``
  (the kept weights' symbols);
- every other tensor of the model (biases, norms, buffers) under its own name, as it was.

Layouts
-------
``"entropy"`` (default)
    The mask is the bit stream of :func:`opq_core.kernels.pack_mask`, coded byte by byte
    with an ANS coder (the ``constriction`` library) against the i.i.d. Bernoulli model of
    the layer's density :math:`p = \mathrm{nnz}/n`: byte :math:`x` with :math:`k` bits set
    has probability :math:`p^k (1-p)^{8-k}`. The kept weights' symbols are ANS-coded
    against the layer's symbol histogram, quantized to at most 12 bits per entry and
    stored in the ``model`` part. File size per layer is about

    .. math:: n H(p) + \mathrm{nnz}\, H(\text{symbols}) + \text{side information}.

``"packed"``
    Symbols at exactly ``bits`` bits per kept weight (:func:`opq_core.kernels.pack_codes`),
    the mask as the cheaper of a bitmask and a gap code
    (:func:`opq_core.kernels.mask_coding_cost`): constant-time access for inference kernels.

Empty and fully kept layers store no mask; empty layers store no codes.

Symbols: for the uniform grids the ``bits``-bit symbol of code ``+-k`` is
``(k - 1) | (sign << (bits - 1))`` (:func:`opq_core.kernels.codes_to_symbols`); for codebook
layers it is the centroid index ``code - 1``.

Decoding returns dense weights equal bit for bit to :meth:`opq_core.Plan.apply` of the
weights the file was written from (the plan's fake-quant weights).

The entropy-coded streams depend on ``constriction``'s model quantization; the writer's
``constriction`` version is recorded in the header.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .apply import compute_dtype

__all__ = ["FORMAT_VERSION", "LAYOUTS", "write_opq", "read_opq", "compress_weights",
           "layer_codes", "decode_layer", "CompressedFile", "LayerRecord", "OpqFormatError"]

#: Version of the container written by this opq; readers refuse newer files.
FORMAT_VERSION = 1
LAYOUTS = ("entropy", "packed")

_HEADER_TENSOR = "__opq__"
_PREFIX = "opq/"
_PARTS = ("scale", "codebook", "model", "mask", "codes")
_SHA_ZERO = "0" * 64
_MODEL_MAX = 4095          # quantized symbol-frequency tables: at most 12 bits per entry
_CHUNK = 1 << 24

_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16",
              "uint32": "U32", "uint64": "U64", "bool": "BOOL"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class OpqFormatError(ValueError):
    """A file that is not a readable .opq file (corrupt, truncated, wrong version...)."""


# ---------------------------------------------------------------------------------------
# result objects
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class LayerRecord:
    """Storage accounting of one compressed layer of a ``.opq`` file.

    Attributes
    ----------
    name, shape, bits, grid, kept : as in the plan.
    mask_coding : ``"entropy"``, ``"bitmask"``, ``"gap"`` or ``"none"`` (empty or full).
    code_coding : ``"entropy"``, ``"packed"`` or ``"none"`` (empty layer).
    parts : bytes of each blob part (``scale``, ``codebook``, ``model``, ``mask``, ``codes``).
    header_bytes : the layer's share of the container header (its JSON entries plus its
        share, by weight count, of the common header).
    """

    name: str
    shape: tuple
    bits: int
    grid: str
    kept: int
    mask_coding: str
    code_coding: str
    parts: dict
    header_bytes: int

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.n if self.n else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the layer in the file: blob + header share."""
        return int(sum(self.parts.values())) + int(self.header_bytes)

    @property
    def paper_rate(self) -> float:
        """``32 n / (bits nnz)``."""
        b = self.bits * self.kept
        return 32.0 * self.n / b if b else math.inf

    @property
    def storage_rate(self) -> float:
        """``4 n / nbytes``: float32 bytes over bytes in the file."""
        return 4.0 * self.n / self.nbytes if self.nbytes else math.inf

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "bits": self.bits,
                "grid": self.grid, "n": self.n, "kept": self.kept,
                "sparsity": self.sparsity, "mask_coding": self.mask_coding,
                "code_coding": self.code_coding, "parts": dict(self.parts),
                "header_bytes": self.header_bytes, "nbytes": self.nbytes,
                "paper_rate": _finite(self.paper_rate),
                "storage_rate": _finite(self.storage_rate)}

    def __repr__(self):
        return (f"LayerRecord({self.name!r}, shape={self.shape}, bits={self.bits}, "
                f"kept={self.kept}, nbytes={self.nbytes}, storage_rate={self.storage_rate:.2f})")


@dataclass(frozen=True, repr=False)
class CompressedFile:
    """What :func:`read_opq` returns.

    Attributes
    ----------
    path : the file.
    version, layout : the container's format version and layout.
    plan : the :class:`opq_core.Plan` the file was written with.
    weights : dense (fake-quant) weight of every compressed layer, equal bit for bit to
        ``plan.apply(...)`` of the weights it was written from (empty when
        ``decode=False``).
    masks : bool mask (True = kept) of every compressed layer.
    other : every other tensor, as it was written.
    layers : one :class:`LayerRecord` per compressed layer.
    file_bytes : size of the file.
    other_bytes : bytes of the other tensors (data + their header entries).
    metadata : the user's metadata (str -> str).
    other_names : names of the other tensors.
    """

    path: str
    version: int
    layout: str
    plan: object
    weights: dict
    masks: dict
    other: dict
    layers: tuple
    file_bytes: int
    other_bytes: int
    metadata: dict = field(default_factory=dict)
    other_names: tuple = ()

    @property
    def n(self) -> int:
        return sum(r.n for r in self.layers)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.layers)

    @property
    def compressed_bytes(self) -> int:
        """Bytes of the compressed layers in the file (``file_bytes - other_bytes``)."""
        return self.file_bytes - self.other_bytes

    @property
    def paper_rate(self) -> float:
        """``32 N / sum_i bits_i nnz_i`` over the compressed layers."""
        b = sum(r.bits * r.kept for r in self.layers)
        return 32.0 * self.n / b if b else math.inf

    @property
    def storage_rate(self) -> float:
        """``4 N / compressed_bytes``: float32 bytes of the compressed tensors over their
        bytes in the file (codes + index + scales + codebooks + their header)."""
        return 4.0 * self.n / self.compressed_bytes if self.compressed_bytes else math.inf

    @property
    def file_rate(self) -> float:
        """Float32 bytes of every tensor over the file size (other tensors included)."""
        other = sum(4 * int(np.prod(np.shape(v))) for v in self.other.values())
        return (4.0 * self.n + other) / self.file_bytes if self.file_bytes else math.inf

    def to_dict(self) -> dict:
        return {"path": self.path, "version": self.version, "layout": self.layout,
                "file_bytes": self.file_bytes, "compressed_bytes": self.compressed_bytes,
                "other_bytes": self.other_bytes, "n": self.n, "kept": self.kept,
                "sparsity": 1.0 - self.kept / self.n if self.n else 0.0,
                "paper_rate": _finite(self.paper_rate),
                "storage_rate": _finite(self.storage_rate),
                "other_tensors": list(self.other_names),
                "metadata": dict(self.metadata),
                "layers": [r.to_dict() for r in self.layers]}

    def table(self, *, max_rows: int | None = None) -> str:
        """Per-layer table with totals (plain text)."""
        head = (f"{'layer':<28} {'shape':<16} {'bits':>4} {'sparsity':>8} {'kept':>9} "
                f"{'mask':>7} {'bytes':>10} {'paper':>8} {'storage':>8}")
        rows = [head, "-" * len(head)]
        layers = self.layers if max_rows is None else self.layers[:max_rows]
        for r in layers:
            shape = "x".join(str(s) for s in r.shape)
            rows.append(f"{_clip(r.name, 28):<28} {_clip(shape, 16):<16} {r.bits:>4d} "
                        f"{r.sparsity:>8.4f} {r.kept:>9d} {r.mask_coding:>7} {r.nbytes:>10d} "
                        f"{_rate(r.paper_rate):>8} {_rate(r.storage_rate):>8}")
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"... {len(self.layers) - max_rows} more layers")
        rows.append("-" * len(head))
        sp = 1.0 - self.kept / self.n if self.n else 0.0
        rows.append(f"{'total':<28} {len(self.layers):>3d} layers{'':<6} {'':>4} {sp:>8.4f} "
                    f"{self.kept:>9d} {'':>7} {self.compressed_bytes:>10d} "
                    f"{_rate(self.paper_rate):>8} {_rate(self.storage_rate):>8}")
        rows.append(f"layout={self.layout} version={self.version} file={self.file_bytes} bytes "
                    f"(other tensors {self.other_bytes} bytes) paper_rate="
                    f"{_rate(self.paper_rate)} storage_rate={_rate(self.storage_rate)}")
        return "\n".join(rows)

    def __repr__(self):
        return f"CompressedFile({self.path!r},\n{self.table(max_rows=40)}\n)"


def _rate(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.2f}x"


def _finite(v: float):
    return v if math.isfinite(v) else None


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


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
        fake_quant_codebook(x, m, lp.codebook, codes=codes, name=lp.name)
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
        out = dequantize_codebook(codes, lp.codebook, cdt, name=lp.name)
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
        if _is_codebook(lp):
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


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
    return bytes(out)


def _read_varints(data: bytes, count: int, what: str) -> np.ndarray:
    vals = []
    i = 0
    for _ in range(count):
        v = 0
        shift = 0
        while True:
            if i >= len(data) or shift > 35:
                raise OpqFormatError(f"{what}: malformed symbol model (corrupt file)")
            b = data[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 128:
                break
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


def _decode_layer_blob(lp, blob: bytes, info: Mapping, want_codes=True):
    """(mask, codes) of one layer from its blob."""
    from .kernels import gap_decode, symbols_to_codes, unpack_bits, unpack_codes, unpack_mask
    what = f"layer {lp.name!r}"
    sizes = info["parts"]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    part = {k: blob[offs[i]:offs[i + 1]] for i, k in enumerate(_PARTS)}
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
        codes = np.zeros(lp.shape, dtype=_code_dtype(lp))
        if cc == "none":
            if kept:
                raise OpqFormatError(f"{what}: no codes stored but {kept} kept")
            return mask, codes
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
            codes[mask] = sym.astype(np.int16) + 1
        else:
            codes[mask] = symbols_to_codes(sym, lp.bits)
        return mask, codes
    except OpqFormatError:
        raise
    except ValueError as exc:
        raise OpqFormatError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def _plan_header(plan) -> dict:
    d = plan.to_dict()
    d.pop("totals", None)
    for layer in d["layers"]:
        layer.pop("channel_scale", None)
        layer.pop("codebook", None)
        # a weighted layer's mask is stored; its thresholds need only offset_lam
        layer.pop("importance_out", None)
        layer.pop("importance_in", None)
    return d


def _np_dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _ST_DTYPES:
        raise TypeError(f"other: tensor dtype {name} cannot be stored in a .opq file")
    return name


def write_opq(path, plan, weights: Mapping | None = None, *, codes: Mapping | None = None,
              masks: Mapping | None = None, other: Mapping | None = None,
              layout: str = "entropy", metadata: Mapping | None = None,
              progress: bool = False) -> CompressedFile:
    """Write a compressed model to ``path`` atomically; return its accounting.

    Parameters
    ----------
    path : str or Path
        The ``.opq`` file. Written to a temporary file next to it, then renamed: an
        existing file is replaced only when the new one is complete.
    plan : opq_core.Plan
    weights : mapping name -> array, optional
        Latent weights of the plan's layers (quantized here with the plan; a lazy mapping
        is read one tensor at a time). Give ``weights`` or ``codes``.
    codes : mapping name -> integer array, optional
        Ready codes (:func:`compress_weights`), with ``masks`` or derived as ``codes != 0``.
    masks : mapping name -> bool array, optional
        Realized masks (default: the plan's; required for codebook layers).
    other : mapping name -> array, optional
        Tensors stored as they are (biases, norms, buffers). Read one at a time.
    layout : {"entropy", "packed"}
    metadata : mapping str -> str, optional
        Stored in the header, returned by :func:`read_opq`.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    CompressedFile
        Accounting of the written file (no decoded tensors).

    Notes
    -----
    The rates it reports:

    .. math::

        \\text{paper\\_rate} = \\frac{32 N}{\\sum_i B_i\\,\\mathrm{nnz}_i},\\qquad
        \\text{storage\\_rate} = \\frac{4 N}{\\text{bytes of the compressed layers in the file}}
    """
    from .allocate import Plan
    from .io import atomic_write, tensor_info
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected an opq_core.Plan, got {type(plan).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (weights is None) == (codes is None):
        raise ValueError("give weights= (latent weights) or codes=, exactly one of them")
    meta = {}
    for k, v in dict(metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: keys and values must be str, got {k!r}: {v!r}")
        meta[k] = v
    other = {} if other is None else other
    clash = sorted(set(plan.names) & set(other))
    if clash:
        raise ValueError(f"other: tensor {clash[0]!r} is a compressed layer of the plan")
    for name in other:
        if name == _HEADER_TENSOR or name.startswith(_PREFIX):
            raise ValueError(f"other: tensor name {name!r} is reserved by the .opq format")

    # 1) encode every layer (one tensor at a time)
    blobs, infos = [], []
    for lp in _bar(plan.layers, progress, f"encode ({layout})"):
        if codes is not None:
            if lp.name not in codes:
                raise ValueError(f"codes: the plan's layer {lp.name!r} is missing")
            c = np.asarray(codes[lp.name])
            if tuple(c.shape) != tuple(lp.shape) or c.dtype.kind not in "iu":
                raise ValueError(f"codes[{lp.name!r}]: expected integers of shape "
                                 f"{tuple(lp.shape)}, got {c.dtype} {tuple(c.shape)}")
            m = (np.asarray(masks[lp.name], dtype=bool).reshape(lp.shape)
                 if masks is not None and lp.name in masks else c != 0)
            if np.any((c != 0) != m):
                raise ValueError(f"codes[{lp.name!r}]: nonzero codes must be exactly the "
                                 "kept weights of the mask")
        else:
            w, m = _weight_and_mask(lp, weights, masks)
            c = layer_codes(lp, w, m)
            del w
        blob, info = _encode_layer(lp, c, m, layout)
        blobs.append(blob)
        infos.append(info)

    # 2) header
    desc = {"version": FORMAT_VERSION, "layout": layout, "plan": _plan_header(plan),
            "layers": infos, "other": list(other),
            "writer": {"opq_format": FORMAT_VERSION,
                       "constriction": _version_of("constriction")},
            "metadata": meta}
    desc_bytes = zlib.compress(json.dumps(desc, separators=(",", ":")).encode(), 9)
    entries = []  # (key, dtype, shape, nbytes, source)
    others = []
    for name in other:
        shape, dtype = tensor_info(other, name)  # metadata only: the data is read once, below
        shape = tuple(int(s) for s in shape)
        dt = _np_dtype_name(dtype)
        nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
        others.append((name, _ST_DTYPES[dt], shape, nbytes, ("other", name)))
    others.sort(key=lambda e: -np.dtype(_NP_DTYPES[e[1]]).itemsize)
    entries += others
    entries.append((_HEADER_TENSOR, "U8", (len(desc_bytes),), len(desc_bytes), ("bytes", desc_bytes)))
    for lp, blob in zip(plan.layers, blobs):
        entries.append((_PREFIX + lp.name, "U8", (len(blob),), len(blob), ("bytes", blob)))
    header = {"__metadata__": {"format": "opq", "version": str(FORMAT_VERSION),
                               "layout": layout, "sha256": _SHA_ZERO}}
    off = 0
    for key, dt, shape, nbytes, _ in entries:
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-(8 + len(hjson)) % 8)
    sha_at = hjson.index(b'"sha256":"' + _SHA_ZERO.encode() + b'"') + len(b'"sha256":"')
    prefix = struct.pack("<Q", len(hjson))

    def write(f):
        h = hashlib.sha256()
        h.update(prefix)
        h.update(hjson)
        f.write(prefix)
        f.write(hjson)
        for key, dt, shape, nbytes, (kind, src) in entries:
            if kind == "bytes":
                data = src
            else:
                arr = np.asarray(other[src])
                want = np.dtype(_NP_DTYPES[dt]).newbyteorder("<") if dt != "BOOL" else np.bool_
                data = np.ascontiguousarray(arr, dtype=want).tobytes()
                if len(data) != nbytes:
                    raise ValueError(f"other[{src!r}]: changed size while writing")
            h.update(data)
            f.write(data)
        f.seek(len(prefix) + sha_at)
        f.write(h.hexdigest().encode())
        f.seek(0, os.SEEK_END)

    atomic_write(path, write)
    other_bytes = sum(e[3] for e in others) + sum(
        len(json.dumps({e[0]: header[e[0]]}, separators=(",", ":"))) - 1 for e in others)
    file_bytes = len(prefix) + len(hjson) + off
    records = _records(plan, infos, header, file_bytes, other_bytes, desc)
    return CompressedFile(path=str(path), version=FORMAT_VERSION, layout=layout, plan=plan,
                          weights={}, masks={}, other={}, layers=records,
                          file_bytes=file_bytes, other_bytes=other_bytes, metadata=meta,
                          other_names=tuple(other))


def _version_of(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # pragma: no cover
        return "unknown"


def _records(plan, infos, header, file_bytes, other_bytes, desc) -> tuple:
    """Per-layer accounting; header bytes: the layer's own header entries, plus the
    common header split by weight count so that the layers add up to the total."""
    compressed = file_bytes - other_bytes
    own = []
    blobs = []
    for lp, info in zip(plan.layers, infos):
        key = _PREFIX + lp.name
        entry = len(json.dumps({key: header[key]}, separators=(",", ":"))) - 1
        # the layer's share of the zlib-compressed description, estimated by its JSON length
        dl = desc["plan"]["layers"][plan.names.index(lp.name)]
        js = len(json.dumps(dl, separators=(",", ":"))) + len(json.dumps(info, separators=(",", ":")))
        own.append((entry, js))
        blobs.append(sum(info["parts"]))
    desc_len = header[_HEADER_TENSOR]["data_offsets"][1] - header[_HEADER_TENSOR]["data_offsets"][0]
    js_total = len(json.dumps(desc, separators=(",", ":")))
    ratio = desc_len / js_total if js_total else 0.0
    heads = [entry + int(round(js * ratio)) for entry, js in own]
    common = compressed - sum(blobs) - sum(heads)
    N = plan.n or 1
    shares = [int(common * lp.n // N) for lp in plan.layers]
    if shares:
        shares[-1] += common - sum(shares)
    recs = []
    for lp, info, h, s in zip(plan.layers, infos, heads, shares):
        recs.append(LayerRecord(name=lp.name, shape=tuple(lp.shape), bits=int(lp.bits),
                                grid=lp.grid, kept=int(lp.kept), mask_coding=info["mask"],
                                code_coding=info["codes"],
                                parts=dict(zip(_PARTS, (int(x) for x in info["parts"]))),
                                header_bytes=h + s))
    return tuple(recs)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

def _parse(path):
    """(mmap, header dict, data start, raw header bytes); checks framing and checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    size = path.stat().st_size
    where = f"{str(path)!r}"
    if size < 8:
        raise OpqFormatError(f"{where} is not a .opq file (only {size} bytes; truncated?)")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    hlen = struct.unpack("<Q", mm[:8])[0]
    if hlen > size - 8:
        raise OpqFormatError(f"{where} is truncated or not a .opq file (header of {hlen} bytes, "
                             f"file of {size})")
    raw = bytes(mm[8:8 + hlen])
    try:
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
    except Exception:
        raise OpqFormatError(f"{where} is corrupt or not a .opq file (unreadable header)") from None
    if not isinstance(meta, dict) or meta.get("format") != "opq":
        raise OpqFormatError(f"{where} is not a .opq file (a safetensors file without opq "
                             "metadata?)")
    try:
        version = int(meta.get("version", "0"))
    except ValueError:
        raise OpqFormatError(f"{where}: unreadable format version {meta.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise OpqFormatError(f"{where} has format version {version}, newer than this opq "
                             f"reads ({FORMAT_VERSION}); upgrade opq")
    if version < 1:
        raise OpqFormatError(f"{where} has an unknown format version {version}")
    end = 0
    for key, e in header.items():
        if key != "__metadata__":
            end = max(end, int(e["data_offsets"][1]))
    if 8 + hlen + end > size:
        raise OpqFormatError(f"{where} is truncated: {size} bytes, its header needs "
                             f"{8 + hlen + end}")
    if 8 + hlen + end < size:
        raise OpqFormatError(f"{where} is corrupt: {size - 8 - hlen - end} bytes after the "
                             "last tensor")
    sha = str(meta.get("sha256", ""))
    pat = b'"sha256":"' + sha.encode() + b'"'
    at = raw.find(pat)
    if len(sha) != 64 or at < 0:
        raise OpqFormatError(f"{where} is corrupt (no checksum in the header)")
    zeroed = raw[:at] + b'"sha256":"' + _SHA_ZERO.encode() + b'"' + raw[at + len(pat):]
    h = hashlib.sha256()
    h.update(mm[:8])
    h.update(zeroed)
    pos = 8 + hlen
    while pos < size:
        h.update(mm[pos:min(size, pos + _CHUNK)])
        pos += _CHUNK
    if h.hexdigest() != sha:
        raise OpqFormatError(f"{where} is corrupt: checksum mismatch (the file was changed or "
                             "damaged after it was written)")
    return mm, header, 8 + hlen, version


def read_opq(path, *, decode: bool = True, progress: bool = False) -> CompressedFile:
    """Read a ``.opq`` file: plan, dense weights, masks, other tensors, accounting.

    Parameters
    ----------
    path : str or Path
    decode : bool
        Decode the layers (default). ``False`` checks the file and returns only the plan
        and the accounting (what ``opq inspect`` shows).
    progress : bool
        Show a tqdm progress bar.

    Raises
    ------
    OpqFormatError (a ValueError)
        Not a .opq file, truncated, corrupt (checksum), or written by a newer opq.
    FileNotFoundError

    Examples
    --------
    >>> import numpy as np, tempfile, os, opq_core
    >>> w = {"fc": np.random.default_rng(0).laplace(size=(8, 16)).astype(np.float32)}
    >>> p = opq_core.plan(w, sparsity=0.5, bits=3)
    >>> f = os.path.join(tempfile.mkdtemp(), "m.opq")
    >>> _ = write_opq(f, p, w)
    >>> np.array_equal(read_opq(f).weights["fc"], p.apply(w)["fc"])
    True
    """
    from .allocate import Plan
    mm, header, start, version = _parse(path)
    try:
        def tensor_bytes(key):
            e = header.get(key)
            if e is None:
                raise OpqFormatError(f"{str(path)!r} is corrupt: tensor {key!r} is missing")
            a, b = (int(x) for x in e["data_offsets"])
            return mm[start + a:start + b]

        try:
            desc = json.loads(zlib.decompress(bytes(tensor_bytes(_HEADER_TENSOR))))
            plan_d = copy.deepcopy(desc["plan"])
            infos = desc["layers"]
            layout = desc["layout"]
            for ld, info in zip(plan_d["layers"], infos):
                blob = tensor_bytes(_PREFIX + ld["name"])
                sizes = info["parts"]
                if sum(sizes) != len(blob):
                    raise OpqFormatError(f"{str(path)!r} is corrupt: layer {ld['name']!r}")
                ld["channel_scale"] = np.frombuffer(
                    bytes(blob[:sizes[0]]),
                    dtype=np.dtype(info["scale_dtype"]).newbyteorder("<")).astype(np.float64)
                if ld.get("grid") == "codebook":
                    ld["codebook"] = np.frombuffer(bytes(blob[sizes[0]:sizes[0] + sizes[1]]),
                                                   dtype="<f4").astype(np.float64)
            plan = Plan.from_dict(plan_d)
        except OpqFormatError:
            raise
        except Exception as exc:
            raise OpqFormatError(f"{str(path)!r} is corrupt: unreadable description "
                                 f"({type(exc).__name__}: {exc})") from None
        weights, masks, other = {}, {}, {}
        if decode:
            for lp, info in _bar(list(zip(plan.layers, infos)), progress, "decode"):
                mask, codes = _decode_layer_blob(lp, tensor_bytes(_PREFIX + lp.name), info)
                masks[lp.name] = mask
                weights[lp.name] = decode_layer(lp, codes)
            for name in desc["other"]:
                e = header[name]
                dt = np.dtype(_NP_DTYPES[e["dtype"]])
                a, b = (int(x) for x in e["data_offsets"])
                le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
                if (b - a) != int(np.prod(e["shape"])) * dt.itemsize:
                    raise OpqFormatError(f"{str(path)!r} is corrupt: tensor {name!r}")
                arr = np.frombuffer(mm, dtype=le, count=(b - a) // dt.itemsize,
                                    offset=start + a).astype(dt)
                other[name] = arr.reshape(e["shape"])
                del arr
        size = os.path.getsize(path)
        other_bytes = 0
        for name in desc["other"]:
            e = header[name]
            other_bytes += int(e["data_offsets"][1]) - int(e["data_offsets"][0])
            other_bytes += len(json.dumps({name: e}, separators=(",", ":"))) - 1
        records = _records(plan, infos, header, size, other_bytes, desc)
        return CompressedFile(path=str(path), version=version, layout=layout, plan=plan,
                              weights=weights, masks=masks, other=other, layers=records,
                              file_bytes=size, other_bytes=other_bytes,
                              metadata=dict(desc.get("metadata") or {}),
                              other_names=tuple(desc["other"]))
    finally:
        mm.close()
