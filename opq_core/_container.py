"""The .opq container's constants, its error type and its result objects (CompressedFile,
LayerRecord: the storage accounting of a written file)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._results import layer_table, shape_text, total



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

    n = total("n")
    kept = total("kept")

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
        """Per-layer table with totals (plain text); layer names are never cut."""
        sp = 1.0 - self.kept / self.n if self.n else 0.0
        return layer_table(
            self.layers,
            lambda nw: (f"{'layer':<{nw}} {'shape':<16} {'bits':>4} {'grid':>9} {'sparsity':>8} {'kept':>9} "
                        f"{'mask':>7} {'bytes':>10} {'paper':>8} {'storage':>8}"),
            lambda r, nw: (f"{r.name:<{nw}} {shape_text(r.shape, 16):<16} {r.bits:>4d} {r.grid:>9} "
                           f"{r.sparsity:>8.4f} {r.kept:>9d} {r.mask_coding:>7} "
                           f"{r.nbytes:>10d} {_rate(r.paper_rate):>8} "
                           f"{_rate(r.storage_rate):>8}"),
            lambda nw: (f"{'total':<{nw}} {len(self.layers):>3d} layers{'':<6} {'':>4} {'':>9} "
                        f"{sp:>8.4f} {self.kept:>9d} {'':>7} {self.compressed_bytes:>10d} "
                        f"{_rate(self.paper_rate):>8} {_rate(self.storage_rate):>8}"),
            [f"layout={self.layout} version={self.version} file={self.file_bytes} bytes "
             f"(other tensors {self.other_bytes} bytes) paper_rate="
             f"{_rate(self.paper_rate)} storage_rate={_rate(self.storage_rate)}"],
            max_rows)

    def __repr__(self):
        return f"CompressedFile({self.path!r},\n{self.table(max_rows=40)}\n)"


def _rate(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.2f}x"


def _finite(v: float):
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

#: A ``.opq`` file may declare at most this many weights per byte of file (compressed
#: layers and other tensors together). It is a storage_rate of 4096x, far beyond what any
#: real model compresses to; it bounds what a forged but consistent file can make a
#: reader allocate (decoding holds about 16 bytes per declared weight at most, so
#: ``read_opq`` never asks for more than ``16 * MAX_WEIGHTS_PER_BYTE`` bytes per byte of
#: file). :func:`write_opq` refuses to write a file over the limit.
MAX_WEIGHTS_PER_BYTE = 1024
#: The zlib-compressed description may expand at most this much (plus 64 KiB); a real
#: one expands 3-10x.
_DESC_MAX_RATIO = 64
def _where(path, layer=None, field=None) -> str:
    w = f"{str(path)!r}"
    if layer is not None:
        w += f": layer {layer!r}"
    if field is not None:
        w += f": field {field!r}"
    return w


def _bad(path, what, layer=None, field=None) -> OpqFormatError:
    return OpqFormatError(f"{_where(path, layer, field)}: {what}")
