"""Built-in example weights: Laplace draws shaped like AlexNet, ResNet-50, MobileNet-V1.

Each conv/linear layer gets a Laplace scale drawn log-uniformly over two decades and
per-channel scales spread around it, so that allocation has something to decide. Used by
the benchmarks, the tests and ``opq plan example:NAME``. Nothing is downloaded.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ARCHITECTURES", "layer_shapes", "laplace_weights"]


def _alexnet():
    return [("features.0.weight", (64, 3, 11, 11)), ("features.3.weight", (192, 64, 5, 5)),
            ("features.6.weight", (384, 192, 3, 3)), ("features.8.weight", (256, 384, 3, 3)),
            ("features.10.weight", (256, 256, 3, 3)), ("classifier.1.weight", (4096, 9216)),
            ("classifier.4.weight", (4096, 4096)), ("classifier.6.weight", (1000, 4096))]


def _resnet50():
    shapes = [("conv1.weight", (64, 3, 7, 7))]
    inplanes = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)),
                       (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                       (f"{p}.conv3.weight", (planes * 4, planes, 1, 1))]
            if b == 0:
                shapes.append((f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)))
            inplanes = planes * 4
    shapes.append(("fc.weight", (1000, 2048)))
    return shapes


def _mobilenet_v1():
    cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
           (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    shapes = [("model.0.weight", (32, 3, 3, 3))]
    for i, (cin, cout, _) in enumerate(cfg, start=1):
        shapes.append((f"model.{i}.dw.weight", (cin, 1, 3, 3)))
        shapes.append((f"model.{i}.pw.weight", (cout, cin, 1, 1)))
    shapes.append(("fc.weight", (1000, 1024)))
    return shapes


def _cifar_resnet(n):
    """CIFAR ResNet-(6n+2): three stages of n basic blocks (16, 32, 64 channels)."""
    shapes = [("conv1.weight", (16, 3, 3, 3))]
    cin = 16
    for li, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            shapes += [(f"{p}.conv1.weight", (planes, cin, 3, 3)),
                       (f"{p}.conv2.weight", (planes, planes, 3, 3))]
            cin = planes
    shapes.append(("fc.weight", (10, 64)))
    return shapes


ARCHITECTURES = {"alexnet": _alexnet, "resnet50": _resnet50, "mobilenet_v1": _mobilenet_v1,
                 "resnet20": lambda: _cifar_resnet(3), "resnet56": lambda: _cifar_resnet(9)}


def layer_shapes(arch: str):
    """[(name, shape)] of the conv/linear weights of ``arch``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]()


def laplace_weights(arch: str = "resnet50", *, seed: int = 0, dtype=np.float32,
                    scale: float = 1.0) -> dict:
    """Laplace weights with the layer shapes of ``arch`` (float32 by default).

    >>> w = laplace_weights("alexnet")
    >>> sum(v.size for v in w.values())
    61090496
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in layer_shapes(arch):
        b = scale * 10.0 ** rng.uniform(-2.0, 0.0)
        ch = b * 10.0 ** rng.uniform(-0.3, 0.3, size=(shape[0],) + (1,) * (len(shape) - 1))
        w = rng.laplace(size=shape).astype(dtype)
        w *= ch.astype(dtype)
        out[name] = w
    return out
