r"""ANNC training in PyTorch: ADMM under a model-size budget, then straight-through fine-tuning.

ANNC (constrained sparsity-quantization joint learning) solves

.. math::

    \min_W \ \mathcal{L}(W) \quad\text{s.t.}\quad W \in \mathcal{C}_S =
    \Big\{ W : W_l \text{ pruned and on a } 2^{b_l}\text{-centroid codebook},\
    \sum_l \operatorname{nnz}(W_l)\, b_l \le S \Big\}

by ADMM with a latent copy ``W`` (the model's weights), a projected copy ``V`` and a
scaled dual ``U``:

.. math::

    W &\leftarrow \text{optimizer step on } \mathcal{L}, \text{ then the proximal step }
        W \leftarrow \frac{W + \eta\rho\,(V - U)}{1 + \eta\rho}
        \quad(\text{the exact minimizer of } \tfrac{1}{2\eta}\|W' - W\|^2
        + \tfrac{\rho}{2}\|W' - V + U\|^2) \\
    V &\leftarrow \Pi_{\mathcal{C}_S}(W + U), \qquad U \leftarrow U + W - V
        \qquad\text{every } k \text{ steps.}

The projection :math:`\Pi` is :func:`opq_core.annc.project` (knapsack pruning + zero-anchored
k-means + multiple-choice knapsack over bit-widths), computed on the CPU in NumPy.
:meth:`ANNC.finalize` projects the latent weights one last time, fixes masks, codebooks and
bit-widths in an :class:`opq_core.Plan` (``method="annc"``) and installs it with
:func:`opq_torch.compress`; fine-tuning then trains the latent weights straight through the
fixed codebooks, and the budget holds exactly whatever the fine-tuning does.

Usable from any training loop::

    annc = ANNC(model, rate=50)
    for x, y in loader:                 # your loop, optimizer, scheduler, AMP ...
        ...; optimizer.step()
        annc.step()                     # proximal step; a projection every k steps
    plan = annc.finalize()              # model is now compressed under the budget
    opq_torch.finetune(model, loader, epochs=5)

or as ``opq_torch.finetune(model, loader, epochs=..., step_hook=annc)``, or in one call with
:func:`compress_annc`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from opq_core.annc import annc_budget, annc_plan, project
from opq_core.allocate import Plan

from ._layers import discover
from ._numpy import to_numpy
from .compress import compress, is_compressed
from .finetune import History, finetune

__all__ = ["ANNC", "ProjectionRecord", "ANNCResult", "compress_annc"]


@dataclass(frozen=True)
class ProjectionRecord:
    """One ADMM projection: the step, ``rho``, the size of the projected model in bits,
    its sparsity, and the relative primal residual ``||W - V|| / ||W||``."""

    step: int
    rho: float
    size_bits: int
    sparsity: float
    residual: float
    bits: dict


def _layers(model, exclude):
    """{state_dict name: tensor} of the compressible tensors: the one discovery of
    :mod:`opq_torch._layers`, the same as :func:`opq_torch.compress` (tied tensors once)."""
    return {n: sl.tensor for n, sl in discover(model, exclude, fn="ANNC").slots.items()}


def _np(t):
    return to_numpy(t, half=True)


class ANNC:
    r"""ADMM driver of ANNC for a PyTorch model (see the module documentation).

    Parameters
    ----------
    model : nn.Module
        Not yet compressed. Its compressible tensors (those of :func:`opq_torch.compress`:
        every floating tensor with ``ndim >= 2``, tied ones once) are the compressed layers
        (names = ``state_dict`` names).
    rate : float, optional
        Target paper rate ``32 N / sum_l b_l nnz_l`` (``> 1``); the budget is
        ``floor(32 N / rate)`` bits.
    budget_bits : number, optional
        The budget ``S`` in bits (instead of ``rate``).
    rho : float
        ADMM penalty :math:`\rho > 0`.
    rho_growth : float
        :math:`\rho` is multiplied by this after every projection (``>= 1``; the scaled
        dual is rescaled accordingly), up to ``rho_max``.
    rho_max : float, optional
        Cap on :math:`\rho`; default ``0.1 / lr``, so that the proximal step never pulls
        the weights more than 10 % of the way to ``V - U`` in one step (a larger pull pins
        the weights to the projection and stops the loss from moving them).
    lr : float
        :math:`\eta` of the proximal step (usually the optimizer's learning rate).
    project_every : int, optional
        Steps between projections; default: once an epoch when :meth:`attach_loader` or
        :func:`compress_annc` knows the epoch length, else 100.
    iterations : int
        Prune / quantize alternations inside one projection.
    freeze_bits : bool
        ``False`` (default): every projection re-chooses every layer's bit-width jointly
        with the masks (:func:`opq_core.annc.project`, warm-started from the previous
        bit-widths); ``True``: the bit-widths of the first projection are kept to the end
        (masks and codebooks still change).
    exclude : sequence of str
        Module or weight names to leave alone.

    Raises
    ------
    ValueError
        ``rate <= 1``, a budget below the smallest feasible one (1 bit x 1 weight per
        layer; the message says it), an already compressed model, bad hyper-parameters.
    """

    def __init__(self, model, *, rate=None, budget_bits=None, rho: float = 2.0,
                 rho_growth: float = 1.3, rho_max: float | None = None, lr: float = 0.01,
                 project_every: int | None = None, iterations: int = 3,
                 freeze_bits: bool = False, exclude=()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ANNC: model must be a torch.nn.Module, got {type(model).__name__}")
        if is_compressed(model):
            raise ValueError("ANNC: model is already compressed; start from a dense model")
        for name, v, lo in (("rho", rho, 0.0), ("lr", lr, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= lo:
                raise ValueError(f"ANNC: {name} must be a finite number > 0, got {v!r}")
        if isinstance(rho_growth, bool) or not isinstance(rho_growth, (int, float)) \
                or not math.isfinite(rho_growth) or rho_growth < 1.0:
            raise ValueError(f"ANNC: rho_growth must be a finite number >= 1, got {rho_growth!r}")
        if rho_max is None:
            rho_max = max(float(rho), 0.1 / float(lr))
        elif isinstance(rho_max, bool) or not isinstance(rho_max, (int, float)) \
                or not math.isfinite(rho_max) or rho_max < rho:
            raise ValueError(f"ANNC: rho_max must be a finite number >= rho={rho!r}, "
                             f"got {rho_max!r}")
        if not isinstance(freeze_bits, bool):
            raise TypeError(f"ANNC: freeze_bits must be True or False, got {freeze_bits!r}")
        if project_every is not None and (isinstance(project_every, bool) or not isinstance(
                project_every, int) or project_every < 1):
            raise ValueError(f"ANNC: project_every must be an integer >= 1, got {project_every!r}")
        excl = [exclude] if isinstance(exclude, str) else list(exclude)
        self.model = model
        self.params = _layers(model, excl)
        if not self.params:
            raise ValueError("ANNC: model has no compressible tensor (a floating tensor with "
                             "ndim >= 2)")
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        try:
            self.budget_bits = annc_budget(shapes, rate=rate, budget_bits=budget_bits)
        except ValueError as exc:
            raise ValueError(f"ANNC: {exc}") from None
        self.rate = rate
        self.rho = float(rho)
        self.rho_growth = float(rho_growth)
        self.rho_max = float(rho_max)
        self.freeze_bits = freeze_bits
        self.lr = float(lr)
        self.project_every = project_every
        self.iterations = int(iterations)
        self.steps = 0
        self.records: list = []
        self.plan: Plan | None = None
        self._bits = None
        self._last = 0
        self.V = {}
        self.U = {n: torch.zeros_like(p, memory_format=torch.contiguous_format)
                  for n, p in self.params.items()}
        self._project()

    # ---- ADMM -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(sum(p.numel() for p in self.params.values()))

    def attach_loader(self, loader):
        """Project once an epoch of ``loader`` (when ``project_every`` was not given)."""
        if self.project_every is None and hasattr(loader, "__len__") and len(loader):
            self.project_every = int(len(loader))
        return self

    def _weights(self, plus_dual):
        with torch.no_grad():
            return {n: _np(p + self.U[n] if plus_dual else p) for n, p in self.params.items()}

    def _projection(self, weights):
        return project(weights, self.budget_bits, bits=self._bits,
                       freeze_bits=self.freeze_bits and self._bits is not None,
                       iterations=self.iterations)

    def _project(self):
        proj = self._projection(self._weights(True))
        self._bits = proj.bits
        V = proj.apply(self._weights(True))
        num = 0.0
        den = 0.0
        with torch.no_grad():
            for n, p in self.params.items():
                v = torch.from_numpy(V[n]).to(device=p.device, dtype=p.dtype)
                self.V[n] = v
                num += float(((p - v).double() ** 2).sum())
                den += float((p.double() ** 2).sum())
        kept = sum(proj.kept.values())
        self.records.append(ProjectionRecord(
            self.steps, self.rho, proj.size_bits, 1.0 - kept / max(self.n, 1),
            math.sqrt(num / den) if den > 0 else 0.0, dict(proj.bits)))
        return proj

    def step(self):
        """Call after every ``optimizer.step()``: the proximal step, and every
        ``project_every`` steps a projection and a dual update."""
        self.steps += 1
        c = self.lr * self.rho
        with torch.no_grad():
            for n, p in self.params.items():
                # W <- (W + eta rho (V - U)) / (1 + eta rho)
                p.add_((self.V[n] - self.U[n]), alpha=c).div_(1.0 + c)
        every = self.project_every or 100
        if self.steps - self._last >= every:
            self._last = self.steps
            self._project()
            with torch.no_grad():
                for n, p in self.params.items():
                    self.U[n].add_(p - self.V[n])
                g = min(self.rho_growth, self.rho_max / self.rho)
                if g > 1.0:
                    self.rho *= g
                    for u in self.U.values():
                        u.div_(g)

    def __call__(self, model=None, step=None):
        """``step_hook(model, step)`` of :func:`opq_torch.finetune`."""
        self.step()

    def penalty(self) -> torch.Tensor:
        r""":math:`\frac{\rho}{2} \sum_l \|W_l - V_l + U_l\|^2`, for loops that prefer the
        augmented loss to the proximal step (then do not call :meth:`step`'s proximal part:
        set ``lr`` tiny)."""
        tot = None
        for n, p in self.params.items():
            t = ((p - self.V[n] + self.U[n]) ** 2).sum()
            tot = t if tot is None else tot + t
        return 0.5 * self.rho * tot

    # ---- end of ADMM -----------------------------------------------------------------
    def finalize(self) -> Plan:
        """Project the latent weights, fix masks / codebooks / bits in a plan and install it.

        Returns the plan (``method="annc"``); its ``size_bits <= budget_bits``.
        """
        if self.plan is not None:
            raise ValueError("ANNC.finalize: already finalized")
        W = self._weights(False)
        proj = self._projection(W)
        plan = annc_plan(W, proj.masks, proj.codebooks, proj.bits, budget_bits=self.budget_bits)
        planned = set(plan.names)
        plan = replace(plan, skipped=tuple(k for k in self.model.state_dict()
                                           if k not in planned))
        compress(self.model, plan, masks=proj.masks)
        self.plan = plan
        self.V.clear()
        self.U.clear()
        return plan

    def __repr__(self):
        last = self.records[-1] if self.records else None
        tail = "" if last is None else (f", size_bits={last.size_bits}, "
                                        f"residual={last.residual:.4g}")
        return (f"ANNC(layers={len(self.params)}, budget_bits={self.budget_bits}, "
                f"rho={self.rho:.4g}, steps={self.steps}, projections={len(self.records)}"
                f"{tail})")


@dataclass(frozen=True, repr=False)
class ANNCResult:
    """What :func:`compress_annc` did: the installed plan, the ADMM and fine-tuning
    histories and the ADMM projection records."""

    plan: Plan
    admm: History
    finetune: History
    records: tuple

    def __iter__(self):  # plan, history = compress_annc(...)
        return iter((self.plan, self.finetune))

    def __repr__(self):
        acc = self.finetune.eval_acc[-1] if len(self.finetune) else None
        return (f"ANNCResult(paper_rate={self.plan.paper_rate:.2f}x, "
                f"size_bits={self.plan.size_bits}, budget_bits={self.plan.budget_bits}, "
                f"sparsity={self.plan.sparsity:.4f}, projections={len(self.records)}, "
                f"final eval acc={acc})")


def compress_annc(model, train_loader, *, rate=None, budget_bits=None, epochs_admm: int = 5,
                  epochs_finetune: int = 5, lr: float = 0.01, momentum: float = 0.9,
                  weight_decay: float = 0.0, rho: float = 2.0, rho_growth: float = 1.3,
                  rho_max: float | None = None, project_every: int | None = None,
                  iterations: int = 3, freeze_bits: bool = False, eval_loader=None,
                  device=None, exclude=(), progress: bool = True,
                  path=None) -> ANNCResult:
    """ANNC in one call: ADMM for ``epochs_admm`` epochs, finalize, fine-tune.

    Both stages use :func:`opq_torch.finetune` (SGD with ``lr``, ``momentum``,
    ``weight_decay``); the ADMM stage passes the :class:`ANNC` driver as ``step_hook``
    and projects once an epoch unless ``project_every`` says otherwise. The model is left
    compressed (``opq_torch.is_compressed``); with ``path`` it is also written to an
    ``.opq`` file by ``opq_torch.save`` (atomically).

    Returns
    -------
    ANNCResult
        Unpacks as ``plan, history`` (the fine-tuning history).
    """
    for name, v in (("epochs_admm", epochs_admm), ("epochs_finetune", epochs_finetune)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"compress_annc: {name} must be an integer >= 0, got {v!r}")
    if device is not None:
        model.to(device)
    annc = ANNC(model, rate=rate, budget_bits=budget_bits, rho=rho, rho_growth=rho_growth,
                rho_max=rho_max, lr=lr, project_every=project_every, iterations=iterations,
                freeze_bits=freeze_bits, exclude=exclude)
    annc.attach_loader(train_loader)
    admm = History(())
    if epochs_admm:
        admm = finetune(model, train_loader, epochs=epochs_admm, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, eval_loader=eval_loader, device=device,
                        step_hook=annc, progress=progress)
    plan = annc.finalize()
    ft = History(())
    if epochs_finetune:
        ft = finetune(model, train_loader, epochs=epochs_finetune, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, eval_loader=eval_loader, device=device,
                      progress=progress)
    if path is not None:
        from . import save
        save(model, path)
    return ANNCResult(plan, admm, ft, tuple(annc.records))
