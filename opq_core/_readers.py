"""The checkpoint readers: safetensors, .npz, .pt/.pth (state_dict, weights_only) and
.onnx, each validating sizes, offsets, dtypes and byte order against the file before it
allocates (one tensor never costs more than :data:`MAX_EXPANSION` bytes per stored byte).
"""
from __future__ import annotations

import math
import os
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

class WeightFileError(ValueError):
    """A weight file that opq refuses to read (malformed, forged, unsupported content).

    The message is one line and names the file and, where there is one, the tensor."""


#: A reader never allocates more than this many bytes per byte of the file for one
#: tensor: a tensor's declared size must be held by the bytes the file stores for it
#: (``2x`` for bfloat16 / float8 widened to float32; deflate-compressed ``.npz`` members
#: may declare up to deflate's own limit of 1032 bytes per stored byte).
MAX_EXPANSION = 1032
_DEFLATE_MAX_RATIO = 1032
_ST_HEADER_MAX = 100_000_000      # the safetensors library's own header limit

FORMATS = {".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt",
           ".bin": "pt", ".onnx": "onnx"}


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _format_of(path, argument="path") -> str:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"{argument}: unknown weight file type {ext!r} of {str(path)!r}; "
                         f"expected one of {sorted(FORMATS)}")
    return FORMATS[ext]



_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4",
              "U64": "<u8"}
_ST_WIDE = {"BF16": 2}   # read widened to float32


def _st_bad(path, what):
    return WeightFileError(f"path: {str(path)!r} is not a valid safetensors file: {what}")


def _safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length + JSON), every
    entry checked against the file before anything is allocated: known dtype, a shape of
    non-negative integers whose byte size is exactly its data offsets' span, offsets that
    tile the payload with no overlap, no gap and no trailing bytes (as the safetensors
    library requires), ``__metadata__`` a str -> str mapping."""
    import json
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightFileError(f"path: {str(path)!r} is too short to be a safetensors file "
                                  f"({size} bytes; truncated?)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise WeightFileError(f"path: {str(path)!r} has a corrupt safetensors header length "
                                  f"{n} (file of {size} bytes; truncated?)")
        if n > _ST_HEADER_MAX:
            raise _st_bad(path, f"header of {n} bytes (more than {_ST_HEADER_MAX})")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise _st_bad(path, "unreadable JSON header") from None
    if not isinstance(header, dict):
        raise _st_bad(path, "the header is not a JSON object")
    payload = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise _st_bad(path, "'__metadata__' must map str to str (a tensor cannot "
                                    "be named '__metadata__')")
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _st_bad(path, f"{where} needs dtype, shape and data_offsets")
        dt = info["dtype"]
        if not isinstance(dt, str) or (dt not in _ST_DTYPES and dt not in _ST_WIDE):
            raise WeightFileError(f"path: {str(path)!r}: {where} has dtype {dt!r}, which opq "
                                  f"does not read (supported: "
                                  f"{', '.join(sorted(_ST_DTYPES) + sorted(_ST_WIDE))})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):
            raise _st_bad(path, f"{where} has shape {shape!r} (expected a list of integers "
                                f">= 0)")
        offs = info["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise _st_bad(path, f"{where} has data_offsets {offs!r}")
        lo, hi = offs
        if hi > payload:
            raise WeightFileError(f"path: {str(path)!r} is truncated: tensor {name!r} needs "
                                  f"bytes {lo}..{hi} of the payload, the file has {payload}")
        itemsize = _ST_WIDE.get(dt) or np.dtype(_ST_DTYPES[dt]).itemsize
        count = math.prod(shape)
        if count * itemsize != hi - lo:
            raise _st_bad(path, f"{where}: {hi - lo} bytes do not hold shape {tuple(shape)} "
                                f"of {dt} ({count * itemsize} bytes)")
        info["_start"] = 8 + n + lo
        spans.append((lo, hi, name))
    spans.sort()
    pos = 0
    for lo, hi, name in spans:
        if lo != pos:
            raise _st_bad(path, f"tensor {name!r} starts at byte {lo} of the payload, "
                                f"expected {pos} ({'overlapping' if lo < pos else 'a gap'})")
        pos = hi
    if pos != payload:
        raise _st_bad(path, f"{payload - pos} bytes after the last tensor")
    return header


def _safetensors_info(header, name, path="?"):
    info = header[name]
    dt = info["dtype"]
    if dt in _ST_WIDE:
        return tuple(info["shape"]), np.dtype(np.float32)
    if dt not in _ST_DTYPES:  # pragma: no cover - _safetensors_header refuses it
        raise WeightFileError(f"path: {str(path)!r}: tensor {name!r}: unsupported safetensors "
                              f"dtype {dt!r}")
    return tuple(info["shape"]), np.dtype(_ST_DTYPES[dt]).newbyteorder("=")


def _read_safetensors_tensor(path, header, name):
    """Read one tensor with a plain file read (no memory map: the pages of tensors already
    used do not stay resident, so memory is bounded by the largest tensor; a file cut while
    it is read gives an error, not a bus error). Sizes were checked by the header."""
    info = header[name]
    shape = tuple(info["shape"])
    lo, hi = info["data_offsets"]
    count = math.prod(shape)
    dt = info["dtype"]
    with open(path, "rb") as f:
        f.seek(info["_start"])
        raw = np.fromfile(f, dtype="<u2" if dt == "BF16" else _ST_DTYPES[dt], count=count)
    if raw.size != count:
        raise WeightFileError(f"path: {str(path)!r} is truncated: tensor {name!r} has "
                              f"{raw.size} of its {count} values (changed while read?)")
    if dt == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.reshape(shape).astype(raw.dtype.newbyteorder("="), copy=False)




_NPZ_KINDS = "biuf"


def _npz_bad(path, what):
    return WeightFileError(f"path: {str(path)!r} is not a valid .npz file: {what}")


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unknown .npy version {version}")  # pragma: no cover - read_magic


def _check_npz(path):
    """Every member of an .npz archive checked before anything is allocated: a .npy
    header with a numeric dtype (bool, int, uint, float; either byte order) and a shape
    whose byte size is what the member holds, stored or deflated within deflate's limit."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _npz_bad(path, f"not a zip archive ({exc})") from None
    size = os.path.getsize(path)
    with zf:
        seen = set()
        for zi in zf.infolist():
            name = zi.filename
            where = f"member {name!r}"
            if not name.endswith(".npy"):
                raise _npz_bad(path, f"{where} is not a .npy array")
            if name[:-4] in seen:
                raise _npz_bad(path, f"{where} appears twice")
            seen.add(name[:-4])
            if zi.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _npz_bad(path, f"{where} uses compression method {zi.compress_type} "
                                     "(opq reads stored or deflated members)")
            if zi.compress_size > size or zi.header_offset > size:
                raise _npz_bad(path, f"{where} claims {zi.compress_size} bytes at offset "
                                     f"{zi.header_offset}, the file has {size} (truncated?)")
            limit = zi.compress_size if zi.compress_type == zipfile.ZIP_STORED \
                else _DEFLATE_MAX_RATIO * zi.compress_size + 64
            if zi.file_size > limit:
                raise _npz_bad(path, f"{where} claims {zi.file_size} bytes from "
                                     f"{zi.compress_size} stored bytes (a zip bomb?)")
            try:
                with zf.open(zi) as f:
                    shape, _, dtype = _npy_header(f)
                    hlen = f.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
                raise _npz_bad(path, f"{where}: unreadable .npy header ({exc})") from None
            dtype = np.dtype(dtype)
            if dtype.kind not in _NPZ_KINDS or dtype.fields is not None or dtype.subdtype:
                raise WeightFileError(f"path: {str(path)!r}: tensor {name[:-4]!r} has dtype "
                                      f"{dtype.str} (opq reads bool, integer and float arrays)")
            nbytes = math.prod(shape) * dtype.itemsize
            if hlen + nbytes != zi.file_size:
                raise _npz_bad(path, f"tensor {name[:-4]!r}: shape {tuple(shape)} of "
                                     f"{dtype.str} needs {nbytes} bytes, the member holds "
                                     f"{zi.file_size - hlen}")


def _npz_member(path, z, name):
    try:
        a = z[name]
    except MemoryError:
        raise WeightFileError(f"path: {str(path)!r}: tensor {name!r}: not enough "
                              "memory") from None
    except Exception as exc:
        raise WeightFileError(f"path: {str(path)!r}: tensor {name!r} cannot be read "
                              f"({_first_line(exc)})") from None
    if a.dtype.byteorder not in ("=", "|") and a.dtype.itemsize > 1:
        # big-endian (or non-native) data: converted once, here, to the native order
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def _npz_info(z, name, path="?"):
    """Shape and dtype (native byte order) from the .npy header of one member of an .npz
    archive."""
    member = name if name in z.zip.namelist() else name + ".npy"
    with z.zip.open(member) as f:
        shape, _, dtype = _npy_header(f)
    return tuple(shape), np.dtype(dtype).newbyteorder("=")




def check_input_file(path, argument="path") -> None:
    """Refuse, with a one-line message, a path that is not a readable regular file:
    missing (FileNotFoundError), a directory, a FIFO, a device or a socket
    (:class:`WeightFileError`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{argument}: no such file {str(path)!r}") from None
    except OSError as exc:
        raise WeightFileError(f"{argument}: cannot read {str(path)!r} ({exc.strerror})") from None
    kind = _file_kind(st.st_mode)
    if kind != "file":
        raise WeightFileError(f"{argument}: {str(path)!r} is {kind}, not a file")


def _file_kind(mode) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"  # pragma: no cover


def _pickle_refusal(path, exc) -> WeightFileError:
    """torch.load(weights_only=True) refused a pickle: say why, in one line."""
    text = str(exc)
    why = ""
    for line in text.splitlines():
        line = line.strip()
        if ("Unsupported global" in line or "Unsupported operand" in line
                or "unsupported GLOBAL" in line or "Unsupported class" in line):
            why = line
            break
        if line.startswith("WeightsUnpickler error:"):
            why = line[len("WeightsUnpickler error:"):].strip()
            break
    if not why:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()
                 and "documentation of torch.load" not in ln and "Weights only load" not in ln]
        why = lines[0] if lines else type(exc).__name__
    return WeightFileError(
        f"path: {str(path)!r} refused: it holds pickled Python objects other than tensors "
        f"and plain containers, and unpickling them could run code; opq only loads tensors "
        f"(torch.load(weights_only=True)); torch says: {why}")


def _pt_array(path, name, t):
    """One tensor of a checkpoint as a NumPy array; bfloat16 and float8 widened to
    float32 (exact); quantized, sparse and other layouts refused by name."""
    import torch
    where = f"path: {str(path)!r}: tensor {name!r}"
    if t.layout != torch.strided:
        raise WeightFileError(f"{where} has layout {t.layout} (opq reads dense tensors; "
                              "call .to_dense() before saving)")
    if t.is_quantized:
        raise WeightFileError(f"{where} is a quantized tensor ({t.dtype}); opq reads float "
                              "weights: dequantize it before saving")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16 or "float8" in str(t.dtype):
        t = t.float()
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise WeightFileError(f"{where} has dtype {t.dtype}, which opq does not read "
                              f"({str(exc).splitlines()[0]})") from None


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
    import pickle
    try:
        # no mmap=True: a file cut while it is read must be an error, not a bus error;
        # torch reads each storage from its zip record (sized by the file)
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickle_refusal(path, exc) from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise _pickle_refusal(path, exc) from None
        raise
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"path: {str(path)!r} does not hold a state_dict (got "
                              f"{type(obj).__name__})")
    out, src, aliases, seen = {}, {}, {}, {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if t.numel() and t.layout == torch.strided and not t.is_quantized:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                       t.stride(), t.dtype)
                if key in seen:
                    aliases[str(k)] = seen[key]
                    continue
                seen[key] = str(k)
            if t.dtype == torch.bfloat16:
                src[str(k)] = "bfloat16"
            out[str(k)] = _pt_array(path, k, v)
    return out, src, aliases


def _onnx_bad(path, what):
    return WeightFileError(f"path: {str(path)!r}: {what}")


def _onnx_model(path, argument="path"):
    """The ModelProto of an .onnx file, external data checked and loaded by opq: every
    location relative, inside the model's folder, no symlink on the way, a regular file,
    offset and length inside it."""
    import onnx
    from google.protobuf.message import DecodeError
    check_input_file(path, argument)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError) as exc:
        raise WeightFileError(f"{argument}: {str(path)!r} is not a readable ONNX model "
                              f"({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"tensor {t.name!r}: external data {loc!r}"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts or "\\" in loc:
            raise _onnx_bad(path, f"{where} must be a relative path inside the model's folder")
        full = os.path.join(folder, loc)
        p = folder
        for part in Path(loc).parts:
            p = os.path.join(p, part)
            if os.path.islink(p):
                raise _onnx_bad(path, f"{where} goes through a symbolic link ({p!r}); opq "
                                      "refuses them (copy the file into the folder)")
        if os.path.commonpath([real_folder, os.path.realpath(full)]) != real_folder:
            raise _onnx_bad(path, f"{where} is outside the model's folder")
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise _onnx_bad(path, f"{where} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise _onnx_bad(path, f"{where} is {_file_kind(st.st_mode)}, not a file")
        try:
            off = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else st.st_size - off
        except ValueError:
            raise _onnx_bad(path, f"{where} has a malformed offset/length") from None
        if off < 0 or length < 0 or off + length > st.st_size:
            raise _onnx_bad(path, f"{where}: bytes {off}..{off + length} are outside the "
                                  f"{st.st_size}-byte file")
        _onnx_check_size(path, t, length)
    if external:
        load_external_data_for_model(model, folder)
    return model


def _onnx_check_size(path, t, nbytes=None):
    """The byte size the tensor's dims and data type declare must be what it stores."""
    from onnx import helper
    where = f"tensor {t.name!r}"
    if any(d < 0 for d in t.dims):
        raise _onnx_bad(path, f"{where} has negative dims {list(t.dims)}")
    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        raise _onnx_bad(path, f"{where} has ONNX data type {t.data_type}, which opq does "
                              "not read") from None
    if dt.kind not in "biuf":
        raise _onnx_bad(path, f"{where} has data type {dt} (opq reads bool, integer and "
                              "float tensors)")
    count = math.prod(t.dims)
    if nbytes is None:
        if t.HasField("raw_data"):
            nbytes = len(t.raw_data)
        else:
            stored = max(len(t.float_data), len(t.int32_data), len(t.int64_data),
                         len(t.double_data), len(t.uint64_data))
            if stored != count:
                raise _onnx_bad(path, f"{where}: dims {list(t.dims)} declare {count} values, "
                                      f"it stores {stored}")
            return
    if nbytes != count * dt.itemsize:
        raise _onnx_bad(path, f"{where}: dims {list(t.dims)} of {dt} need "
                              f"{count * dt.itemsize} bytes, it stores {nbytes}")


def _load_onnx(path) -> dict:
    try:
        import onnx  # noqa: F401
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover
        raise ImportError("reading .onnx files needs onnx: pip install 'opq[onnx]'") from None
    model = _onnx_model(path)
    out = {}
    for init in model.graph.initializer:
        _onnx_check_size(path, init)
        try:
            out[init.name] = numpy_helper.to_array(init)
        except Exception as exc:
            raise _onnx_bad(path, f"tensor {init.name!r} cannot be read "
                                  f"({_first_line(exc)})") from None
    return out


