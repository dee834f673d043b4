"""Reading a .opq file safely: framing and checksum, then every header and description field
checked (ranges, counts, offsets inside the file, uniqueness) before anything is allocated."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ._container import (FORMAT_VERSION, LAYOUTS, MAX_WEIGHTS_PER_BYTE, OpqFormatError, _CHUNK,
                         _DESC_MAX_RATIO, _HEADER_TENSOR, _NP_DTYPES, _PARTS, _PREFIX,
                         _SHA_ZERO, _bad)



_LAYER_DTYPES = ("float16", "float32", "float64")
_SCALE_DTYPES = ("float16", "float32", "float64")
_GRIDS = ("offset", "symmetric", "codebook")
_MASK_CODINGS = {"entropy": ("none", "entropy"), "packed": ("none", "bitmask", "gap")}
_CODE_CODINGS = {"entropy": ("none", "entropy"), "packed": ("none", "packed")}



class _FileBytes:
    """Byte ranges of an open file by ``pread`` (no memory map: a file cut while it is
    read is an error, not a bus error)."""

    def __init__(self, f, size, path):
        self._fd = f.fileno()
        self.size = size
        self._path = path

    def __getitem__(self, sl):
        a, b = sl.start or 0, sl.stop if sl.stop is not None else self.size
        b = min(b, self.size)
        if b <= a:
            return b""
        out = os.pread(self._fd, b - a, a)
        if len(out) != b - a:
            raise OpqFormatError(f"{str(self._path)!r} is truncated: it changed while it was "
                                 f"read (got {a + len(out)} of {b} bytes)")
        return out


def _parse(path, f):
    """(file bytes, header dict, data start, version); checks framing and checksum."""
    from .io import WeightFileError, _safetensors_header, check_input_file
    path = Path(path)
    try:
        check_input_file(path)
    except WeightFileError as exc:
        raise OpqFormatError(str(exc)) from None
    size = os.fstat(f.fileno()).st_size
    where = f"{str(path)!r}"
    if size < 8:
        raise OpqFormatError(f"{where} is not a .opq file (only {size} bytes; truncated?)")
    fb = _FileBytes(f, size, path)
    hlen = struct.unpack("<Q", fb[0:8])[0]
    if hlen > size - 8:
        raise OpqFormatError(f"{where} is truncated or not a .opq file (header of {hlen} bytes, "
                             f"file of {size})")
    raw = fb[8:8 + hlen]
    try:
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
    except Exception:
        raise OpqFormatError(f"{where} is corrupt or not a .opq file (unreadable header)") from None
    if not isinstance(meta, dict) or meta.get("format") != "opq":
        raise OpqFormatError(f"{where} is not a .opq file (a safetensors file without opq "
                             "metadata?)")
    v = meta.get("version", "0")
    if not isinstance(v, str) or not v.isdigit() or len(v) > 6:
        raise _bad(path, f"unreadable format version {v!r}", field="version")
    version = int(v)
    if version > FORMAT_VERSION:
        raise OpqFormatError(f"{where} has format version {version}, newer than this opq "
                             f"reads ({FORMAT_VERSION}); upgrade opq")
    if version < 1:
        raise OpqFormatError(f"{where} has an unknown format version {version}")
    # every entry: dtype, shape, offsets inside the file, tiling the payload exactly
    try:
        header = _safetensors_header(path)
    except WeightFileError as exc:
        text = str(exc)
        detail = text.split(": ", 2)[-1] if text.count(": ") >= 2 else text
        kind = "truncated" if "truncated" in text else "corrupt"
        raise OpqFormatError(f"{where} is {kind}: {detail}") from None
    if os.fstat(f.fileno()).st_size != size:
        raise OpqFormatError(f"{where} is truncated: it changed while it was read")
    for key, e in header.items():
        if key != "__metadata__":
            e.pop("_start", None)
    sha = meta.get("sha256", "")
    sha = sha if isinstance(sha, str) else ""
    pat = b'"sha256":"' + sha.encode() + b'"'
    at = raw.find(pat)
    if len(sha) != 64 or at < 0:
        raise OpqFormatError(f"{where} is corrupt (no checksum in the header)")
    zeroed = raw[:at] + b'"sha256":"' + _SHA_ZERO.encode() + b'"' + raw[at + len(pat):]
    h = hashlib.sha256()
    h.update(fb[0:8])
    h.update(zeroed)
    pos = 8 + hlen
    while pos < size:
        h.update(fb[pos:min(size, pos + _CHUNK)])
        pos += _CHUNK
    if h.hexdigest() != sha:
        raise OpqFormatError(f"{where} is corrupt: checksum mismatch (the file was changed or "
                             "damaged after it was written)")
    # after the checksum: a damaged byte anywhere reads as corrupt, not as a bad field
    if meta.get("layout") not in LAYOUTS:
        raise _bad(path, f"unknown layout {meta.get('layout')!r} (expected one of {LAYOUTS})",
                   field="layout")
    return fb, header, 8 + hlen, version, meta["layout"]


def _entry_bytes(path, fb, header, start, key, layer=None):
    e = header.get(key)
    if e is None:
        raise _bad(path, f"tensor {key!r} is missing", layer=layer)
    if e["dtype"] != "U8" or len(e["shape"]) != 1:
        raise _bad(path, f"tensor {key!r} must be a 1-d U8 blob, got {e['dtype']} "
                         f"{e['shape']}", layer=layer)
    a, b = e["data_offsets"]
    return fb[start + a:start + b]


def _description(path, data: bytes) -> dict:
    """The zlib-compressed JSON description, decompressed with a size limit."""
    limit = 65536 + _DESC_MAX_RATIO * len(data)
    d = zlib.decompressobj()
    try:
        text = d.decompress(data, limit)
    except zlib.error as exc:
        raise _bad(path, f"unreadable description ({exc})", field=_HEADER_TENSOR) from None
    if d.unconsumed_tail or not d.eof:
        if not d.eof and not d.unconsumed_tail:
            raise _bad(path, "the description is truncated", field=_HEADER_TENSOR)
        raise _bad(path, f"the description expands past {limit} bytes ({_DESC_MAX_RATIO}x its "
                         f"{len(data)} stored bytes + 64 KiB): a zlib bomb?",
                   field=_HEADER_TENSOR)
    if d.unused_data:
        raise _bad(path, "bytes after the compressed description", field=_HEADER_TENSOR)
    try:
        desc = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad(path, "unreadable description JSON", field=_HEADER_TENSOR) from None
    if not isinstance(desc, dict):
        raise _bad(path, "the description is not a JSON object", field=_HEADER_TENSOR)
    return desc


def _real(path, d, key, layer=None, *, finite=True, lo=None, hi=None, allow_none=False,
          allow=()):
    v = d.get(key) if isinstance(d, dict) else None
    if v is None and allow_none and isinstance(d, dict) and key in d:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(path, f"expected a number, got {v!r}", layer, key)
    v = float(v)
    if v in allow:
        return v
    if math.isnan(v) or (finite and not math.isfinite(v)):
        raise _bad(path, f"expected a finite number, got {v!r}", layer, key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(path, f"{v!r} is outside [{lo}, {hi}]", layer, key)
    return v


def _int(path, d, key, layer=None, *, lo=None, hi=None):
    v = d.get(key) if isinstance(d, dict) else None
    if type(v) is not int:
        raise _bad(path, f"expected an integer, got {v!r}", layer, key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(path, f"{v} is outside [{lo}, {hi}]", layer, key)
    return v


def _choice(path, d, key, choices, layer=None):
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, str) or v not in choices:
        raise _bad(path, f"expected one of {tuple(choices)}, got {v!r}", layer, key)
    return v


def _check_description(path, fb, header, start, desc, version, layout, size):
    """Every field of the description checked; returns (plan dict with the binary
    channel scales and codebooks filled in, per-layer coding infos, other names)."""
    v = desc.get("version")
    if type(v) is not int or v != version:
        raise _bad(path, f"description version {v!r} does not match the container's "
                         f"{version}", field="version")
    if desc.get("layout") != layout:
        raise _bad(path, f"description layout {desc.get('layout')!r} does not match the "
                         f"container's {layout!r}", field="layout")
    plan_d, infos, other = desc.get("plan"), desc.get("layers"), desc.get("other")
    if not isinstance(plan_d, dict) or not isinstance(plan_d.get("layers"), list):
        raise _bad(path, "the plan is missing or malformed", field="plan")
    if not isinstance(infos, list) or len(infos) != len(plan_d["layers"]):
        raise _bad(path, f"{len(infos) if isinstance(infos, list) else infos!r} layer "
                         f"codings for {len(plan_d['layers'])} planned layers", field="layers")
    if not isinstance(other, list) or not all(isinstance(x, str) for x in other):
        raise _bad(path, "expected a list of tensor names", field="other")
    meta = desc.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(x, str)
                                             for k, x in meta.items()):
        raise _bad(path, "expected a mapping str -> str", field="metadata")
    for key in ("method", "channelwise", "grid", "error_model", "message"):
        if not isinstance(plan_d.get(key), str):
            raise _bad(path, f"expected a string, got {plan_d.get(key)!r}", field=f"plan.{key}")
    if type(plan_d.get("version")) is not int or not 1 <= plan_d["version"] <= FORMAT_VERSION:
        raise _bad(path, f"unknown plan version {plan_d.get('version')!r}",
                   field="plan.version")
    _real(path, plan_d, "lam", allow=(-math.inf,))
    bb = plan_d.get("budget_bytes")
    if bb is not None and (type(bb) is not int or bb < 1):
        raise _bad(path, f"expected a whole number of bytes or null, got {bb!r}",
                   field="plan.budget_bytes")
    if "predicted_bytes" in plan_d:
        raise _bad(path, "a file does not store its own size", field="plan.predicted_bytes")
    if not isinstance(plan_d.get("skipped", []), list):
        raise _bad(path, "expected a list", field="plan.skipped")
    seen = set()
    declared = 0
    plan_d = dict(plan_d)
    layers_out = []
    for ld, info in zip(plan_d["layers"], infos):
        if not isinstance(ld, dict) or not isinstance(ld.get("name"), str):
            raise _bad(path, "a layer without a name", field="plan.layers")
        name = ld["name"]
        if name in seen:
            raise _bad(path, "the layer appears twice", layer=name)
        seen.add(name)
        if name in other or name == _HEADER_TENSOR:
            raise _bad(path, "the layer is also an uncompressed tensor", layer=name)
        layers_out.append(_check_layer(path, fb, header, start, dict(ld), info, layout))
        declared += layers_out[-1]["_n"]
    if len(set(other)) != len(other):
        dup = next(x for x in other if other.count(x) > 1)
        raise _bad(path, f"tensor {dup!r} is listed twice", field="other")
    for name in other:
        e = header.get(name)
        if e is None:
            raise _bad(path, f"tensor {name!r} is missing", field="other")
        if e["dtype"] not in _NP_DTYPES:
            raise _bad(path, f"tensor {name!r} has dtype {e['dtype']!r}, which a .opq file "
                             "does not store", field="other")
        declared += math.prod(e["shape"])
    expected = {_HEADER_TENSOR, *(_PREFIX + n for n in seen), *other}
    extra = sorted(k for k in header if k != "__metadata__" and k not in expected)
    if extra:
        raise _bad(path, f"tensor {extra[0]!r} is in the container but not in the description "
                         "(a dropped layer?)", field="layers")
    if declared > MAX_WEIGHTS_PER_BYTE * size:
        raise _bad(path, f"declares {declared} weights in {size} bytes, more than "
                         f"{MAX_WEIGHTS_PER_BYTE} per byte (a forged header?)", field="shape")
    for ld in layers_out:
        del ld["_n"]
    plan_d["layers"] = layers_out
    return plan_d, infos, other


def _check_layer(path, fb, header, start, ld, info, layout):
    name = ld["name"]
    shape = ld.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(type(x) is int and x >= 1 for x in shape)):
        raise _bad(path, f"expected a list of integers >= 1, got {shape!r}", name, "shape")
    n = math.prod(shape)
    _choice(path, ld, "dtype", _LAYER_DTYPES, name)
    bits = _int(path, ld, "bits", name, lo=1, hi=8)
    grid = _choice(path, ld, "grid", _GRIDS, name)
    kept = _int(path, ld, "kept", name, lo=0, hi=n)
    step = _real(path, ld, "step", name, lo=0.0, hi=1e30)
    if grid != "codebook" and not step > 0:
        raise _bad(path, f"expected a step > 0, got {step!r}", name, "step")
    score_q = _real(path, ld, "score_q", name, lo=0.0)
    lam = _real(path, ld, "lam", name, allow=(-math.inf,))
    for key in ("quant_error", "predicted_sparsity", "pruning_error", "predicted_error"):
        _real(path, ld, key, name, finite=False, allow=(math.inf,))
    scale_dt = _choice(path, ld, "scale_dtype", _SCALE_DTYPES, name)
    if not isinstance(info, dict):
        raise _bad(path, "expected a mapping", name, "layers")
    mc = _choice(path, info, "mask", _MASK_CODINGS[layout], name)
    cc = _choice(path, info, "codes", _CODE_CODINGS[layout], name)
    sdt = _choice(path, info, "scale_dtype", _SCALE_DTYPES, name)
    parts = info.get("parts")
    if (not isinstance(parts, list) or len(parts) != len(_PARTS)
            or not all(type(x) is int and x >= 0 for x in parts)):
        raise _bad(path, f"expected {len(_PARTS)} byte counts >= 0, got {parts!r}", name,
                   "parts")
    if (mc == "none") != (kept in (0, n)):
        raise _bad(path, f"mask coding {mc!r} with {kept} of {n} weights kept", name, "mask")
    if (cc == "none") != (kept == 0):
        raise _bad(path, f"code coding {cc!r} with {kept} weights kept", name, "codes")
    blob = _entry_bytes(path, fb, header, start, _PREFIX + name, layer=name)
    if sum(parts) != len(blob):
        raise _bad(path, f"parts of {sum(parts)} bytes, the blob has {len(blob)}", name,
                   "parts")
    channels = shape[0]
    isz = np.dtype(sdt).itemsize
    if parts[0] != channels * isz:
        raise _bad(path, f"{parts[0]} scale bytes for {channels} channels of {sdt}", name,
                   "parts")
    scale = np.frombuffer(blob[:parts[0]], dtype=np.dtype(sdt).newbyteorder("<")
                          ).astype(np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise _bad(path, "channel scales must be finite and >= 0", name, "scale")
    ld["channel_scale"] = scale
    ld["scale_dtype"] = scale_dt
    fmax = float(np.finfo(np.dtype(ld["dtype"])).max)
    if grid == "codebook":
        cb_n = parts[1] // 4
        if parts[1] % 4 or not 1 <= cb_n <= (1 << bits):
            raise _bad(path, f"{parts[1]} codebook bytes for at most {1 << bits} float32 "
                             "centroids", name, "codebook")
        cb = np.frombuffer(blob[parts[0]:parts[0] + parts[1]], dtype="<f4").astype(np.float64)
        top = float(np.max(np.where(scale > 0, scale, 1.0))) if scale.size else 1.0
        with np.errstate(over="ignore", invalid="ignore"):
            big = np.abs(cb) * top
        if not np.all(np.isfinite(cb)) or not np.all(np.isfinite(big)) or np.any(big > fmax):
            raise _bad(path, f"centroids (times the channel scales) must be finite numbers "
                             f"within {ld['dtype']}", name, "codebook")
        ld["codebook"] = cb
        if type(ld.get("rule_mask", False)) is not bool:
            raise _bad(path, f"expected true or false, got {ld.get('rule_mask')!r}", name,
                       "rule_mask")
    else:
        if parts[1]:
            raise _bad(path, f"{parts[1]} codebook bytes on a {grid!r} grid", name, "parts")
        ld["codebook"] = None
        if ld.get("rule_mask", False) is not False:
            raise _bad(path, f"rule_mask on a {grid!r} grid", name, "rule_mask")
        if kept:
            from ._plan import channel_thresholds
            ks = np.where(scale > 0, scale, 1.0)
            with np.errstate(over="ignore", invalid="ignore"):
                top = channel_thresholds(lam, score_q, scale) + ks * step * float(1 << bits)
            if not np.all(np.isfinite(top)) or float(np.max(top)) > fmax / 4:
                raise _bad(path, f"a step of {step!r} (with lam {lam!r}) puts the kept weights "
                                 f"beyond the range of {ld['dtype']}", name, "step")
    if mc == "bitmask" and parts[3] != (n + 7) // 8:
        raise _bad(path, f"a bitmask of {n} weights needs {(n + 7) // 8} bytes, not "
                         f"{parts[3]}", name, "parts")
    if mc == "none" and parts[3]:
        raise _bad(path, f"{parts[3]} mask bytes but no mask coding", name, "parts")
    if cc != "entropy" and parts[2]:
        raise _bad(path, f"{parts[2]} symbol-model bytes without entropy-coded codes", name,
                   "parts")
    if cc == "none" and parts[4]:
        raise _bad(path, f"{parts[4]} code bytes but no codes", name, "parts")
    ld["_n"] = n
    return ld
