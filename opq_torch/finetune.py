r"""Fine-tuning a compressed model: the OPQ paper's second stage, with its defaults.

The plan (masks, scales, thresholds, steps) stays fixed; only the latent weights train,
through the straight-through estimator. Users who bring their own loop need none of this:
a compressed model is an ordinary ``nn.Module``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from opq_core._check import _check_positive
from opq_core._results import column, table_repr, total

__all__ = ["finetune", "History", "EpochStats"]


@dataclass(frozen=True)
class EpochStats:
    """One epoch: mean training loss, training accuracy, evaluation accuracy (``None``
    when not measured), learning rate at the end of the epoch, wall seconds, steps."""

    epoch: int
    train_loss: float
    train_acc: float | None
    eval_acc: float | None
    lr: float
    seconds: float
    steps: int


@dataclass(frozen=True, repr=False)
class History:
    """What :func:`finetune` did, one :class:`EpochStats` per epoch."""

    epochs: tuple = ()

    train_loss = column("train_loss", "epochs")
    train_acc = column("train_acc", "epochs")
    eval_acc = column("eval_acc", "epochs")
    seconds = total("seconds", float, "epochs")
    steps = total("steps", int, "epochs")

    def __len__(self):
        return len(self.epochs)

    def __repr__(self):
        def f(v):
            return "      -" if v is None else f"{v:7.4f}"
        return table_repr("History",
                          f"{'epoch':>5} {'loss':>9} {'train acc':>9} {'eval acc':>8} {'lr':>9} "
                          f"{'s':>7}", self.epochs,
                          lambda e: f"{e.epoch:>5d} {e.train_loss:>9.4f} {f(e.train_acc):>9} "
                                    f"{f(e.eval_acc):>8} {e.lr:>9.3g} {e.seconds:>7.2f}",
                          f"total {self.steps} steps, {self.seconds:.2f} s")


def _split(batch, fn):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    raise TypeError(f"{fn}: a batch must be (inputs, targets) or a dict with 'input' and "
                    f"'target', got {type(batch).__name__}")


def _to(x, device):
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _correct(out, y):
    """Number of correct top-1 predictions, or None when the task is not classification."""
    if (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and out.dim() == 2
            and y.dim() == 1 and not y.is_floating_point() and out.shape[0] == y.shape[0]):
        return int((out.argmax(dim=1) == y).sum())
    return None


def evaluate(model, loader, *, device=None) -> float | None:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode, no gradient); None when the
    outputs are not class logits."""
    was = model.training
    model.eval()
    right, total = 0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _split(batch, "evaluate")
                x, y = _to(x, device), _to(y, device)
                c = _correct(model(x), y)
                if c is None:
                    return None
                right += c
                total += int(y.shape[0])
    finally:
        model.train(was)
    return right / total if total else None


def finetune(model, train_loader, *, epochs, lr=0.005, momentum=0.9, weight_decay=1e-4,
             eval_loader=None, device=None, optimizer=None, scheduler=None, loss_fn=None,
             step_hook=None, progress=True) -> History:
    r"""Train a (compressed) model for a few epochs with the OPQ paper's defaults.

    Default optimizer: SGD with ``lr=0.005``, ``momentum=0.9``, ``weight_decay=1e-4`` over
    the trainable parameters (the latent weights of the compressed layers included). The
    straight-through gradient of a pruned weight is exactly zero, and the effective weight
    of a pruned position is exactly zero whatever its latent value becomes.

    Parameters
    ----------
    model : nn.Module
        Usually compressed by :func:`opq_torch.compress` (any module works).
    train_loader : iterable of (inputs, targets)
    epochs : int >= 1
    lr, momentum, weight_decay : float
        For the default optimizer (ignored when ``optimizer`` is given).
    eval_loader : iterable, optional
        Evaluated (top-1 accuracy) after every epoch.
    device : torch.device or str, optional
        The model and every batch are moved there.
    optimizer : torch.optim.Optimizer, optional
    scheduler : LR scheduler, optional
        ``scheduler.step()`` after every epoch (``ReduceLROnPlateau`` gets the epoch's eval
        accuracy, or its training loss).
    loss_fn : callable(outputs, targets) -> Tensor, optional
        Default ``nn.CrossEntropyLoss()``.
    step_hook : callable(model, step), optional
        Called after every ``optimizer.step()``; ``step`` counts steps from 1.
    progress : bool
        A tqdm progress bar with the running loss and accuracy.

    Returns
    -------
    History
    """
    fn = "finetune"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{fn}: epochs must be an integer >= 1, got {epochs!r}")
    if optimizer is None:
        _check_positive(fn, "lr", lr)
        _check_positive(fn, "momentum", momentum, allow_zero=True)
        _check_positive(fn, "weight_decay", weight_decay, allow_zero=True)
    if step_hook is not None and not callable(step_hook):
        raise TypeError(f"{fn}: step_hook must be callable(model, step), got {step_hook!r}")
    if device is not None:
        model.to(device)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{fn}: model has no trainable parameter")
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()
    if progress:
        from tqdm.auto import tqdm
    history = []
    step = 0
    model.train()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss_sum, n_seen, right, counted, n_steps = 0.0, 0, 0, 0, 0
        it = train_loader
        bar = None
        if progress:
            total = len(train_loader) if hasattr(train_loader, "__len__") else None
            bar = tqdm(train_loader, total=total, desc=f"epoch {epoch}/{epochs}", leave=False)
            it = bar
        for batch in it:
            x, y = _split(batch, fn)
            x, y = _to(x, device), _to(y, device)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            step += 1
            n_steps += 1
            if step_hook is not None:
                step_hook(model, step)
            bs = int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() else 1
            loss_sum += float(loss.detach()) * bs
            n_seen += bs
            c = _correct(out.detach(), y)
            if c is not None:
                right += c
                counted += bs
            if bar is not None:
                post = {"loss": f"{loss_sum / n_seen:.4f}"}
                if counted:
                    post["acc"] = f"{right / counted:.4f}"
                bar.set_postfix(post, refresh=False)
        if bar is not None:
            bar.close()
        train_loss = loss_sum / n_seen if n_seen else float("nan")
        eval_acc = evaluate(model, eval_loader, device=device) if eval_loader is not None else None
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(eval_acc if eval_acc is not None else train_loss)
            else:
                scheduler.step()
        history.append(EpochStats(
            epoch=epoch, train_loss=train_loss,
            train_acc=(right / counted) if counted else None, eval_acc=eval_acc,
            lr=float(optimizer.param_groups[0]["lr"]), seconds=time.perf_counter() - t0,
            steps=n_steps))
    return History(tuple(history))
