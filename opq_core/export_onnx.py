r"""ONNX export that keeps the compressed weights compressed.

:func:`compress_onnx` takes a dense ONNX model (the *template*: the uncompressed or stripped
model exported to ONNX, whose weight initializers carry the plan's layer names) and
replaces the float initializer of every compressed layer by compressed initializers plus a
small decode subgraph whose output has the initializer's name, so the rest of the graph is
unchanged. What a layer becomes (:attr:`ExportedLayer.encoding`):

``"bitmask+codes-offset"`` / ``"bitmask+codes-symmetric"`` (default, ``prefer="small"``)
    The bitmask (1 bit per weight) and the kept weights' symbols at ``bits`` bits (the
    packed ``.opq`` layout), unpacked in the graph (``BitShift``, ``BitwiseAnd``,
    ``ReduceSum``, ``CumSum``, ``Gather``, ``Where``) into the integer codes ``+-k``; the
    level :math:`\theta_c + s_c ((k - \tfrac12) D)` (offset) or :math:`k (s_c D)`
    (symmetric) is computed in float64 with the kernel's operation order and rounded once:
    bit for bit the plan's weights. Fully kept layers store no bitmask (``"codes-..."``).
``"gap+codes-offset"`` / ``"gap+codes-symmetric"`` / ``"gap+codes-codebook"``
    Very sparse layers (kept + n/255 below n/8 bytes, i.e. beyond about 88 % sparsity)
    store the mask as run bytes instead of a bitmask (:func:`run_bytes`: per kept weight
    the pruned entries before it, 255 standing for 255 of them), expanded in the graph by
    ``CumSum`` and ``ScatterElements``; the rest is decoded as above.
``"bitmask+codes-codebook"``
    ``grid="codebook"``: the symbols index a lookup table ``[0, centroids...]`` (``Gather``;
    float64 and times the channel scales, then cast to float32, when the levels are in
    units of channel scales).
``"int8-dq"`` / ``"int4-dq"`` / ``"int16-dq"`` (``prefer="qdq"``, symmetric layers)
    The dense codes as an ``int8`` (``bits`` 4..7), ``int4`` (``bits <= 3``) or ``int16``
    (``bits = 8``) initializer and a per-output-channel ``DequantizeLinear`` (scale
    :math:`s_c D` in float32, axis 0): the pattern that quantized-ONNX runtimes turn into
    integer kernels. The file is larger (no sparsity), and such a runtime may compute with
    quantized activations: onnxruntime's CPU provider fuses ``DequantizeLinear -> MatMul``
    into ``MatMulNBits``, by default with int8 activations (session config
    ``session.qdq_matmulnbits_accuracy_level = "1"`` keeps float32).
``"zeros"``
    an empty layer: ``ConstantOfShape``.
 Everything decoding a weight depends on initializers
only, so a runtime folds it once when it loads the model (onnxruntime does); the file stays
small. The gap code of the packed ``.opq`` layout (LEB128 varints) has no cheap ONNX
form; the run bytes are its nearest ONNX-decodable relative (one byte per kept weight where
the varints need one or two). :attr:`OnnxExport.table` shows both sizes per layer.

The output is opset 21 (``DequantizeLinear`` with ``int4``/``int16``); the template's other
nodes are kept as they are.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._results import total

__all__ = ["compress_onnx", "write_onnx", "OnnxExport", "ExportedLayer", "OPSET",
           "layer_encoding", "layer_payload_bytes", "exports_of", "run_bytes"]

#: Opset of the exported model's default domain (at least).
OPSET = 21
_PROTOBUF_LIMIT = 2 ** 31 - 1


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # pragma: no cover - onnx is a declared extra
        raise ImportError("ONNX export needs onnx: pip install 'opq[onnx]'") from None
    return onnx, helper, numpy_helper


@dataclass(frozen=True)
class ExportedLayer:
    """One compressed layer of an exported ONNX model.

    ``encoding`` (see the module docstring), ``onnx_bytes`` the bytes of its initializers,
    ``dense_bytes`` the bytes of the float initializer it replaced."""

    name: str
    shape: tuple
    bits: int
    grid: str
    kept: int
    encoding: str
    onnx_bytes: int
    dense_bytes: int

    @property
    def sparsity(self) -> float:
        n = int(np.prod(self.shape))
        return 1.0 - self.kept / n if n else 0.0


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`compress_onnx` did: one :class:`ExportedLayer` per compressed layer, the
    number of other initializers updated from the compressed model, the opset."""

    layers: tuple
    updated: int
    opset: int

    onnx_bytes = total("onnx_bytes")
    dense_bytes = total("dense_bytes")

    def table(self) -> str:
        nw = max([32] + [len(e.name) for e in self.layers])  # names are never cut
        rows = [f"{'layer':{nw}s} {'bits':>4s} {'grid':>9s} {'sparsity':>8s} {'encoding':>22s} "
                f"{'bytes':>10s} {'dense':>10s}"]
        for e in self.layers:
            rows.append(f"{e.name:{nw}s} {e.bits:4d} {e.grid:>9s} {e.sparsity:8.4f} "
                        f"{e.encoding:>22s} {e.onnx_bytes:10d} {e.dense_bytes:10d}")
        rows.append(f"{'total':{nw}s} {'':4s} {'':>9s} {'':>8s} {'':>22s} {self.onnx_bytes:10d} "
                    f"{self.dense_bytes:10d}")
        return "\n".join(rows)

    def __repr__(self):
        return (f"OnnxExport({len(self.layers)} layers, {self.onnx_bytes} bytes of compressed "
                f"weights for {self.dense_bytes} dense, opset {self.opset})")


def _int_type(bits: int):
    """(ONNX element type name, NumPy dtype) of the dense codes of a symmetric layer."""
    if bits <= 3:
        return "INT4", np.int8
    if bits <= 7:
        return "INT8", np.int8
    return "INT16", np.int16


def layer_encoding(lp, prefer: str = "small") -> str:
    """The encoding :func:`compress_onnx` picks for plan layer ``lp`` (see the module
    docstring): the bitmask + symbols form decoded exactly (``prefer="small"``), or for
    symmetric layers the dense integer initializer + ``DequantizeLinear`` that
    quantized-ONNX runtimes fuse into integer kernels (``prefer="qdq"``)."""
    if prefer not in ("small", "qdq"):
        raise ValueError(f"prefer must be 'small' or 'qdq', got {prefer!r}")
    n = int(np.prod(lp.shape))
    if lp.grid not in ("offset", "symmetric", "codebook"):
        raise ValueError(f"layer {lp.name!r}: grid {lp.grid!r} has no ONNX form")
    if lp.kept == 0:
        return "zeros"
    if lp.grid == "symmetric" and prefer == "qdq":
        return f"{_int_type(lp.bits)[0].lower()}-dq"
    if lp.kept == n:
        return "codes-" + lp.grid
    return ("gap" if _gap_is_smaller(lp.kept, n) else "bitmask") + "+codes-" + lp.grid


#: A run byte: ``r < 255`` is ``r`` pruned entries then a kept one; 255 is 255 pruned.
_RUN_FILL = 255


def _gap_is_smaller(kept: int, n: int) -> bool:
    """The run-length form takes at most ``kept + n // 255`` bytes (one per kept weight,
    one per 255 pruned in a row): taken when that bound is below the bitmask's bytes."""
    return kept + n // _RUN_FILL < (n + 7) // 8


def run_bytes(mask) -> np.ndarray:
    """The run-length form of a flat mask the ``gap`` encodings store (uint8): per kept
    entry the pruned entries before it, as ``255`` for every full 255 of them and then the
    rest (< 255); trailing pruned entries are not stored.

    >>> run_bytes(np.array([0, 1, 1] + [0] * 300 + [1], bool)).tolist()
    [1, 0, 255, 45]
    """
    pos = np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1))
    gaps = np.diff(pos, prepend=-1) - 1
    fills = gaps // _RUN_FILL
    out = np.full(int(gaps.size + fills.sum()), _RUN_FILL, dtype=np.uint8)
    at = np.cumsum(fills + 1) - 1  # where each kept entry's byte goes
    out[at] = (gaps - fills * _RUN_FILL).astype(np.uint8)
    return out


def layer_payload_bytes(lp, prefer: str = "small") -> int:
    """Bytes of the initializers that hold layer ``lp`` in the exported model (codes,
    bitmask, quantizer), the few bytes of small constants excluded."""
    enc = layer_encoding(lp, prefer)
    n = int(np.prod(lp.shape))
    c = int(lp.shape[0])
    if enc == "zeros":
        return 0
    if enc.endswith("-dq"):
        t, _ = _int_type(lp.bits)
        return ((n + 1) // 2 if t == "INT4" else n * (2 if t == "INT16" else 1)) + 4 * c
    if lp.kept == n:
        index = 0
    elif enc.startswith("gap"):
        index = lp.kept + n // _RUN_FILL  # at most (the mask's runs decide)
    else:
        index = (n + 7) // 8
    size = index + (lp.kept * lp.bits + 7) // 8
    if lp.grid == "symmetric":
        return size + 8 * c
    if lp.grid == "offset":
        return size + 16 * c
    if _scaled_codebook(lp):
        return size + 8 * ((1 << lp.bits) + 1) + 8 * c
    return size + 4 * ((1 << lp.bits) + 1)


def _scaled_codebook(lp) -> bool:
    """A codebook layer whose levels are in units of channel scales other than 1."""
    return bool(np.any(np.asarray(lp.kernel_scale, np.float64) != 1.0))


class _Builder:
    """Adds the initializers and nodes of one layer (short unique names ``opq<i>_<k>``);
    small constants are shared by all layers (``shared``: key -> name)."""

    def __init__(self, prefix, shared, shared_inits):
        self.prefix = prefix
        self.nodes = []
        self.inits = []
        self.count = 0
        self.shared = shared
        self.shared_inits = shared_inits
        _, self.helper, self.nh = _onnx()

    def name(self, what=""):
        self.count += 1
        return f"{self.prefix}_{self.count}"

    def const(self, arr, what="c"):
        arr = np.asarray(arr)
        if arr.size <= 8:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key not in self.shared:
                t = self.nh.from_array(arr, f"opq_c{len(self.shared)}")
                self.shared[key] = t.name
                self.shared_inits.append(t)
            return self.shared[key]
        t = self.nh.from_array(arr, self.name())
        self.inits.append(t)
        return t.name

    def node(self, op, inputs, what=None, output=None, **attrs):
        out = output or self.name()
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
        return out


def _unpack_stream(b, buf_name, count, bits):
    """Graph: ``count`` unsigned ``bits``-bit values (int64) of an LSB-first byte stream."""
    shifts = b.const(np.arange(8, dtype=np.uint8), "shifts")
    one = b.const(np.array(1, np.uint8), "one")
    col = b.node("Unsqueeze", [buf_name, b.const(np.array([1], np.int64), "axes")])
    sh = b.node("BitShift", [col, shifts], direction="RIGHT")
    bit = b.node("BitwiseAnd", [sh, one])
    flat = b.node("Reshape", [bit, b.const(np.array([-1], np.int64), "shape")])
    cut = b.node("Slice", [flat, b.const(np.array([0], np.int64), "start"),
                           b.const(np.array([count * bits], np.int64), "end")])
    wide = b.node("Cast", [cut], to=7)  # INT64
    if bits == 1:
        return wide
    grid = b.node("Reshape", [wide, b.const(np.array([count, bits], np.int64), "shape")])
    weights = b.const((1 << np.arange(bits, dtype=np.int64)).astype(np.int64), "place")
    return b.node("ReduceSum", [b.node("Mul", [grid, weights]),
                                b.const(np.array([1], np.int64), "axes")], keepdims=0)


def _runs_to_bits(b, runs_name, n):
    """Graph: the ``n`` mask entries (int64 0/1) of the run bytes of :func:`run_bytes`:
    each byte advances ``r + 1`` entries (255: 255; ``CumSum``) and a byte below 255 marks
    the entry it lands on as kept (``ScatterElements`` into ``n + 1`` zeros, the fill
    bytes aimed at the extra last entry, which is cut off). Every shape is static, so a
    runtime folds it with the initializers (a ``Compress`` would stop onnxruntime's
    folding)."""
    r = b.node("Cast", [runs_name], to=7)  # INT64
    fill = b.const(np.array(_RUN_FILL, np.int64), "fill")
    is_fill = b.node("Equal", [r, fill])
    step = b.node("Where", [is_fill, fill, b.node("Add", [r, b.const(np.array(1, np.int64),
                                                                      "one")])])
    pos = b.node("Sub", [b.node("CumSum", [step, b.const(np.array(0, np.int64), "axis")]),
                         b.const(np.array(1, np.int64), "one")])
    target = b.node("Where", [is_fill, b.const(np.array(n, np.int64), "n"), pos])
    marks = b.node("Cast", [b.node("Not", [is_fill])], to=7)
    zero = b.nh.from_array(np.array([0], np.int64), "value")
    zeros = b.node("ConstantOfShape", [b.const(np.array([n + 1], np.int64), "n1")],
                   value=zero)
    # (the fill bytes all aim at the extra entry: "max" makes the duplicates well defined)
    bits = b.node("ScatterElements", [zeros, target, marks], axis=0, reduction="max")
    return b.node("Slice", [bits, b.const(np.array([0], np.int64), "start"),
                            b.const(np.array([n], np.int64), "end")])


def _layer_nodes(b, lp, codes, mask, out_name, elem_type, prefer):
    """Build the decode subgraph of one layer; returns the encoding."""
    from .kernels import codes_to_symbols, pack_bits, pack_mask
    onnx, helper, nh = _onnx()
    shape = tuple(int(s) for s in lp.shape)
    n = int(np.prod(shape))
    rows = shape[0]
    enc = layer_encoding(lp, prefer)
    bshape = (rows,) + (1,) * (len(shape) - 1)
    if enc == "zeros":
        val = helper.make_tensor("value", elem_type, [1], [0.0])
        b.node("ConstantOfShape", [b.const(np.array(shape, np.int64), "shape")],
               output=out_name, value=val)
        return enc
    float_out = elem_type
    if enc.endswith("-dq"):
        sd = (np.asarray(lp.kernel_scale, dtype=np.float64) * float(lp.step)).astype(np.float32)
        sname = b.const(sd, "scale")
        tname, ndt = _int_type(lp.bits)
        cd = np.asarray(codes).astype(ndt)
        if tname == "INT4":
            t = helper.make_tensor(b.name("codes"), onnx.TensorProto.INT4, list(shape),
                                   cd.reshape(-1).tolist())
            b.inits.append(t)
            cname = t.name
        else:
            cname = b.const(cd, "codes")
        deq = b.node("DequantizeLinear", [cname, sname], axis=0)
        _finish(b, deq, out_name, float_out, onnx.TensorProto.FLOAT)
        return enc
    # sparse forms: bitmask + symbols
    m = np.asarray(mask, dtype=bool).reshape(-1)
    kept_codes = np.asarray(codes).reshape(-1)[m]
    if lp.grid == "codebook":
        sym = (kept_codes.astype(np.int64) - 1).astype(np.uint8)
        code_lut = np.arange(1, (1 << lp.bits) + 1, dtype=np.int64)
    else:
        sym = codes_to_symbols(kept_codes, lp.bits)
        kb = lp.bits - 1
        s = np.arange(1 << lp.bits)
        code_lut = np.where((s >> kb) & 1, -((s & ((1 << kb) - 1)) + 1),
                            (s & ((1 << kb) - 1)) + 1).astype(np.int64)
    sym_buf = b.const(pack_bits(sym, lp.bits), "symbols")
    syms = _unpack_stream(b, sym_buf, lp.kept, lp.bits)
    kcode = b.node("Gather", [b.const(code_lut, "code_lut"), syms], axis=0)
    shp = b.const(np.array(shape, np.int64), "shape")
    zero64 = b.const(np.array(0, np.int64), "zero") if (lp.kept < n or lp.grid != "codebook") \
        else None
    if lp.kept == n:
        dense_code = b.node("Reshape", [kcode, shp])
        mask_t = None
    else:
        if enc.startswith("gap"):
            mbits = _runs_to_bits(b, b.const(run_bytes(m), "runs"), n)
        else:
            mbits = _unpack_stream(b, b.const(pack_mask(m), "bitmask"), n, 1)
        mask_flat = b.node("Cast", [mbits], to=9)  # BOOL
        rank = b.node("Sub", [b.node("CumSum", [mbits, b.const(np.array(0, np.int64), "axis")]),
                              b.const(np.array(1, np.int64), "one")])
        rank = b.node("Max", [rank, zero64])
        spread = b.node("Gather", [kcode, rank], axis=0)
        dense_flat = b.node("Where", [mask_flat, spread, zero64])
        dense_code = b.node("Reshape", [dense_flat, shp])
        mask_t = b.node("Reshape", [mask_flat, shp])
    if lp.grid == "codebook":
        table = np.concatenate([[0.0], np.asarray(lp.codebook, dtype=np.float64)])
        table = np.concatenate([table, np.zeros(max(0, (1 << lp.bits) + 1 - table.size))])
        if not _scaled_codebook(lp):  # absolute units (ANNC): the float32 table is the value
            val = b.node("Gather", [b.const(table.astype(np.float32), "codebook"), dense_code],
                         axis=0)
            _finish(b, val, out_name, float_out, onnx.TensorProto.FLOAT)
            return enc
        # levels in units of the channel scales: the kernel's float64 s_c * c_k, then float32
        val = b.node("Gather", [b.const(table, "codebook"), dense_code], axis=0)
        scale = b.const(np.asarray(lp.kernel_scale, np.float64).reshape(bshape), "scale")
        f32 = b.node("Cast", [b.node("Mul", [val, scale])], to=onnx.TensorProto.FLOAT)
        _finish(b, f32, out_name, float_out, onnx.TensorProto.FLOAT)
        return enc
    # the kernel's float64 arithmetic: offset theta + s * ((k - 0.5) * step), symmetric
    # k * (s * step)
    kf = b.node("Cast", [b.node("Abs", [dense_code])], to=11)  # DOUBLE
    s64 = np.asarray(lp.kernel_scale, np.float64)
    if lp.grid == "offset":
        theta = b.const(np.asarray(lp.thresholds, np.float64).reshape(bshape), "threshold")
        scale = b.const(s64.reshape(bshape), "scale")
        t = b.node("Mul", [b.node("Sub", [kf, b.const(np.array(0.5), "half")]),
                           b.const(np.array(float(lp.step)), "step")])
        level = b.node("Add", [theta, b.node("Mul", [scale, t])])
    else:
        level = b.node("Mul", [kf, b.const((s64 * float(lp.step)).reshape(bshape), "sd")])
    neg = b.node("Less", [dense_code, zero64])
    signed = b.node("Where", [neg, b.node("Neg", [level]), level])
    if mask_t is not None:
        signed = b.node("Where", [mask_t, signed, b.const(np.array(0.0), "zerof")])
    # float64 -> float32 (the kernel's compute dtype) -> the weight's dtype
    f32 = b.node("Cast", [signed], to=onnx.TensorProto.FLOAT)
    _finish(b, f32, out_name, float_out, onnx.TensorProto.FLOAT)
    return enc


def _finish(b, val, out_name, want, have):
    b.node("Cast" if want != have else "Identity", [val], output=out_name,
           **({"to": want} if want != have else {}))


def _tensor_bytes(t) -> int:
    return len(t.raw_data) if t.raw_data else t.ByteSize()


def compress_onnx(template, plan, codes, masks, *, other=None, prefer="small",
                  where="template"):
    """Rewrite a dense ONNX model so that the plan's layers are stored compressed.

    Parameters
    ----------
    template : onnx.ModelProto
        The dense model; every plan layer must be a float initializer of the same name and
        shape (e.g. ``torch.onnx.export(..., do_constant_folding=False)`` of the model).
        It is not modified.
    plan : opq_core.Plan
    codes, masks : mappings layer name -> integer codes / bool mask
        (:func:`opq_core.format.layer_codes`).
    other : mapping name -> array, optional
        Other tensors of the compressed model (biases, norms): initializers of the same name
        and shape take these values.
    prefer : {"small", "qdq"}
        ``"small"``: each layer's smallest encoding; ``"qdq"``: symmetric layers as
        integer initializers + ``DequantizeLinear`` (the pattern quantized-ONNX runtimes
        fuse), whatever their size.
    where : str
        How to name the template in error messages.

    Returns
    -------
    (onnx.ModelProto, OnnxExport)

    Raises
    ------
    ValueError
        A layer that cannot be expressed, named with the reason.
    """
    onnx, helper, nh = _onnx()
    if prefer not in ("small", "qdq"):
        raise ValueError(f"export: prefer must be 'small' or 'qdq', got {prefer!r}")
    if not isinstance(template, onnx.ModelProto):
        raise TypeError(f"compress_onnx: template must be an onnx.ModelProto, got "
                        f"{type(template).__name__}")
    model = onnx.ModelProto()
    model.CopyFrom(template)
    g = model.graph
    inits = {t.name: i for i, t in enumerate(g.initializer)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    # exporters deduplicate equal initializers (two all-zero layers, say): the duplicate is
    # then the output of an Identity of the kept one; that Identity is replaced too
    alias = {}
    for i, nd in enumerate(g.node):
        if nd.op_type == "Identity" and len(nd.output) == 1 and nd.input \
                and nd.input[0] in inits:
            alias[nd.output[0]] = (i, nd.input[0])
    plan_names = {lp.name for lp in plan.layers}
    identities = set()
    for lp in plan.layers:
        if lp.name not in inits and lp.name in alias:
            i, src = alias[lp.name]
            identities.add(i)
            inits[lp.name] = inits[src]
        if lp.name not in inits:
            raise ValueError(f"export: layer {lp.name!r} is not an initializer of {where} (its "
                             "weights must be stored under the layer's name; export the "
                             "dense model with do_constant_folding=False)")
        t = g.initializer[inits[lp.name]]
        if tuple(t.dims) != tuple(lp.shape):
            raise ValueError(f"export: layer {lp.name!r} has shape {tuple(lp.shape)} in the "
                             f"plan, {tuple(t.dims)} in {where}")
        if t.data_type not in floats:
            raise ValueError(f"export: layer {lp.name!r} is a "
                             f"{onnx.TensorProto.DataType.Name(t.data_type)} initializer in "
                             f"{where}; only float weights can be replaced")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"export: layer {lp.name!r} is stored as external data in "
                             f"{where}; load the template with its external data")
        if lp.name not in codes or lp.name not in masks:
            raise ValueError(f"export: layer {lp.name!r} has no codes or mask")
        if lp.grid not in ("offset", "symmetric", "codebook"):
            raise ValueError(f"export: layer {lp.name!r} has grid {lp.grid!r}, which has no "
                             "ONNX form")
        if lp.grid == "codebook" and lp.codebook is not None and len(lp.codebook) > (1 << lp.bits):
            raise ValueError(f"export: layer {lp.name!r} has {len(lp.codebook)} centroids for "
                             f"{lp.bits} bits")
    layers = []
    new_nodes = []
    drop = set()
    shared, shared_inits = {}, []
    for i, lp in enumerate(plan.layers):
        t = g.initializer[inits[lp.name]]
        b = _Builder(f"opq{i}", shared, shared_inits)
        enc = _layer_nodes(b, lp, codes[lp.name], masks[lp.name], lp.name, t.data_type,
                           prefer)
        new_nodes.extend(b.nodes)
        g.initializer.extend(b.inits)
        layers.append(ExportedLayer(lp.name, tuple(int(s) for s in lp.shape), int(lp.bits),
                                    lp.grid, int(lp.kept), enc,
                                    sum(_tensor_bytes(x) for x in b.inits), _tensor_bytes(t)))
        drop.add(lp.name)
    g.initializer.extend(shared_inits)
    updated = 0
    if other:
        for i, t in enumerate(g.initializer):
            if t.name in other and t.name not in drop:
                a = np.asarray(other[t.name])
                if tuple(a.shape) != tuple(t.dims):
                    continue
                old = nh.to_array(t)
                g.initializer[i].CopyFrom(nh.from_array(a.astype(old.dtype), t.name))
                updated += 1
        # a deduplicated tensor whose value in the compressed model differs from the one
        # it was merged with gets its own initializer again
        values = {t.name: t for t in g.initializer}
        for name, (i, src) in alias.items():
            if name in other and name not in plan_names and src in values and \
                    tuple(np.shape(other[name])) == tuple(values[src].dims):
                srcv = nh.to_array(values[src])
                a = np.asarray(other[name]).astype(srcv.dtype)
                if not np.array_equal(a, srcv):
                    g.initializer.append(nh.from_array(a, name))
                    identities.add(i)
                    updated += 1
    kept_inits = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    kept_inputs = [v for v in g.input if v.name not in drop]
    del g.input[:]
    g.input.extend(kept_inputs)
    old_nodes = [nd for j, nd in enumerate(g.node) if j not in identities]
    del g.node[:]
    g.node.extend(new_nodes + old_nodes)
    opset = OPSET
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = max(OPSET, int(imp.version))
            imp.version = opset
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = max(int(model.ir_version), 10)
    return model, OnnxExport(tuple(layers), updated, opset)


def write_onnx(model, path) -> int:
    """Write ``model`` to ``path`` atomically (never over the template); returns bytes."""
    onnx, _, _ = _onnx()
    data = model.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise ValueError(f"export: the ONNX model is {len(data)} bytes, over protobuf's 2 GiB "
                         "limit for a single file")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent) or ".", prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def exports_of(cf, mask_costs=None) -> list:
    """Per layer of a read ``.opq`` file (:class:`opq_core.format.CompressedFile`), what each
    way to run it keeps compressed: ``onnx`` (the encoding of :func:`compress_onnx`) and
    ``onnx_bytes``; ``pack`` (the index of :func:`opq_torch.pack`: ``"bitmask"``,
    ``"gap"``, ``"none"``, or ``None`` when only the masks would tell: an entropy-coded file
    read without decoding) with ``bits``-bit codes. ``mask_costs``: name ->
    :class:`opq_core.kernels.MaskCodingCost` of layers decoded one at a time (their masks
    are not kept)."""
    from .kernels import mask_coding_cost
    out = []
    for lp, rec in zip(cf.plan.layers, cf.layers):
        n = int(np.prod(lp.shape))
        if lp.kept in (0, n):
            pack = "none"
        elif cf.layout == "packed":
            pack = rec.mask_coding
        elif lp.name in cf.masks or lp.name in (mask_costs or {}):
            cost = (mask_costs or {}).get(lp.name) or mask_coding_cost(cf.masks[lp.name])
            pack = "gap" if cost["gap"] < cost["bitmask"] else "bitmask"
        else:
            pack = None
        out.append({"name": lp.name, "onnx": layer_encoding(lp),
                    "onnx_bytes": layer_payload_bytes(lp), "pack": pack, "bits": int(lp.bits),
                    "qdq": layer_encoding(lp, "qdq")})
    return out
