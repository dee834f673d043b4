"""CIFAR-10 for the quality benchmarks: loader, normalization and augmentation.

The data is the CIFAR-10 *training* split (Krizhevsky 2009), stored as JPEG files
``train/<class>/NNNN.jpg`` in ``../shared/data/cifar10-train-jpeg.tar.gz`` relative to the
repository root (the folder can be moved with the environment variable ``OPQ_DATA``). The
original test split is not available, so this module splits the 50,000 images itself:

* **test** (held out): the last 500 images of every class, by file name order (5,000 images);
* **train**: the first 4,500 images of every class (45,000 images).

Every accuracy computed on ``x_test`` is therefore an accuracy on images held out from the
CIFAR-10 training split, not on the official test split; the JPEG encoding is lossy, so figures
are a little below those published for the original release.

The tar file is decoded once; the uint8 arrays are cached as ``.npy`` files under
``~/.cache/opq/cifar10`` (or ``$OPQ_CACHE/cifar10`` when ``OPQ_CACHE`` is set).
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
TEST_PER_CLASS = 500
TAR_NAME = "cifar10-train-jpeg.tar.gz"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_CACHE_VERSION = 1


def data_path() -> str:
    """Where the tar file is looked for: ``$OPQ_DATA`` or ``<repo>/../shared/data``."""
    folder = os.environ.get("OPQ_DATA") or os.path.join(_REPO, os.pardir, "shared", "data")
    return os.path.normpath(os.path.join(folder, TAR_NAME))


def cache_dir() -> str:
    """The cache folder: ``$OPQ_CACHE/cifar10``, by default ``~/.cache/opq/cifar10``."""
    root = os.environ.get("OPQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opq")
    return os.path.join(root, "cifar10")


def _decode(path: str):
    """Decode the tar file into per-class lists of (file name, image) pairs."""
    from PIL import Image

    per_class = {c: [] for c in CLASSES}
    with tarfile.open(path) as tf:
        for m in tf:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            parts = m.name.split("/")
            if len(parts) < 3 or parts[-2] not in per_class:
                raise ValueError(f"cifar10: unexpected member {m.name!r} in {path}; "
                                 "expected train/<class>/NNNN.jpg")
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
            if arr.shape != (32, 32, 3):
                raise ValueError(f"cifar10: image {m.name!r} in {path} has shape {arr.shape}, "
                                 "expected (32, 32, 3)")
            per_class[parts[-2]].append((parts[-1], arr))
    return per_class


def _split(per_class, path: str):
    xtr, ytr, xte, yte = [], [], [], []
    for label, c in enumerate(CLASSES):
        items = sorted(per_class[c], key=lambda t: t[0])
        if len(items) <= TEST_PER_CLASS:
            raise ValueError(f"cifar10: class {c!r} in {path} has {len(items)} images, "
                             f"need more than {TEST_PER_CLASS}")
        imgs = [a for _, a in items]
        n_tr = len(imgs) - TEST_PER_CLASS
        xtr.extend(imgs[:n_tr])
        xte.extend(imgs[n_tr:])
        ytr.extend([label] * n_tr)
        yte.extend([label] * TEST_PER_CLASS)
    return (np.stack(xtr), np.asarray(ytr, np.int64), np.stack(xte), np.asarray(yte, np.int64))


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def load_cifar10():
    """Return ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 NHWC ``(N, 32, 32, 3)``, labels int64 in ``0..9`` (order of ``CLASSES``).
    Train: the first 4,500 images of every class (45,000); test: the last 500 images of every
    class by file name order (5,000), held out from the CIFAR-10 training split. Decoded once
    from the tar file (see ``data_path``) and cached under ``cache_dir()``.
    """
    src = data_path()
    cdir = cache_dir()
    meta_path = os.path.join(cdir, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if meta and meta.get("version") == _CACHE_VERSION and \
                all(os.path.isfile(os.path.join(cdir, n + ".npy")) for n in _ARRAYS):
            return tuple(np.load(os.path.join(cdir, n + ".npy")) for n in _ARRAYS)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"cifar10: {TAR_NAME} not found at {src} "
                                "(set OPQ_DATA to the folder that holds it)")
    arrays = _split(_decode(src), src)
    os.makedirs(cdir, exist_ok=True)
    for n, a in zip(_ARRAYS, arrays):
        _save_atomic(os.path.join(cdir, n + ".npy"), a)
    meta = {"version": _CACHE_VERSION, "source_bytes": os.path.getsize(src),
            "test_per_class": TEST_PER_CLASS, "n_train": int(len(arrays[0])),
            "n_test": int(len(arrays[2]))}
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    return arrays


def channel_stats(x_train: np.ndarray):
    """Per-channel mean and standard deviation of uint8 NHWC images, on the [0, 1] scale.

    Computed from the training split (pass ``x_train``); returns two float32 arrays of 3.
    """
    if x_train.ndim != 4 or x_train.shape[-1] != 3:
        raise ValueError(f"channel_stats: x_train must be NHWC with 3 channels, "
                         f"got shape {x_train.shape}")
    x = x_train.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


def to_tensor(x: np.ndarray, mean, std):
    """uint8 NHWC images -> normalized float32 torch tensor NCHW ``(x / 255 - mean) / std``."""
    import torch

    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_tensor: x must be uint8 NHWC with 3 channels, "
                         f"got {x.dtype} {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(np.asarray(mean, np.float32)).view(1, 3, 1, 1)
    s = torch.as_tensor(np.asarray(std, np.float32)).view(1, 3, 1, 1)
    return ((t - m) / s).contiguous()


def augment(x, generator=None, padding: int = 4):
    """Random crop with ``padding`` zero pixels on every side, then random horizontal flip.

    ``x``: float tensor (N, C, H, W), normally already normalized (the padding is then the
    mean colour). Every image draws its own offset and flip from ``generator`` (a
    ``torch.Generator``; the global one when None). Returns a new tensor of the same shape;
    used for training and for BatchNorm recalibration.
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"augment: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    p = int(padding)
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], w - 1 - cols[None, :], cols[None, :]) + dx[:, None]
    rows = torch.arange(h)[None, :] + dy[:, None]
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
