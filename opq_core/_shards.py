"""Streaming safetensors writer: one tensor at a time, optionally in Hugging Face shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._atomic import atomic_write


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
                    data = _to_bf16_bits(a).astype("<u2")
                else:
                    want = np.dtype(dt)
                    data = np.ascontiguousarray(a, dtype=want.newbyteorder("<")
                                                if want.itemsize > 1 else want)
                # the array's own bytes, without the copy of tobytes()
                f.write(data.reshape(-1).view(np.uint8))
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


