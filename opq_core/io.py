"""Read and write weight tensors: .npz, .safetensors, .pt/.pth (state_dict), .onnx.

Readers are lazy: :func:`open_weights` returns a read-only mapping that loads a tensor
when it is accessed (safetensors tensors are memory-mapped), so a planner can work one
tensor at a time. torch is imported only by the .pt reader/writer, onnx only by the .onnx
ones. Writers are atomic: a temporary file in the same folder, fsync, then rename.
"""
from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["open_weights", "open_folder", "load_weights", "save_weights", "atomic_write",
           "tensor_info", "write_safetensors_stream", "FORMATS", "WeightFileError",
           "MAX_EXPANSION"]


from ._atomic import atomic_write, clean_stale_temporaries  # noqa: F401 (re-exported)
from ._readers import (WeightFileError, _check_npz, _load_onnx, _load_pt_full, _npz_info,
                       _npz_member, _onnx_model, _read_safetensors_tensor, _safetensors_header,
                       _safetensors_info, check_input_file, MAX_EXPANSION, FORMATS,
                       _first_line, _format_of)  # noqa: F401
from ._shards import write_safetensors_stream  # noqa: F401 (re-exported)



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
    check_input_file(path)
    try:
        if fmt == "npz":
            _check_npz(path)
            z = np.load(path, allow_pickle=False)
            return LazyWeights(z.files, lambda n: _npz_member(path, z, n), path, fmt, z.close,
                               info=lambda n: _npz_info(z, n, path))
        if fmt == "safetensors":
            header = _safetensors_header(path)
            names = [k for k in header if k != "__metadata__"]
            lw = LazyWeights(names, lambda n: _read_safetensors_tensor(path, header, n), path,
                             fmt, info=lambda n: _safetensors_info(header, n, path))
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
    except (FileNotFoundError, WeightFileError):
        raise
    except MemoryError:
        raise WeightFileError(f"path: {str(path)!r}: not enough memory to read it as "
                              f"{fmt}") from None
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightFileError(f"path: cannot read {str(path)!r} as {fmt}: {msg}") from None
    raise AssertionError(fmt)  # pragma: no cover




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




def load_weights(path) -> dict:
    """Read every tensor of a weight file into a dict name -> np.ndarray."""
    with open_weights(path) as w:
        return {k: np.array(w[k]) for k in w}




def save_weights(path, weights: Mapping, *, template=None) -> None:
    """Write tensors atomically in the format given by the extension.

    For .onnx, ``template`` is the original .onnx file whose initializers are replaced.
    """
    fmt = _format_of(path)
    arrays = {k: _c_array(v) for k, v in weights.items()}
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
        from onnx import numpy_helper
        if template is None:
            raise ValueError("template: writing .onnx needs the original .onnx model as template")
        model = _onnx_model(template, "template")
        inits = {init.name: init for init in model.graph.initializer}
        missing = [k for k in arrays if k not in inits]
        if missing:
            raise WeightFileError(
                f"template: {str(template)!r} has no initializer {missing[0]!r} "
                f"({len(missing)} of the {len(arrays)} tensors are not in it: the template "
                "is not the model these weights came from)")
        unset = [k for k, init in inits.items() if k not in arrays
                 and numpy_helper.to_array(init).dtype.kind == "f"]
        if unset:
            raise WeightFileError(
                f"template: {str(template)!r} has float initializer {unset[0]!r} that the "
                f"weights do not give ({len(unset)} of {len(inits)}: another model?)")
        for name in arrays:
            init = inits[name]
            old = numpy_helper.to_array(init)
            new = arrays[name]
            if tuple(old.shape) != tuple(new.shape):
                raise WeightFileError(f"template: {str(template)!r}: initializer {name!r} has "
                                      f"shape {tuple(old.shape)}, the weights "
                                      f"{tuple(new.shape)}")
            init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), name))
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
    raise WeightFileError(f"path: {str(folder)!r} is a directory, not a model folder (it holds "
                          f"none of {', '.join(_FOLDER_FILES)})")


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




def _c_array(v) -> np.ndarray:
    """A C-contiguous array of ``v`` in native byte order, 0-d arrays kept 0-d
    (``np.ascontiguousarray`` makes them 1-d)."""
    a = np.asarray(v)
    if a.dtype.byteorder not in ("=", "|") and a.dtype.itemsize > 1:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return a
