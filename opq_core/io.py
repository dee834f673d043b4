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

__all__ = ["open_weights", "open_folder", "load_weights", "save_weights", "atomic_write",
           "tensor_info", "write_safetensors_stream", "FORMATS"]

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

    #: ``{name: dtype name}`` of tensors stored in a dtype NumPy lacks (``"bfloat16"``),
    #: returned as float32; ``{alias: name}`` of the names of a .pt file that share
    #: another name's tensor (tied weights): read once, under the first name.
    source_dtypes: dict = {}
    aliases: dict = {}

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
    unreadable or corrupt file. A folder is read as one model (:func:`open_folder`)."""
    path = Path(path)
    if path.is_dir():
        return open_folder(path)
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
            lw = LazyWeights(names, lambda n: _read_safetensors_tensor(path, header, n), path,
                             fmt, info=lambda n: _safetensors_info(header, n))
            lw.source_dtypes = {n: "bfloat16" for n in names if header[n]["dtype"] == "BF16"}
            return lw
        if fmt == "pt":
            sd, src, aliases = _load_pt_full(path)
            lw = LazyWeights(sd.keys(), sd.__getitem__, path, fmt)
            lw.source_dtypes, lw.aliases = src, aliases
            return lw
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
    return _load_pt_full(path)[0]


def _load_pt_full(path) -> tuple:
    """``(tensors, source dtypes, aliases)`` of a state_dict file. Names that share
    another name's tensor (same storage, offset, shape and strides: tied weights, which
    ``torch.save`` stores once) are read once, under their first name."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise ImportError("reading .pt/.pth files needs torch: pip install 'opq[torch]'") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"path: {str(path)!r} does not hold a state_dict (got {type(obj).__name__})")
    out, src, aliases, seen = {}, {}, {}, {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            if t.numel():
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                       t.stride(), t.dtype)
                if key in seen:
                    aliases[str(k)] = seen[key]
                    continue
                seen[key] = str(k)
            if t.dtype == torch.bfloat16:
                t = t.float()
                src[str(k)] = "bfloat16"
            out[str(k)] = t.numpy()
    return out, src, aliases


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


# ---------------------------------------------------------------------------------------
# model folders (save_pretrained) and shards
# ---------------------------------------------------------------------------------------

_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")


def _folder_files(folder: Path) -> list:
    import json
    for name in _FOLDER_FILES:
        p = folder / name
        if not p.is_file():
            continue
        if not name.endswith(".index.json"):
            return [p]
        try:
            wm = json.loads(p.read_text()).get("weight_map")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"path: {str(p)!r} is not a readable shard index ({exc})") from None
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"path: {str(p)!r} has no weight_map")
        files = []
        for shard in wm.values():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ValueError(f"path: {str(p)!r} names shard {shard!r}, which is not a file "
                                 "of the folder")
            if (folder / shard) not in files:
                files.append(folder / shard)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"path: shard {f.name!r} of {str(p)!r} is missing")
        return files
    raise FileNotFoundError(f"path: folder {str(folder)!r} holds none of "
                            f"{', '.join(_FOLDER_FILES)}")


def open_folder(folder) -> LazyWeights:
    """A Hugging Face model folder as one lazy mapping: ``model.safetensors``, the shards
    of ``model.safetensors.index.json``, or ``pytorch_model.bin`` (and its shards), read
    with ``weights_only``. A planner sees every tensor of every shard, so the allocation
    stays global."""
    folder = Path(folder)
    files = _folder_files(folder)
    parts = [open_weights(f) for f in files]
    owner, names = {}, []
    for part in parts:
        for n in part:
            if n in owner:
                raise ValueError(f"path: tensor {n!r} is in two shards of {str(folder)!r}: "
                                 f"{Path(owner[n].path).name} and {Path(part.path).name}")
            owner[n] = part
            names.append(n)

    def close():
        for part in parts:
            part.close()

    lw = LazyWeights(names, lambda n: owner[n][n], folder, "folder", close,
                     info=lambda n: owner[n].tensor_info(n))
    lw.source_dtypes = {k: v for part in parts for k, v in part.source_dtypes.items()}
    lw.aliases = {k: v for part in parts for k, v in part.aliases.items()}
    lw.files = tuple(str(f) for f in files)
    return lw


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (torch's rounding)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = np.isnan(a)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    r = r.astype(np.uint16)
    if nan.any():
        r[nan] = np.uint16(0x7FC0)
    return r


_ST_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
            "uint16": "U16", "uint32": "U32", "uint64": "U64"}


def write_safetensors_stream(path, specs, produce, *, max_shard_bytes=None,
                             progress=False) -> list:
    """Write tensors to ``.safetensors`` one at a time (memory: one tensor).

    ``specs``: ``[(name, shape, dtype name)]`` in writing order (``"bfloat16"`` allowed);
    ``produce(name)`` returns the array (float32 for bfloat16). With ``max_shard_bytes``,
    tensors go to ``<stem>-0000i-of-0000n.safetensors`` shards plus a
    ``<stem>.safetensors.index.json`` (Hugging Face's layout; ``path`` is then the index's
    stem). Every file is written atomically. Returns the written paths.
    """
    import json
    path = Path(path)
    sizes = []
    for name, shape, dt in specs:
        item = 2 if dt == "bfloat16" else np.dtype(dt).itemsize
        sizes.append(int(np.prod(shape, dtype=np.int64)) * item)
    groups = [[]]
    acc = 0
    for i, nb in enumerate(sizes):
        if max_shard_bytes and groups[-1] and acc + nb > max_shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += nb
    if not max_shard_bytes:
        targets = [path]
    else:
        stem = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        n = len(groups)
        targets = [path.with_name(f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors") for k in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), desc="write", unit="tensor", leave=False)
    written = []
    for target, group in zip(targets, groups):
        header, off = {}, 0
        for i in group:
            name, shape, dt = specs[i]
            code = "BF16" if dt == "bfloat16" else _ST_CODE[np.dtype(dt).name]
            header[name] = {"dtype": code, "shape": [int(d) for d in shape],
                            "data_offsets": [off, off + sizes[i]]}
            off += sizes[i]
        hj = json.dumps(header, separators=(",", ":")).encode()
        hj += b" " * (-(8 + len(hj)) % 8)

        def write(f, group=group, hj=hj):
            f.write(len(hj).to_bytes(8, "little"))
            f.write(hj)
            for i in group:
                name, shape, dt = specs[i]
                a = np.asarray(produce(name))
                if tuple(a.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r}: produced shape {a.shape}, declared {shape}")
                if dt == "bfloat16":
                    data = _to_bf16_bits(a).astype("<u2").tobytes()
                else:
                    want = np.dtype(dt)
                    data = np.ascontiguousarray(a, dtype=want.newbyteorder("<")
                                                if want.itemsize > 1 else want).tobytes()
                f.write(data)
                del a, data
                if bar is not None:
                    bar.update(1)

        atomic_write(target, write)
        written.append(str(target))
    if bar is not None:
        bar.close()
    if max_shard_bytes:
        index = {"metadata": {"total_size": int(sum(sizes))},
                 "weight_map": {specs[i][0]: targets[k].name
                                for k, g in enumerate(groups) for i in g}}
        ip = path.with_name(f"{stem}.safetensors.index.json")
        data = json.dumps(index, indent=2).encode()
        atomic_write(ip, lambda f: f.write(data))
        written.append(str(ip))
    return written
