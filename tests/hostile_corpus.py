"""A generated corpus of malformed weight and .opq files (used by tests/test_hostile.py).

Every case is ``(id, extension, build)``, ``build(good)`` returning the bytes of one
hostile file from the good files of :func:`good_files`. ``.opq`` forgeries are
re-assembled with a recomputed checksum, so they reach the field checks behind it.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib

import numpy as np

SHA_ZERO = "0" * 64


# ---------------------------------------------------------------------------------------
# the good files
# ---------------------------------------------------------------------------------------

def model_weights():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.laplace(size=(8, 4, 3, 3)).astype(np.float32),
            "fc.weight": rng.laplace(size=(10, 32)).astype(np.float32),
            "fc.bias": rng.normal(size=10).astype(np.float32)}


def good_files(folder):
    """Write one good file of every kind into ``folder``; return name -> bytes."""
    import opq_core
    from opq_core.format import write_opq
    from opq_core.io import save_weights
    w = model_weights()
    layers = {k: v for k, v in w.items() if k != "fc.bias"}
    p = opq_core.plan(layers, sparsity=0.5, bits=4)
    out = {}
    for layout in ("entropy", "packed"):
        path = folder / f"good_{layout}.opq"
        write_opq(path, p, w, other={"fc.bias": w["fc.bias"]}, layout=layout)
        out[f"opq_{layout}"] = path.read_bytes()
    for ext in ("npz", "safetensors", "pt"):
        path = folder / f"good.{ext}"
        save_weights(path, w)
        out[ext] = path.read_bytes()
    return out


# ---------------------------------------------------------------------------------------
# .opq forging: explode a file, change it, assemble it again with a valid checksum
# ---------------------------------------------------------------------------------------

def explode(data: bytes):
    """(metadata, description dict, [(key, dtype, shape, bytes)]) of a .opq file."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    start = 8 + n
    entries = []
    desc = None
    for key, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        blob = data[start + a:start + b]
        if key == "__opq__":
            desc = json.loads(zlib.decompress(blob))
        entries.append([key, e["dtype"], list(e["shape"]), blob])
    return meta, desc, entries


def assemble(meta, entries, *, desc=None, desc_bytes=None, offsets=None, extra=b"",
             header_extra=None):
    """A .opq file: entries in order, offsets tiling the payload (or ``offsets[key]``),
    the description replaced by ``desc`` (JSON, compressed) or ``desc_bytes`` (raw),
    the checksum recomputed the way the writer computes it."""
    header = {"__metadata__": dict(meta, sha256=SHA_ZERO) if "sha256" in meta else dict(meta)}
    payload = []
    off = 0
    for key, dt, shape, blob in entries:
        if key == "__opq__" and (desc is not None or desc_bytes is not None):
            blob = desc_bytes if desc_bytes is not None else zlib.compress(
                json.dumps(desc).encode(), 9)
            shape = [len(blob)]
        header[key] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(blob)]}
        if offsets and key in offsets:
            header[key]["data_offsets"] = offsets[key]
        payload.append(blob)
        off += len(blob)
    if header_extra:
        header.update(header_extra)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-(8 + len(hjson)) % 8)
    prefix = struct.pack("<Q", len(hjson))
    body = b"".join(payload) + extra
    sha = hashlib.sha256(prefix + hjson + body).hexdigest()
    hjson = hjson.replace(SHA_ZERO.encode(), sha.encode(), 1)
    return prefix + hjson + body


def forge(good, fn):
    """A .opq built from the good entropy file: ``fn(meta, desc, entries)`` changes
    them in place (or returns a dict of :func:`assemble` keywords)."""
    meta, desc, entries = explode(good["opq_entropy"])
    kw = fn(meta, desc, entries) or {}
    kw.setdefault("desc", desc)
    return assemble(meta, entries, **kw)


def forge_packed(good, fn):
    meta, desc, entries = explode(good["opq_packed"])
    kw = fn(meta, desc, entries) or {}
    kw.setdefault("desc", desc)
    return assemble(meta, entries, **kw)


def _layer(desc, i=0):
    return desc["plan"]["layers"][i]


def _set_layer(i, key, value):
    def fn(meta, desc, entries):
        _layer(desc, i)[key] = value
    return fn


def _set_info(i, key, value):
    def fn(meta, desc, entries):
        desc["layers"][i][key] = value
    return fn


def _entry(entries, key):
    return next(e for e in entries if e[0] == key)


def _all_pruned_huge(meta, desc, entries):
    # a consistent file: one all-pruned layer of 2.5e9 weights, no mask, no codes
    ld = _layer(desc, 0)
    ld["shape"] = [50_000, 50_000]
    ld["kept"] = 0
    info = desc["layers"][0]
    blob_key = "opq/" + ld["name"]
    e = _entry(entries, blob_key)
    scale = np.ones(50_000, dtype="<f2").tobytes()
    e[3] = scale
    e[2] = [len(scale)]
    info.update(mask="none", codes="none", scale_dtype="float16", parts=[len(scale), 0, 0, 0, 0])
    ld["scale_dtype"] = "float16"


def _huge_shape(meta, desc, entries):
    _layer(desc, 0)["shape"] = [8, 4, 3, 3, 100_000, 1000]


def _zlib_bomb(meta, desc, entries):
    text = json.dumps(desc).encode()
    bomb = text[:-1] + b', "pad": "' + b" " * (32 * 1024 * 1024) + b'"}'
    return {"desc_bytes": zlib.compress(bomb, 9)}


def _negative_offsets(meta, desc, entries):
    key = "opq/" + _layer(desc, 0)["name"]
    e = _entry(entries, key)
    return {"offsets": {key: [-64, -64 + len(e[3])]}}


def _duplicate_layer(meta, desc, entries):
    desc["plan"]["layers"].append(dict(_layer(desc, 0)))
    desc["layers"].append(dict(desc["layers"][0]))


def _dropped_layer(meta, desc, entries):
    desc["plan"]["layers"].pop()
    desc["layers"].pop()


def _missing_blob(meta, desc, entries):
    key = "opq/" + _layer(desc, 1)["name"]
    entries[:] = [e for e in entries if e[0] != key]


def _missing_other(meta, desc, entries):
    entries[:] = [e for e in entries if e[0] != "fc.bias"]


def _other_listed_twice(meta, desc, entries):
    desc["other"] = desc["other"] * 2


def _other_bf16(meta, desc, entries):
    e = _entry(entries, "fc.bias")
    e[1] = "BF16"
    e[2] = [20]


def _other_is_layer(meta, desc, entries):
    desc["other"].append(_layer(desc, 0)["name"])


def _extra_tensor(meta, desc, entries):
    entries.append(["stowaway", "U8", [4], b"abcd"])


def _blob_dtype(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    e[1] = "F32"
    e[2] = [len(e[3]) // 4]
    assert len(e[3]) % 4 == 0


def _nan_scale(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    info = desc["layers"][0]
    sdt = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[info["scale_dtype"]]
    s = np.frombuffer(e[3][:info["parts"][0]], dtype=sdt).copy()
    s[0] = np.nan
    e[3] = s.tobytes() + e[3][info["parts"][0]:]


def _negative_scale(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    info = desc["layers"][0]
    sdt = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[info["scale_dtype"]]
    s = np.frombuffer(e[3][:info["parts"][0]], dtype=sdt).copy()
    s[1] = -1.0
    e[3] = s.tobytes() + e[3][info["parts"][0]:]


def _blob_cut(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    e[3] = e[3][:-3]
    e[2] = [len(e[3])]


def _blob_garbage_codes(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    n = desc["layers"][0]["parts"][4]
    e[3] = e[3][:-n] + bytes((b ^ 0x5A) for b in e[3][-n:])


def _blob_garbage_mask(meta, desc, entries):
    e = _entry(entries, "opq/" + _layer(desc, 0)["name"])
    p = desc["layers"][0]["parts"]
    a = p[0] + p[1] + p[2]
    e[3] = e[3][:a] + bytes(255 - b for b in e[3][a:a + p[3]]) + e[3][a + p[3]:]


def _edit(where, key, value, delete):
    """A mutation that sets ``key`` of the dict ``where(meta, desc)`` to ``value``, or
    removes it when ``value is delete``."""
    def fn(meta, desc, entries):
        d = where(meta, desc)
        if value is delete:
            d.pop(key, None)
        else:
            d[key] = value
    return fn


def _meta(key, value):
    return _edit(lambda meta, desc: meta, key, value, None)


def _desc(key, value):
    return _edit(lambda meta, desc: desc, key, value, _DELETE)


def _plan(key, value):
    return _edit(lambda meta, desc: desc["plan"], key, value, _DELETE)


def _del_layer_key(i, key):
    def fn(meta, desc, entries):
        _layer(desc, i).pop(key)
    return fn


_DELETE = object()


def _raw_desc(raw):
    def fn(meta, desc, entries):
        return {"desc_bytes": raw}
    return fn


def _trailing(meta, desc, entries):
    return {"extra": b"\0" * 16}


def _overlap_blobs(meta, desc, entries):
    k0 = "opq/" + _layer(desc, 0)["name"]
    k1 = "opq/" + _layer(desc, 1)["name"]
    e0 = _entry(entries, k0)
    off = 0
    for key, dt, shape, blob in entries:
        if key == k0:
            break
        off += len(blob)
    return {"offsets": {k1: [off, off + len(_entry(entries, k1)[3])]}}, e0


def _overlap(meta, desc, entries):
    return _overlap_blobs(meta, desc, entries)[0]


def opq_cases():
    cases = []
    # truncations and byte flips: the framing and the checksum
    for frac in np.linspace(0.0, 0.995, 24):
        def cut(good, frac=frac):
            d = good["opq_entropy"]
            return d[:int(frac * len(d))]
        cases.append((f"opq-truncate-{frac:.3f}", ".opq", cut))
    for i in range(32):
        def flip(good, i=i):
            d = bytearray(good["opq_entropy"])
            pos = int(np.random.default_rng(i).integers(0, len(d)))
            d[pos] ^= 1 << (i % 8)
            return bytes(d)
        cases.append((f"opq-flip-{i}", ".opq", flip))
    cases.append(("opq-append-byte", ".opq", lambda g: g["opq_entropy"] + b"\0"))
    cases.append(("opq-header-length-lie", ".opq",
                  lambda g: struct.pack("<Q", 1 << 40) + g["opq_entropy"][8:]))
    cases.append(("opq-empty", ".opq", lambda g: b""))
    cases.append(("opq-not-json-header", ".opq",
                  lambda g: struct.pack("<Q", 8) + b"{{{{{{{{"))
    cases.append(("opq-plain-safetensors", ".opq", lambda g: g["safetensors"]))
    cases.append(("opq-npz-bytes", ".opq", lambda g: g["npz"]))
    # forged, checksum recomputed: the cases
    forged = {
        "huge-shape": _huge_shape,
        "all-pruned-2.5e9": _all_pruned_huge,
        "zlib-bomb": _zlib_bomb,
        "negative-offsets": _negative_offsets,
        "step-1e308": _set_layer(0, "step", 1e308),
        "dtype-int8": _set_layer(0, "dtype", "int8"),
        "duplicate-layer": _duplicate_layer,
        "dropped-layer": _dropped_layer,
        "desc-version-2": _desc("version", 2),
        "desc-version-str": _desc("version", "1"),
        "desc-version-missing": _desc("version", _DELETE),
        "desc-layout-unknown": _desc("layout", "zip"),
        "desc-layout-mismatch": _desc("layout", "packed"),
        "meta-layout-unknown": _meta("layout", "zip"),
        "meta-version-99": _meta("version", "99"),
        "meta-version-0": _meta("version", "0"),
        "meta-version-text": _meta("version", "one"),
        "meta-version-huge": _meta("version", "9" * 400),
        "meta-format-missing": _meta("format", None),
        "meta-sha-missing": _meta("sha256", None),
        # ranges of the layer fields
        "kept-negative": _set_layer(0, "kept", -1),
        "kept-over-n": _set_layer(0, "kept", 10 ** 6),
        "kept-float": _set_layer(0, "kept", 3.5),
        "kept-str": _set_layer(0, "kept", "155"),
        "bits-0": _set_layer(0, "bits", 0),
        "bits-9": _set_layer(0, "bits", 9),
        "bits-true": _set_layer(0, "bits", True),
        "bits-str": _set_layer(0, "bits", "4"),
        "grid-unknown": _set_layer(0, "grid", "log"),
        "grid-codebook-without-codebook": _set_layer(0, "grid", "codebook"),
        "step-zero": _set_layer(0, "step", 0.0),
        "step-negative": _set_layer(0, "step", -0.5),
        "step-nan": _set_layer(0, "step", float("nan")),
        "step-inf": _set_layer(0, "step", float("inf")),
        "step-str": _set_layer(0, "step", "0.6"),
        "step-null": _set_layer(0, "step", None),
        "lam-nan": _set_layer(0, "lam", float("nan")),
        "lam-inf": _set_layer(0, "lam", float("inf")),
        "lam-1e308": _set_layer(0, "lam", 1e308),
        "score-q-negative": _set_layer(0, "score_q", -1.0),
        "score-q-nan": _set_layer(0, "score_q", float("nan")),
        "quant-error-str": _set_layer(0, "quant_error", "x"),
        "scale-dtype-int8": _set_layer(0, "scale_dtype", "int8"),
        "dtype-unknown": _set_layer(0, "dtype", "float128"),
        "dtype-bool": _set_layer(0, "dtype", "bool"),
        "shape-empty": _set_layer(0, "shape", []),
        "shape-zero": _set_layer(0, "shape", [0, 4, 3, 3]),
        "shape-negative": _set_layer(0, "shape", [-8, -4, 3, 3]),
        "shape-float": _set_layer(0, "shape", [8.0, 4, 3, 3]),
        "shape-str": _set_layer(0, "shape", "8x4x3x3"),
        "shape-other-channels": _set_layer(0, "shape", [16, 2, 3, 3]),
        "shape-more-weights": _set_layer(0, "shape", [8, 4, 3, 4]),
        "name-int": _set_layer(0, "name", 7),
        "name-other": _set_layer(0, "name", "fc.bias"),
        "name-unknown": _set_layer(0, "name", "ghost"),
        "name-missing": _del_layer_key(0, "name"),
        "layer-key-missing": _del_layer_key(0, "predicted_error"),
        "layer-key-extra": _set_layer(0, "evil", 1),
        "mask-coding-unknown": _set_info(0, "mask", "rle"),
        "mask-coding-packed-in-entropy": _set_info(0, "mask", "bitmask"),
        "mask-coding-none": _set_info(0, "mask", "none"),
        "code-coding-none": _set_info(0, "codes", "none"),
        "code-coding-unknown": _set_info(0, "codes", "huffman"),
        "info-scale-dtype-bad": _set_info(0, "scale_dtype", "uint8"),
        "info-scale-dtype-wider": _set_info(0, "scale_dtype", "float32"),
        "parts-short": _set_info(0, "parts", [16, 0, 16, 40]),
        "parts-negative": _set_info(0, "parts", [16, 0, 16, 100, -40]),
        "parts-str": _set_info(0, "parts", "16,0,16,40,60"),
        "parts-float": _set_info(0, "parts", [16.0, 0, 16, 40, 60]),
        "parts-shifted": _set_info(0, "parts", [16, 0, 20, 36, 60]),
        "parts-codebook-bytes": _set_info(0, "parts", [16, 4, 12, 40, 60]),
        "parts-scale-bytes": _set_info(0, "parts", [14, 0, 18, 40, 60]),
        "info-not-dict": lambda m, d, e: d["layers"].__setitem__(0, [1, 2]),
        "layers-count": lambda m, d, e: d["layers"].pop() and None,
        "layers-not-list": _desc("layers", {"a": 1}),
        "plan-missing": _desc("plan", _DELETE),
        "plan-not-dict": _desc("plan", [1]),
        "plan-layers-missing": _plan("layers", _DELETE),
        "plan-layers-dict": _plan("layers", {}),
        "plan-key-extra": _plan("evil", 1),
        "plan-key-missing": _plan("channelwise", _DELETE),
        "plan-lam-nan": _plan("lam", float("nan")),
        "plan-version-9": _plan("version", 9),
        "plan-method-int": _plan("method", 3),
        "plan-skipped-str": _plan("skipped", "abc"),
        "other-not-list": _desc("other", "fc.bias"),
        "other-int-names": _desc("other", [1]),
        "other-missing": _missing_other,
        "other-twice": _other_listed_twice,
        "other-bf16": _other_bf16,
        "other-is-layer": _other_is_layer,
        "metadata-not-str": _desc("metadata", {"a": 1}),
        "metadata-list": _desc("metadata", [1]),
        "extra-tensor": _extra_tensor,
        "missing-blob": _missing_blob,
        "blob-f32": _blob_dtype,
        "blob-cut": _blob_cut,
        "blob-garbage-codes": _blob_garbage_codes,
        "blob-garbage-mask": _blob_garbage_mask,
        "scale-nan": _nan_scale,
        "scale-negative": _negative_scale,
        "trailing-bytes": _trailing,
        "overlapping-offsets": _overlap,
        "desc-not-zlib": _raw_desc(b"not zlib at all"),
        "desc-truncated-zlib": _raw_desc(zlib.compress(b'{"version": 1, "layout"')[:-6]),
        "desc-not-json": _raw_desc(zlib.compress(b"\xff\xfe not json")),
        "desc-json-list": _raw_desc(zlib.compress(b"[1, 2, 3]")),
        "desc-deep-json": _raw_desc(zlib.compress(b"[" * 100000 + b"]" * 100000)),
        "desc-zlib-trailing": _raw_desc(zlib.compress(b"{}") + b"junk"),
        "desc-empty-object": _raw_desc(zlib.compress(b"{}")),
    }
    for name, fn in forged.items():
        cases.append((f"opq-forged-{name}", ".opq", lambda g, fn=fn: forge(g, fn)))
    packed = {
        "bitmask-short": _set_info(0, "parts", None),
        "mask-entropy-in-packed": _set_info(0, "mask", "entropy"),
        "codes-entropy-in-packed": _set_info(0, "codes", "entropy"),
        "blob-garbage-mask": _blob_garbage_mask,
        "step-1e308": _set_layer(0, "step", 1e308),
        "kept-off-by-one": lambda m, d, e: _layer(d, 0).__setitem__(
            "kept", _layer(d, 0)["kept"] + 1),
    }
    for name, fn in packed.items():
        cases.append((f"opq-forged-packed-{name}", ".opq",
                      lambda g, fn=fn: forge_packed(g, fn)))
    return cases


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------

def st_file(header, payload=b"", *, length=None):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + payload


def safetensors_cases():
    cases = []
    for frac in (0.0, 0.05, 0.3, 0.6, 0.9, 0.99):
        cases.append((f"st-truncate-{frac}", ".safetensors",
                      lambda g, f=frac: g["safetensors"][:int(f * len(g["safetensors"]))]))
    for i in range(8):
        def flip_header(good, i=i):
            d = bytearray(good["safetensors"])
            n = struct.unpack("<Q", bytes(d[:8]))[0]
            pos = 8 + int(np.random.default_rng(100 + i).integers(0, n))
            d[pos] = ord("}") if i % 2 else ord("\x00")
            return bytes(d)
        cases.append((f"st-flip-header-{i}", ".safetensors", flip_header))
    f32 = lambda shape, lo, hi: {"dtype": "F32", "shape": shape, "data_offsets": [lo, hi]}  # noqa: E731
    forged = {
        # the 597-byte file asking for 32 GiB of bfloat16
        "bf16-32gib": ({"w": {"dtype": "BF16", "shape": [131072, 131072],
                              "data_offsets": [0, 8]}}, b"\0" * 8),
        "bf16-short": ({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 8]},
                        "v": f32([2], 8, 16)}, b"\0" * 16),
        "f32-short": ({"w": f32([4, 4], 0, 8)}, b"\0" * 8),
        "f32-huge": ({"w": f32([1 << 20, 1 << 20], 0, 8)}, b"\0" * 8),
        "overlap": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, b"\0" * 12),
        "same-bytes": ({"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, b"\0" * 8),
        "gap": ({"a": f32([1], 4, 8)}, b"\0" * 8),
        "trailing": ({"a": f32([1], 0, 4)}, b"\0" * 8),
        "beyond-end": ({"a": f32([4], 0, 16)}, b"\0" * 8),
        "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
        "negative-offset": ({"a": f32([1], -4, 0)}, b"\0" * 4),
        "offsets-3": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
                      b"\0" * 4),
        "offsets-float": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
                          b"\0" * 4),
        "offsets-missing": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        "dtype-missing": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "dtype-f8": ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
                     b"\0" * 4),
        "dtype-int": ({"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "dtype-object": ({"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}},
                         b"\0" * 8),
        "shape-negative": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                           b"\0" * 4),
        "shape-negative-pair": ({"a": {"dtype": "F32", "shape": [-2, -2],
                                       "data_offsets": [0, 16]}}, b"\0" * 16),
        "shape-float": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}},
                        b"\0" * 4),
        "shape-str": ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}},
                      b"\0" * 4),
        "shape-bool": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                       b"\0" * 4),
        "entry-list": ({"a": [1, 2]}, b""),
        "metadata-tensor": ({"__metadata__": f32([1], 0, 4)}, b"\0" * 4),
        "metadata-int-values": ({"__metadata__": {"a": 1}, "b": f32([1], 0, 4)}, b"\0" * 4),
    }
    for name, (header, payload) in forged.items():
        cases.append((f"st-forged-{name}", ".safetensors",
                      lambda g, h=header, p=payload: st_file(h, p)))
    cases.append(("st-header-list", ".safetensors", lambda g: st_file([1, 2])))
    cases.append(("st-header-not-json", ".safetensors",
                  lambda g: struct.pack("<Q", 4) + b"{{{{"))
    cases.append(("st-header-utf8", ".safetensors",
                  lambda g: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"))
    cases.append(("st-length-zero", ".safetensors", lambda g: struct.pack("<Q", 0) + b"{}"))
    cases.append(("st-length-huge", ".safetensors",
                  lambda g: struct.pack("<Q", 1 << 62) + b"{}"))
    cases.append(("st-deep-json", ".safetensors",
                  lambda g: st_file(None, b"")[:0] + struct.pack("<Q", 200000)
                  + b"[" * 100000 + b"]" * 100000))
    cases.append(("st-seven-bytes", ".safetensors", lambda g: b"\1\0\0\0\0\0\0"))
    return cases


# ---------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------

def _npz(members, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(arr, *, allow_pickle=False):
    b = io.BytesIO()
    np.lib.format.write_array(b, arr, allow_pickle=allow_pickle)
    return b.getvalue()


def _npy_header(shape, descr):
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False,
                                             "shape": shape})
    return b.getvalue()


def npz_cases():
    cases = []
    for frac in (0.0, 0.1, 0.5, 0.9, 0.99):
        cases.append((f"npz-truncate-{frac}", ".npz",
                      lambda g, f=frac: g["npz"][:int(f * len(g["npz"]))]))
    for i in range(6):
        def flip(good, i=i):
            # a byte of one member's array data: the zip's CRC-32 catches it
            d = bytearray(good["npz"])
            with zipfile.ZipFile(io.BytesIO(good["npz"])) as z:
                zi = z.infolist()[i % len(z.infolist())]
            lh = zi.header_offset
            nlen, xlen = struct.unpack("<HH", bytes(d[lh + 26:lh + 30]))
            pos = lh + 30 + nlen + xlen + 128 + 3 * i
            d[pos] ^= 0x10
            return bytes(d)
        cases.append((f"npz-flip-data-{i}", ".npz", flip))
    obj = np.empty(2, dtype=object)
    obj[:] = [1, "x"]
    forged = {
        "object-pickle": {"a.npy": _npy(obj, allow_pickle=True)},
        "complex": {"a.npy": _npy(np.ones(4, np.complex64))},
        "structured": {"a.npy": _npy(np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")]))},
        "datetime": {"a.npy": _npy(np.zeros(2, dtype="datetime64[s]"))},
        "unicode": {"a.npy": _npy(np.array(["ab", "cd"]))},
        "void": {"a.npy": _npy(np.zeros(2, dtype="V8"))},
        "huge-shape": {"a.npy": _npy_header((1 << 20, 1 << 20), "<f4") + b"\0" * 16},
        "short-data": {"a.npy": _npy_header((16,), "<f4") + b"\0" * 16},
        "long-data": {"a.npy": _npy_header((2,), "<f4") + b"\0" * 16},
        "bad-magic": {"a.npy": b"NOTNUMPY" + b"\0" * 64},
        "bad-header": {"a.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4,   \n"},
        "not-npy-member": {"a.txt": b"hello"},
        "negative-shape": {"a.npy": _npy_header((4,), "<f4").replace(b"(4,)", b"(-4,)")
                           + b"\0" * 16},
    }
    for name, members in forged.items():
        cases.append((f"npz-forged-{name}", ".npz", lambda g, m=members: _npz(m)))
    cases.append(("npz-deflate-huge-shape", ".npz",
                  lambda g: _npz({"a.npy": _npy_header((1 << 16, 1 << 16), "<f4")
                                  + b"\0" * 4096}, zipfile.ZIP_DEFLATED)))
    cases.append(("npz-not-zip", ".npz", lambda g: b"PK\x03\x04" + b"\0" * 100))
    cases.append(("npz-text", ".npz", lambda g: b"just some text\n" * 10))
    return cases


# ---------------------------------------------------------------------------------------
# .pt
# ---------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_save(obj):
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _payloads(marker):
    import os
    return {
        "os-system": _Payload(os.system, (f"touch {marker}",)),
        "eval": _Payload(eval, (f"open({str(marker)!r}, 'w')",)),
        "exec": _Payload(exec, (f"open({str(marker)!r}, 'w')",)),
        "builtins-open": _Payload(open, (str(marker), "w")),
    }


def _pt_forged_shape():
    """A checkpoint whose pickle declares 2**30 floats on a storage of 4."""
    import torch
    good = _torch_save({"w": torch.ones(4)})
    zin = zipfile.ZipFile(io.BytesIO(good))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for zi in zin.infolist():
            d = zin.read(zi)
            if zi.filename.endswith("data.pkl"):
                assert b"K\x04\x85" in d  # BININT1 4, TUPLE1: the size (4,)
                d = d.replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85", 1)
            z.writestr(zi, d)
    return out.getvalue()


def pt_cases():
    """Pickle payloads would create ``good["marker"]`` if they ran."""
    import pickle
    import torch
    cases = []
    for name in _payloads("x"):
        cases.append((f"pt-pickle-{name}", ".pt", lambda g, name=name: _torch_save(
            {"w": torch.ones(2), "x": _payloads(g["marker"])[name]})))
        cases.append((f"pt-raw-pickle-{name}", ".pt",
                      lambda g, name=name: pickle.dumps(_payloads(g["marker"])[name])))
    cases.append(("pt-forged-huge-shape", ".pt", lambda g: _pt_forged_shape()))
    cases.append(("pt-truncate-half", ".pt", lambda g: g["pt"][:len(g["pt"]) // 2]))
    cases.append(("pt-truncate-end", ".pt", lambda g: g["pt"][:-30]))
    cases.append(("pt-garbage", ".pt", lambda g: b"\x80\x02garbage" * 20))
    cases.append(("pt-empty", ".pt", lambda g: b""))
    cases.append(("pt-list", ".pt", lambda g: _torch_save([torch.ones(2)])))
    cases.append(("pt-tensor", ".pt", lambda g: _torch_save(torch.ones(2))))
    cases.append(("pt-quantized", ".pt", lambda g: _torch_save(
        {"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)})))
    cases.append(("pt-sparse", ".pt", lambda g: _torch_save(
        {"w": torch.ones(4, 4).to_sparse()})))
    return cases


# ---------------------------------------------------------------------------------------
# onnx
# ---------------------------------------------------------------------------------------

def onnx_model_bytes(initializers, *, mutate=None):
    """A tiny ONNX graph whose initializers are ``initializers`` (name -> array)."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    if mutate:
        mutate(inits)
    names = list(initializers)
    node = helper.make_node("Identity", [names[0]], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph)
    return model.SerializeToString()


def _external(location, *, offset=None, length=None, dims=(4,)):
    def mutate(inits):
        from onnx import TensorProto
        t = inits[0]
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", location), ("offset", offset), ("length", length)):
            if v is not None:
                e = t.external_data.add()
                e.key, e.value = k, str(v)
        del t.dims[:]
        t.dims.extend(dims)
    return mutate


def onnx_cases():
    w = {"w": np.ones(4, np.float32)}
    cases = [
        ("onnx-garbage", ".onnx", lambda g: b"\x08\x07garbage\xff\xff\xff" * 10),
        ("onnx-text", ".onnx", lambda g: b"not an onnx model at all\n"),
        ("onnx-truncated", ".onnx", lambda g: onnx_model_bytes(w)[:-7]),
        ("onnx-ext-parent", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("../secret.bin"))),
        ("onnx-ext-absolute", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("/etc/passwd"))),
        ("onnx-ext-missing", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("nothing_here.bin"))),
        ("onnx-ext-empty-location", ".onnx", lambda g: onnx_model_bytes(w, mutate=_external(""))),
        ("onnx-ext-offset-beyond", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("data.bin", offset=10 ** 6, length=16))),
        ("onnx-ext-length-beyond", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("data.bin", offset=0, length=10 ** 9,
                                                        dims=(250_000_000,)))),
        ("onnx-ext-huge-dims", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("data.bin", offset=0, length=16,
                                                        dims=(1 << 20, 1 << 20)))),
        ("onnx-ext-negative-offset", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("data.bin", offset=-8, length=16))),
        ("onnx-ext-symlink", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("link.bin", offset=0, length=16))),
        ("onnx-ext-directory", ".onnx",
         lambda g: onnx_model_bytes(w, mutate=_external("subdir", offset=0, length=16))),
        ("onnx-raw-short", ".onnx", lambda g: onnx_model_bytes(
            w, mutate=lambda inits: inits[0].dims.__setitem__(0, 400))),
        ("onnx-raw-huge-dims", ".onnx", lambda g: onnx_model_bytes(
            w, mutate=lambda inits: (inits[0].dims.__setitem__(0, 1 << 20),
                                     inits[0].dims.append(1 << 20)))),
        ("onnx-negative-dims", ".onnx", lambda g: onnx_model_bytes(
            w, mutate=lambda inits: inits[0].dims.__setitem__(0, -4))),
        ("onnx-string-tensor", ".onnx",
         lambda g: onnx_model_bytes({"w": np.array([b"ab"], dtype=object)})),
        ("onnx-unknown-type", ".onnx", lambda g: onnx_model_bytes(
            w, mutate=lambda inits: setattr(inits[0], "data_type", 999))),
    ]
    return cases


def all_cases():
    return opq_cases() + safetensors_cases() + npz_cases() + pt_cases() + onnx_cases()
