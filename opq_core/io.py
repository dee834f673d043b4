"""Read and write weight tensors: .npz, .safetensors, .pt/.pth (state_dict), .onnx.

Readers are lazy: :func:`open_weights` returns a read-only mapping that loads a tensor
when it is accessed (safetensors tensors are memory-mapped), so a planner can work one
tensor at a time. torch is imported only by the .pt reader/writer, onnx only by the .onnx
ones. Writers are atomic: a temporary file in the same folder, fsync, then rename.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["open_weights", "load_weights", "save_weights", "atomic_write", "tensor_info",
           "FORMATS"]

FORMATS = {".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt",
           ".bin": "pt", ".onnx": "onnx"}


def _format_of(path, argument="path") -> str:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"{argument}: unknown weight file type {ext!r} of {str(path)!r}; "
                         f"expected one of {sorted(FORMATS)}")
    return FORMATS[ext]


class LazyWeights(Mapping):
    """Read-only mapping name -> np.ndarray that loads each tensor on access."""

    def __init__(self, names, loader, path, fmt, closer=None, info=None):
        self._names = list(names)
        self._set = set(self._names)
        self._loader = loader
        self._info = info
        self.path = str(path)
        self.format = fmt
        self._closer = closer

    def __getitem__(self, name):
        if name not in self._set:
            raise KeyError(name)
        return self._loader(name)

    def tensor_info(self, name) -> tuple:
        """``(shape, dtype)`` of a tensor, from the file's metadata when it has them
        (safetensors header, .npy headers of an .npz) instead of reading the data."""
        if name not in self._set:
            raise KeyError(name)
        if self._info is not None:
            return self._info(name)
        a = self._loader(name)
        return tuple(a.shape), np.dtype(a.dtype)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def close(self):
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{self.format} weights {self.path!r}: {len(self)} tensors>"


def open_weights(path) -> LazyWeights:
    """Open a weight file lazily (see module doc). Raises a clear error for a missing,
    unreadable or corrupt file."""
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        if fmt == "npz":
            z = np.load(path, allow_pickle=False)
            return LazyWeights(z.files, lambda n: z[n], path, fmt, z.close,
                               info=lambda n: _npz_info(z, n))
        if fmt == "safetensors":
            header = _safetensors_header(path)
            names = [k for k in header if k != "__metadata__"]
            return LazyWeights(names, lambda n: _read_safetensors_tensor(path, header, n), path,
                               fmt, info=lambda n: _safetensors_info(header, n))
        if fmt == "pt":
            sd = _load_pt(path)
            return LazyWeights(sd.keys(), sd.__getitem__, path, fmt)
        if fmt == "onnx":
            tensors = _load_onnx(path)
            return LazyWeights(tensors.keys(), tensors.__getitem__, path, fmt)
    except (FileNotFoundError, ValueError, TypeError):
        raise
    except Exception as exc:
        raise ValueError(f"path: cannot read {str(path)!r} as {fmt}: {exc}") from None
    raise AssertionError(fmt)  # pragma: no cover


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4",
              "U64": "<u8"}


def _safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length + JSON)."""
    import json
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"path: {str(path)!r} is too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"path: {str(path)!r} has a corrupt safetensors header length {n}")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"path: {str(path)!r} has a corrupt safetensors header")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        if not 0 <= lo <= hi or 8 + n + hi > size:
            raise ValueError(f"path: {str(path)!r} is truncated: tensor {name!r} needs bytes "
                             f"{lo}..{hi} of the payload, the file has {size - 8 - n}")
        info["_start"] = 8 + n + lo
    return header


def _safetensors_info(header, name):
    info = header[name]
    dt = info["dtype"]
    if dt == "BF16":
        return tuple(info["shape"]), np.dtype(np.float32)
    if dt not in _ST_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {dt!r}")
    return tuple(info["shape"]), np.dtype(_ST_DTYPES[dt])


def _read_safetensors_tensor(path, header, name):
    """Read one tensor with a plain file read (no memory map: the pages of tensors already
    used do not stay resident, so memory is bounded by the largest tensor)."""
    info = header[name]
    shape = tuple(info["shape"])
    lo, hi = info["data_offsets"]
    count = int(np.prod(shape))
    dt = info["dtype"]
    with open(path, "rb") as f:
        f.seek(info["_start"])
        if dt == "BF16":
            raw = np.fromfile(f, dtype="<u2", count=count)
            if raw.size != count:
                raise ValueError(f"tensor {name!r}: truncated data")
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        _, dtype = _safetensors_info(header, name)
        if count * dtype.itemsize != hi - lo:
            raise ValueError(f"tensor {name!r}: {hi - lo} bytes do not hold {shape} of {dt}")
        arr = np.fromfile(f, dtype=dtype, count=count)
    if arr.size != count:
        raise ValueError(f"tensor {name!r}: truncated data")
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def tensor_info(weights: Mapping, name) -> tuple:
    """``(shape, dtype)`` of ``weights[name]``, without reading the data when the mapping
    can tell (:meth:`LazyWeights.tensor_info`)."""
    info = getattr(weights, "tensor_info", None)
    if info is not None:
        return info(name)
    a = weights[name]
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    return tuple(a.shape), np.dtype(a.dtype)


def _npz_info(z, name):
    """Shape and dtype from the .npy header of one member of an .npz archive."""
    member = name if name in z.zip.namelist() else name + ".npy"
    with z.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype)


def load_weights(path) -> dict:
    """Read every tensor of a weight file into a dict name -> np.ndarray."""
    with open_weights(path) as w:
        return {k: np.array(w[k]) for k in w}


def _load_pt(path) -> dict:
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise ImportError("reading .pt/.pth files needs torch: pip install 'opq[torch]'") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"path: {str(path)!r} does not hold a state_dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            out[str(k)] = t.numpy()
    return out


def _load_onnx(path) -> dict:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover
        raise ImportError("reading .onnx files needs onnx: pip install 'opq[onnx]'") from None
    model = onnx.load(str(path), load_external_data=True)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def atomic_write(path, write_fn, *, mode="wb"):
    """Call ``write_fn(file)`` on a temporary file next to ``path``, fsync, rename.

    The previous file at ``path`` (if any) stays intact when anything fails.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_weights(path, weights: Mapping, *, template=None) -> None:
    """Write tensors atomically in the format given by the extension.

    For .onnx, ``template`` is the original .onnx file whose initializers are replaced.
    """
    fmt = _format_of(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in weights.items()}
    if fmt == "npz":
        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
                for k, v in arrays.items():
                    with z.open(k + ".npy", "w", force_zip64=True) as g:
                        np.lib.format.write_array(g, v, allow_pickle=False)
        atomic_write(path, write)
    elif fmt == "safetensors":
        from safetensors.numpy import save
        data = save(arrays)
        atomic_write(path, lambda f: f.write(data))
    elif fmt == "pt":
        import io as _io

        import torch
        buf = _io.BytesIO()
        torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, buf)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    elif fmt == "onnx":
        import onnx
        from onnx import numpy_helper
        if template is None:
            raise ValueError("template: writing .onnx needs the original .onnx model as template")
        model = onnx.load(str(template))
        for init in model.graph.initializer:
            if init.name in arrays:
                init.CopyFrom(numpy_helper.from_array(arrays[init.name].astype(
                    numpy_helper.to_array(init).dtype), init.name))
        data = model.SerializeToString()
        atomic_write(path, lambda f: f.write(data))
