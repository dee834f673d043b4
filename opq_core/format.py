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

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping

import numpy as np

from ._container import (CompressedFile, FORMAT_VERSION, LAYOUTS, LayerRecord,
                         MAX_WEIGHTS_PER_BYTE, OpqFormatError, _HEADER_TENSOR, _NP_DTYPES,
                         _PARTS, _PREFIX, _SHA_ZERO, _ST_DTYPES, _bad)
from ._codec import (_bar, _decode_layer_blob, _decode_layer_dense, _encode_layer,
                     _weight_and_mask, compress_weights, decode_layer, layer_codes)
from ._opqcheck import (_check_description, _description, _entry_bytes, _parse)


__all__ = ["FORMAT_VERSION", "LAYOUTS", "write_opq", "opq_file_bytes", "read_opq", "OpqStream", "compress_weights",
           "layer_codes", "decode_layer", "CompressedFile", "LayerRecord", "OpqFormatError",
           "MAX_WEIGHTS_PER_BYTE"]

# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def _plan_header(plan) -> dict:
    d = plan.to_dict()
    d.pop("totals", None)
    # the size of the file and its budget: not part of it (the smallest file of a model
    # must not depend on the digits of the budget)
    d.pop("predicted_bytes", None)
    d.pop("budget_bytes", None)
    # nor how long planning took: the same weights and plan give the same bytes
    for key in plan._TIMINGS:
        d.pop(key, None)
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


class _Layout:
    """Everything :func:`write_opq` writes, assembled in memory (no file touched)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def file_bytes(self) -> int:
        return len(self.prefix) + len(self.hjson) + self.off


def _assemble(path, plan, weights, codes, masks, other, layout, metadata, progress, cache=None):
    """Encode every layer and build the header of the file :func:`write_opq` writes.

    ``cache`` (a dict, optional): the latest encoding of every layer by name, reused when
    the layer's plan is the same (a search over plans of the same weights)."""
    from ._plan import Plan
    from .io import tensor_info
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
        key = None
        if cache is not None:
            key = (layout, json.dumps(lp.to_dict(), sort_keys=True))
            hit = cache.get(lp.name)
            if hit is not None and hit[0] == key:
                blobs.append(hit[1])
                infos.append(hit[2])
                continue
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
        if cache is not None:
            cache[lp.name] = (key, blob, info)
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
    declared = plan.n + sum(math.prod(e[2]) for e in others)
    if declared > MAX_WEIGHTS_PER_BYTE * (8 + len(hjson) + off):
        raise ValueError(f"path: {str(path)!r} would hold {declared} weights in "
                         f"{8 + len(hjson) + off} bytes, more than the {MAX_WEIGHTS_PER_BYTE} "
                         "per byte a .opq reader accepts (a model of mostly pruned layers: "
                         "exclude the empty ones)")
    prefix = struct.pack("<Q", len(hjson))
    return _Layout(prefix=prefix, hjson=hjson, entries=entries, sha_at=sha_at, others=others,
                   other=other, meta=meta, header=header, infos=infos, desc=desc, off=off)


def opq_file_bytes(plan, weights: Mapping | None = None, *, codes: Mapping | None = None,
                   masks: Mapping | None = None, other: Mapping | None = None,
                   layout: str = "entropy", metadata: Mapping | None = None,
                   _cache: dict | None = None) -> int:
    """The exact size in bytes of the file :func:`write_opq` would write with the same
    arguments, computed in memory (every layer is encoded; nothing is written; the
    ``other`` tensors' data is not read, only their shapes and dtypes)."""
    return _assemble("<memory>", plan, weights, codes, masks, other, layout, metadata,
                     False, _cache).file_bytes


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
        Latent weights of the plan's layers, in the plan's layout (``LayerPlan.shape``;
        quantized here with the plan; a lazy mapping is read one tensor at a time). Give
        ``weights`` or ``codes``.
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
    from .io import atomic_write
    lay = _assemble(path, plan, weights, codes, masks, other, layout, metadata, progress)
    prefix, hjson, entries, sha_at, others = (lay.prefix, lay.hjson, lay.entries,
                                              lay.sha_at, lay.others)
    other, meta, header, infos, desc, off = (lay.other, lay.meta, lay.header, lay.infos,
                                             lay.desc, lay.off)

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

    The weights and masks are in the plan's layout (``LayerPlan.shape``, output channels
    first); ``LayerPlan.to_stored`` gives the stored tensor's for a layer planned along
    another ``channel_axis`` (:class:`OpqStream` returns that layout).

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
    from ._plan import Plan
    from .io import WeightFileError, check_input_file
    try:
        check_input_file(path)  # before open(): opening a FIFO would block
    except WeightFileError as exc:
        raise OpqFormatError(str(exc)) from None
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no such file {str(path)!r}") from None
    except IsADirectoryError:
        raise OpqFormatError(f"path: {str(path)!r} is a directory, not a file") from None
    except PermissionError as exc:
        raise OpqFormatError(f"path: cannot read {str(path)!r} ({exc.strerror})") from None
    layer = None
    try:
        with f:
            fb, header, start, version, layout = _parse(path, f)
            desc = _description(path, _entry_bytes(path, fb, header, start, _HEADER_TENSOR))
            plan_d, infos, other_names = _check_description(path, fb, header, start, desc,
                                                            version, layout, fb.size)
            try:
                plan = Plan.from_dict(plan_d)
            except (KeyError, TypeError, ValueError) as exc:
                raise _bad(path, f"malformed plan ({type(exc).__name__}: {exc})",
                           field="plan") from None
            weights, masks, other = {}, {}, {}
            if decode:
                for lp, info in _bar(list(zip(plan.layers, infos)), progress, "decode"):
                    layer = lp.name
                    blob = _entry_bytes(path, fb, header, start, _PREFIX + lp.name, lp.name)
                    try:
                        mask, dense = _decode_layer_dense(lp, blob, info)
                        del blob
                        masks[lp.name] = mask
                        weights[lp.name] = dense
                        del dense
                    except (OpqFormatError, ValueError) as exc:
                        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        if text.startswith(f"layer {lp.name!r}: "):
                            text = text[len(f"layer {lp.name!r}: "):]
                        raise _bad(path, text, layer=lp.name) from None
                layer = None
                for name in other_names:
                    e = header[name]
                    dt = np.dtype(_NP_DTYPES[e["dtype"]])
                    a, b = e["data_offsets"]
                    le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
                    arr = np.frombuffer(fb[start + a:start + b], dtype=le).astype(dt)
                    other[name] = arr.reshape(tuple(e["shape"]))
                    del arr
            size = fb.size
            other_bytes = 0
            for name in other_names:
                e = header[name]
                other_bytes += int(e["data_offsets"][1]) - int(e["data_offsets"][0])
                other_bytes += len(json.dumps({name: {k: e[k] for k in e if k != "_start"}},
                                              separators=(",", ":"))) - 1
            records = _records(plan, infos, header, size, other_bytes, desc)
    except (OpqFormatError, FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # a bug or an unforeseen malformation: never a bare error
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise _bad(path, f"corrupt or unreadable ({type(exc).__name__}: {msg})",
                   layer=layer) from None
    return CompressedFile(path=str(path), version=version, layout=layout, plan=plan,
                          weights=weights, masks=masks, other=other, layers=records,
                          file_bytes=size, other_bytes=other_bytes,
                          metadata=dict(desc.get("metadata") or {}),
                          other_names=tuple(other_names))


class OpqStream:
    """A ``.opq`` file decoded one tensor at a time (memory: one tensor), for writers that
    stream (``opq decompress``, ``opq inspect --verify``). The file is checked as
    :func:`read_opq` checks it, and every tensor as it is decoded.

    >>> import numpy as np, tempfile, os, opq_core
    >>> w = {"fc": np.random.default_rng(0).laplace(size=(8, 16)).astype(np.float32)}
    >>> p = opq_core.plan(w, sparsity=0.5, bits=3)
    >>> f = os.path.join(tempfile.mkdtemp(), "m.opq")
    >>> _ = write_opq(f, p, w)
    >>> with OpqStream(f) as s:
    ...     np.array_equal(s.tensor("fc"), p.apply(w)["fc"])
    True
    """

    def __init__(self, path):
        self.file = read_opq(path, decode=False)
        self.plan = self.file.plan
        self._path = path
        self._f = open(path, "rb")
        try:
            self._fb, self._header, self._start, version, layout = _parse(path, self._f)
            desc = _description(path, _entry_bytes(path, self._fb, self._header, self._start,
                                                   _HEADER_TENSOR))
            _, infos, _ = _check_description(path, self._fb, self._header, self._start, desc,
                                             version, layout, self._fb.size)
        except BaseException:
            self._f.close()
            raise
        self._infos = dict(zip(self.plan.names, infos))

    @property
    def names(self) -> list:
        """Every tensor: the other tensors, then the compressed layers."""
        return list(self.file.other_names) + list(self.plan.names)

    def info(self, name) -> tuple:
        """``(shape, NumPy dtype)`` of a tensor as :meth:`tensor` returns it."""
        if name in self._infos:
            lp = self.plan[name]
            return lp.stored_shape, np.dtype(lp.dtype)
        e = self._header[name]
        return tuple(e["shape"]), np.dtype(_NP_DTYPES[e["dtype"]])

    def layer_codes(self, name) -> tuple:
        """``(mask, codes)`` of a compressed layer, its blob decoded and checked in full
        (what :meth:`tensor` dequantizes; ``opq inspect --verify`` needs no more)."""
        return self._decode(name, _decode_layer_blob)

    def _dense(self, name, want_values, want_mask=True):
        return self._decode(name, _decode_layer_dense, want_values, want_mask)

    def _decode(self, name, decoder, *args):
        """``decoder(plan, blob, info, *args)`` on a compressed layer's blob; a bad blob
        raises the file's one-line error naming the layer."""
        blob = _entry_bytes(self._path, self._fb, self._header, self._start,
                            _PREFIX + name, name)
        try:
            return decoder(self.plan[name], blob, self._infos[name], *args)
        except (OpqFormatError, ValueError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _bad(self._path, text, layer=name) from None

    def layer_mask(self, name) -> np.ndarray:
        """A compressed layer's mask (plan layout), its blob decoded and checked in full as
        :meth:`layer_codes` does (what ``opq inspect --verify`` needs)."""
        return self._dense(name, False)[0]

    def tensor(self, name) -> np.ndarray:
        """A compressed layer's dense weights (in the stored tensor's layout, see
        ``LayerPlan.channel_axis``), or another tensor as it was written."""
        if name in self._infos:
            lp = self.plan[name]
            return np.ascontiguousarray(lp.to_stored(self._dense(name, True, False)[1]))
        if name not in self.file.other_names:
            raise KeyError(name)
        e = self._header[name]
        dt = np.dtype(_NP_DTYPES[e["dtype"]])
        a, b = e["data_offsets"]
        le = dt.newbyteorder("<") if dt.itemsize > 1 else dt
        raw = self._fb[self._start + a:self._start + b]
        return np.frombuffer(raw, dtype=le).astype(dt).reshape(tuple(e["shape"]))

    def decoded(self, names=None, *, masks=False, workers=None):
        """``(name, array)`` for ``names`` (default :attr:`names`) in order: the tensors
        (:meth:`tensor`), or with ``masks=True`` the masks of compressed layers
        (:meth:`layer_mask`). ``workers`` threads (default: the CPU count, at most 8) decode
        the next tensors while the caller uses one: memory is about ``workers + 1``
        tensors. The decoding kernels release the GIL; errors surface in order, as the
        tensor they concern is reached."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        names = list(self.names if names is None else names)
        fn = self.layer_mask if masks else self.tensor
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        workers = max(1, int(workers))
        if workers == 1 or len(names) < 2:
            for n in names:
                yield n, fn(n)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="opq-decode") as pool:
            queue = deque()
            todo = iter(names)
            try:
                for n in todo:
                    queue.append((n, pool.submit(fn, n)))
                    if len(queue) >= workers:
                        break
                while queue:
                    n, fut = queue.popleft()
                    for m in todo:
                        queue.append((m, pool.submit(fn, m)))
                        break
                    yield n, fut.result()
                    del fut
            finally:
                for _, fut in queue:
                    fut.cancel()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
