"""Small real data sets and models for the demo, the study and the tests.

Everything here ships with a package or is generated locally; nothing is downloaded.

* ``"digits"``: scikit-learn's ``load_digits`` (1797 images of 8x8 pixels, 10 classes),
  scaled to [0, 1] and standardized with the training mean and standard deviation, split into
  train / test with a fixed-seed stratified split.
* ``"mnist1d"``: MNIST-1D (``mnist1d.data.make_dataset`` with its default arguments: 4000
  training and 1000 test signals of length 40, generated from templates; its authors
  report about 94 % test accuracy for a small CNN).

Models (plain ``torch.nn`` modules, conv and linear weights hold almost all parameters):

* :class:`DigitsCNN` -- three 3x3 convolutions and two linear layers for 8x8 digits.
* :class:`DigitsResNet` -- a ResNet-style CNN with batch norm and three residual blocks.
* :class:`MNIST1DCNN` -- a 1-D CNN for MNIST-1D.

:data:`MODELS` maps a model name to its data set and dense training settings; a whole run:

>>> spec = MODELS["digits_cnn"]                                 # doctest: +SKIP
>>> data = load_data(spec.dataset)                              # doctest: +SKIP
>>> train, test = loaders(data, batch_size=spec.batch_size)     # doctest: +SKIP
>>> model = make_model("digits_cnn", seed=0)                    # doctest: +SKIP
>>> with limit_threads(1):                                      # doctest: +SKIP
...     train_dense(model, train, test, epochs=spec.epochs, lr=spec.lr)

>>> from opq_torch.demo import examples
>>> data = examples.load_data("digits")
>>> data.x_train.shape[1:], data.num_classes
(torch.Size([1, 8, 8]), 10)
>>> model = examples.make_model("digits_cnn", seed=0)
>>> train, test = examples.loaders(data, seed=0)
>>> 0.0 <= examples.evaluate(model, test) <= 1.0
True
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..finetune import evaluate as _evaluate

__all__ = ["Data", "DenseHistory", "DATASETS", "MODELS", "DigitsCNN", "DigitsResNet",
           "MNIST1DCNN", "ModelSpec", "load_data", "load_digits", "load_mnist1d", "loaders", "make_model",
           "train_dense", "evaluate", "deterministic", "limit_threads"]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Data:
    """A classification data set as float32 / int64 tensors.

    Attributes
    ----------
    name : data set name (``"digits"`` or ``"mnist1d"``).
    x_train, y_train, x_test, y_test : tensors; ``x`` has a channel axis
        (``(n, 1, 8, 8)`` for digits, ``(n, 1, 40)`` for MNIST-1D).
    num_classes : number of classes.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def __repr__(self):
        return (f"Data({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def load_digits(*, test_size: float = 0.3, seed: int = 0) -> Data:
    """scikit-learn's 8x8 digits, stratified train / test split with a fixed seed.

    Pixels (0..16) are divided by 16, then standardized with the mean and standard
    deviation of the training pixels (one scalar each):

    .. math:: x' = (x / 16 - \\mu_{train}) / \\sigma_{train}

    Parameters
    ----------
    test_size : fraction of the 1797 images held out for testing, in (0, 1).
    seed : seed of the split.
    """
    if not isinstance(test_size, (int, float)) or not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}")
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=float(test_size),
                                              random_state=int(seed), stratify=y)
    mu, sd = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mu) / sd
    x_te = (x_te - mu) / sd
    return Data("digits", torch.from_numpy(np.ascontiguousarray(x_tr[:, None])),
                torch.from_numpy(y_tr), torch.from_numpy(np.ascontiguousarray(x_te[:, None])),
                torch.from_numpy(y_te), 10)


def load_mnist1d() -> Data:
    """MNIST-1D generated locally by ``mnist1d.data.make_dataset`` with its default arguments.

    The generator seeds NumPy's and Python's global random state; both are restored
    afterwards so that callers' random streams are not disturbed.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def x(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)[:, None]))

    def y(a):
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return Data("mnist1d", x(d["x"]), y(d["y"]), x(d["x_test"]), y(d["y_test"]), 10)


DATASETS = {"digits": load_digits, "mnist1d": load_mnist1d}


def load_data(name: str) -> Data:
    """Load a data set by name: ``"digits"`` or ``"mnist1d"``."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]()


def loaders(data: Data, *, batch_size: int = 64, seed: int = 0, test_batch_size: int = 1024):
    """Train / test ``DataLoader`` s over the tensors (single process, seeded shuffling).

    The training loader reshuffles every epoch from a ``torch.Generator`` seeded with
    ``seed``; two calls with the same seed yield the same batches in the same order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator()
    g.manual_seed(int(seed))
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size,
                       shuffle=True, generator=g)
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=test_batch_size,
                      shuffle=False)
    return train, test


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (about 42 k weights, 98 % of them in conv/linear weights).

    conv 1->16 (3x3) -> conv 16->32 (3x3) -> max-pool -> conv 32->64 (3x3) -> max-pool ->
    linear 256->64 -> linear 64->10, ReLU after every hidden layer.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = int(width)
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc1 = nn.Linear(4 * w * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)      # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)      # 2x2
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class DigitsResNet(nn.Module):
    """A ResNet-style CNN with batch norm for 8x8 digits (about 77 k conv/linear weights).

    stem conv 1->16 + BN, residual blocks 16->16 (8x8), 16->32 (4x4), 32->64 (2x2), global
    average pooling, linear 64->10.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = int(width)
        self.stem = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(w)
        self.layer1 = _BasicBlock(w, w, 1)
        self.layer2 = _BasicBlock(w, 2 * w, 2)
        self.layer3 = _BasicBlock(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MNIST1DCNN(nn.Module):
    """A 1-D CNN for MNIST-1D (signals of length 40), about 28 k weights.

    conv 1->64 (k5, stride 2) -> conv 64->64 (k3, stride 2) -> conv 64->64 (k3, stride 2) ->
    linear 320->10, ReLU after every convolution (the shape of the MNIST-1D authors' CNN,
    wider).
    """

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = int(width)
        self.conv1 = nn.Conv1d(1, w, 5, stride=2, padding=1)    # 40 -> 19
        self.conv2 = nn.Conv1d(w, w, 3, stride=2, padding=1)    # 19 -> 10
        self.conv3 = nn.Conv1d(w, w, 3, stride=2, padding=1)    # 10 -> 5
        self.fc = nn.Linear(w * 5, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


@dataclass(frozen=True)
class ModelSpec:
    """A model class, its data set and the dense training settings that converge for it."""

    cls: type
    dataset: str
    epochs: int
    lr: float
    batch_size: int


#: model name -> :class:`ModelSpec`
MODELS = {
    "digits_cnn": ModelSpec(DigitsCNN, "digits", epochs=15, lr=3e-3, batch_size=64),
    "digits_resnet": ModelSpec(DigitsResNet, "digits", epochs=10, lr=3e-3, batch_size=64),
    "mnist1d_cnn": ModelSpec(MNIST1DCNN, "mnist1d", epochs=20, lr=1e-2, batch_size=100),
}


def make_model(name: str, *, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A freshly initialized model by name (initialization seeded with ``seed``)."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return MODELS[name].cls(num_classes=num_classes)


# ---------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic(seed: int):
    """Seed torch and switch on deterministic algorithms for the block; restore afterwards.

    Torch's global RNG state and the deterministic-algorithms flag are put back as they
    were when the block exits.
    """
    flag = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(flag, warn_only=warn_only)


@contextlib.contextmanager
def limit_threads(n: int | None = 1):
    """Run the block with ``torch.set_num_threads(n)``; restore the count afterwards.

    Small models on a busy machine train many times faster on one thread than on several
    threads that wait for each other. ``None`` leaves the count alone.
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True, repr=False)
class DenseHistory:
    """What :func:`train_dense` did.

    Attributes
    ----------
    loss : mean training loss of every epoch.
    accuracy : test accuracy after every epoch (empty when no test loader was given).
    seconds : wall time of the training loop (evaluation included).
    """

    loss: tuple = field(default_factory=tuple)
    accuracy: tuple = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return self.accuracy[-1] if self.accuracy else None

    def __repr__(self):
        acc = "n/a" if not self.accuracy else f"{self.accuracy[-1]:.4f}"
        loss = "n/a" if not self.loss else f"{self.loss[-1]:.4f}"
        return (f"DenseHistory(epochs={len(self.loss)}, final_loss={loss}, "
                f"final_accuracy={acc}, seconds={self.seconds:.2f})")


def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (:func:`opq_torch.finetune.evaluate`: eval
    mode, no gradients, mode restored); an empty loader is refused."""
    acc = _evaluate(model, loader)
    if acc is None:
        raise ValueError("loader: no samples to evaluate")
    return acc


def train_dense(model: nn.Module, train_loader, test_loader=None, *, epochs: int = 20,
                lr: float = 3e-3, seed: int = 0, weight_decay: float = 0.0,
                progress: bool = False) -> DenseHistory:
    """Train ``model`` in place with Adam and a cosine learning-rate schedule.

    The learning rate follows, over the ``T = epochs * len(train_loader)`` steps,

    .. math:: \\eta_t = \\frac{\\eta}{2} \\left(1 + \\cos \\frac{\\pi t}{T}\\right).

    Deterministic for a given seed and loader (torch seeded, deterministic algorithms on
    for the duration of the call).

    Parameters
    ----------
    model : the module to train (modified in place).
    train_loader, test_loader : iterables of ``(x, y)`` batches; ``test_loader`` may be
        ``None`` (no per-epoch evaluation).
    epochs : number of passes over ``train_loader`` (>= 1).
    lr : peak learning rate (> 0).
    seed : seed of torch's RNG for the call (dropout-free models only use it through the
        loader's own generator).
    weight_decay : Adam's L2 penalty.
    progress : show a tqdm progress bar over epochs.

    Returns
    -------
    DenseHistory
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    steps = epochs * max(1, len(train_loader))
    losses, accs = [], []
    t0 = time.perf_counter()
    with deterministic(seed):
        opt = torch.optim.Adam(model.parameters(), lr=float(lr),
                               weight_decay=float(weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        it = range(epochs)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="train", unit="epoch")
        for _ in it:
            model.train()
            tot, n = 0.0, 0
            for x, y in train_loader:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * int(y.numel())
                n += int(y.numel())
            losses.append(tot / max(n, 1))
            if test_loader is not None:
                accs.append(evaluate(model, test_loader))
                if progress:
                    it.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.4f}")
    return DenseHistory(tuple(losses), tuple(accs), time.perf_counter() - t0)
