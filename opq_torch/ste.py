r"""Straight-through fake-quantization for PyTorch.

Two quantizers, each as a torch custom operator (opaque to ``torch.compile``) wrapped in an
``autograd.Function`` whose backward is the straight-through estimator:

- :class:`FakeQuantSTE` -- the uniform grids of :func:`opq_core.kernels.fake_quant`
  ("offset", "symmetric"): per output channel ``c`` a scale :math:`s_c`, a threshold
  :math:`\theta_c`, one normalized step :math:`D` and :math:`K = 2^{B-1}` levels.
- :class:`CodebookSTE` -- the non-uniform codebook of an ANNC layer: the nearest of the
  sorted non-zero centroids :math:`c_0 < c_1 < \dots`.

Forward on CPU tensors runs the opq_core kernel on NumPy views of the tensors (no copy of
the weights); on any other device the same formula runs in torch ops in float64 and gives
the same bits (:func:`fake_quant_torch`, :func:`fake_quant_codebook_torch`; both are tested
against the kernels on CPU). The output has the dtype of the latent weight; float16 and
bfloat16 weights are computed from their exact float32 values and the float32 result is
rounded once more to the weight dtype.

The backward pass is

.. math:: \frac{\partial L}{\partial w} = \frac{\partial L}{\partial \hat w}\,[\text{mask}],

with pruned positions exactly ``+0.0`` (:func:`opq_core.kernels.ste_backward` on CPU).

Examples
--------
>>> import torch
>>> w = torch.tensor([[0.3, -0.9, 0.05, 0.5]], requires_grad=True)
>>> mask = torch.tensor([[True, True, False, True]])
>>> scale = torch.tensor([1.0], dtype=torch.float64)
>>> thr = torch.tensor([0.1], dtype=torch.float64)
>>> y = fake_quant_ste(w, mask, scale, thr, 0.5, 2, "offset")
>>> y.detach().tolist()
[[0.3499999940395355, -0.8500000238418579, 0.0, 0.3499999940395355]]
>>> y.sum().backward()
>>> w.grad.tolist()
[[1.0, 1.0, 0.0, 1.0]]
"""
from __future__ import annotations

import importlib
from typing import Optional

import numba
import numpy as np
import torch

from opq_core import kernels as _k
from opq_core._jit import PARALLEL_MIN_SIZE as _PARALLEL_MIN_SIZE

from . import _buffers
from ._numpy import to_numpy as _np

__all__ = ["KERNEL_THREADS", "kernel_threads", "FakeQuantSTE", "CodebookSTE", "fake_quant_ste", "fake_quant_codebook_ste",
           "fake_quant_torch", "fake_quant_codebook_torch", "codebook_midpoints",
           "ste_backward_torch"]

_HALF = (torch.float16, torch.bfloat16)
_GRID_IDS = {"offset": 0, "symmetric": 1}


# --------------------------------------------------------------------------------------
# the formulas in torch ops (any device)
# --------------------------------------------------------------------------------------

def _compute_dtype(dtype):
    """Dtype the kernels see: float32/float64 as they are, half types as float32."""
    if dtype in _HALF:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fake_quant: w must be a floating tensor (float16, bfloat16, float32 "
                        f"or float64), got dtype {dtype}")
    return dtype


def _channels_view(v, ndim):
    """A per-channel vector shaped ``(C, 1, ..., 1)`` to broadcast over a weight."""
    return v.reshape((v.shape[0],) + (1,) * (ndim - 1))


#: Smallest block of the eager torch-ops formulas, in elements; a tensor is cut into at most
#: :data:`TORCH_BLOCKS` blocks (bigger ones for big tensors), so the temporaries of a block
#: (three float64 arrays and two bool ones, in-place operations otherwise) stay under half
#: the weight's bytes and the per-block overhead (a dozen operator calls) stays bounded.
TORCH_CHUNK = 1 << 16
TORCH_BLOCKS = 16

#: Use ``torch.compile`` (one fused Triton kernel) for the torch-ops formulas on CUDA when
#: Triton is installed; False keeps the eager blocks everywhere.
TORCH_COMPILE = True


def _fq_block(x, m, s, th, d: float, kmax: float, symmetric: bool, cdt: torch.dtype):
    """The formula on one block: ``x`` (R, M) in any float dtype, ``s``/``th`` (R, 1) float64."""
    x = x.to(cdt).to(torch.float64)
    sd = s * d
    a = x.abs()
    if symmetric:
        kf = torch.round(a / sd)  # half to even, as rint
    else:
        kf = torch.floor((a - th) / sd) + 1.0
    kf = torch.where(kf > kmax, kmax, kf)
    kf = torch.where(kf >= 1.0, kf, 1.0)  # NaN -> 1, as in the kernel
    if symmetric:
        level = kf * sd
    else:
        level = th + s * ((kf - 0.5) * d)
    val = torch.where(x >= 0.0, level, -level)
    val = torch.where(torch.isnan(x), x, val)
    return torch.where(m, val, 0.0).to(cdt)


def _fq_block_eager(x, m, s, th, d: float, kmax: float, symmetric: bool, cdt: torch.dtype):
    """:func:`_fq_block` with in-place operations (three float64 temporaries of the block):
    the same operations in the same order, so the same bits."""
    x = x.to(cdt).to(torch.float64)
    a = x.abs()
    if symmetric:
        a.div_(s * d).round_()  # half to even, as rint
    else:
        a.sub_(th).div_(s * d).floor_().add_(1.0)
    # where(kf > K, K, kf) then where(kf >= 1, kf, 1): NaN and -inf -> 1, +inf -> K
    a.nan_to_num_(nan=1.0, posinf=kmax, neginf=1.0).clamp_(1.0, kmax)
    if symmetric:
        a.mul_(s * d)
    else:
        a.sub_(0.5).mul_(d).mul_(s).add_(th)
    torch.where(x >= 0.0, a, a.neg(), out=a)
    torch.where(torch.isnan(x), x, a, out=a)
    return torch.where(m, a, 0.0).to(cdt)


def _cb_block(x, m, s, c, mids, cdt: torch.dtype):
    """Nearest centroid on one block: ``x`` (R, M), ``s`` (R, 1) float64 channel scales."""
    x = x.to(cdt).to(torch.float64)
    idx = torch.bucketize(x / s, mids, right=False)
    return torch.where(m, c[idx] * s, 0.0).to(cdt)


_compiled = {}


def _compiled_fn(name, fn):
    """``torch.compile(fn)`` on CUDA with Triton, else None (cached per name)."""
    if name not in _compiled:
        got = None
        try:
            importlib.import_module("triton")
            got = torch.compile(fn, dynamic=True, fullgraph=True,
                                options={"emulate_precision_casts": True})
        except Exception:  # no Triton / no inductor backend: eager blocks
            got = None
        _compiled[name] = got
    return _compiled[name]


def _run_compiled(name, fn, *args):
    """The compiled ``fn`` on ``args``, or None (then the eager blocks run): no Triton, or a
    compile error, which is reported once and turns the compiled path off for ``name``."""
    f = _compiled_fn(name, fn)
    if f is None:
        return None
    try:
        return f(*args)
    except Exception as e:  # an inductor/Triton failure must not stop training
        import warnings
        warnings.warn(f"opq_torch: torch.compile of the {name} formula failed ({e!r}); "
                      f"using the eager torch ops", RuntimeWarning, stacklevel=3)
        _compiled[name] = None
        return None


def _use_compile(t):
    return TORCH_COMPILE and t.device.type == "cuda" and not torch.compiler.is_compiling()


def _blocks(c, n):
    """(row slice, column slice) blocks of a (c, n) view: at most ``max(TORCH_CHUNK,
    c * n / TORCH_BLOCKS)`` elements each."""
    chunk = max(1, int(TORCH_CHUNK), -(-c * n // max(1, int(TORCH_BLOCKS))))
    if n <= chunk:
        rows = max(1, chunk // max(n, 1))
        for r in range(0, c, rows):
            yield slice(r, min(c, r + rows)), slice(0, n)
    else:
        for r in range(c):
            for j in range(0, n, chunk):
                yield slice(r, r + 1), slice(j, min(n, j + chunk))


def _rows_view(t):
    c = t.shape[0] if t.dim() else 1
    n = t.numel() // c if c else 0
    return t.reshape(c, n)


def fake_quant_torch(w, mask, scale, threshold, step, bits, grid="offset"):
    r"""Prune + fake-quantize in torch ops, float64, bit for bit :func:`opq_core.kernels.fake_quant`.

    .. math::

        \delta_c &= s_c D,\quad K = 2^{B-1} \\
        \text{offset:}\quad k &= \operatorname{clip}(\lfloor (|w| - \theta_c)/\delta_c \rfloor
            + 1, 1, K),\quad \ell = \theta_c + s_c ((k - \tfrac12) D) \\
        \text{symmetric:}\quad k &= \operatorname{clip}(\operatorname{rint}(|w|/\delta_c), 1, K),
            \quad \ell = k \delta_c \\
        \hat w &= [\text{mask}]\,(\ell \text{ if } w \ge 0 \text{ else } -\ell)

    The operations and their order are the kernel's, so on finite and infinite inputs the
    result equals the kernel's on every device. A kept NaN weight gives NaN here (the CPU
    kernel raises ValueError instead).

    Memory: the only tensor of the weight's size is the output. Eagerly the formula runs on
    blocks (:data:`TORCH_CHUNK`, :data:`TORCH_BLOCKS`: rows of the ``(C, fan-in)`` view, or
    pieces of one row), so its float64 temporaries stay a fraction of the weight; on CUDA,
    when Triton is available, it is one ``torch.compile``'d kernel over the whole tensor
    (:data:`TORCH_COMPILE`), compiled without FMA contraction so that it rounds like the
    separate operations.

    Parameters
    ----------
    w : Tensor, floating, output channels first
    mask : bool Tensor of ``w``'s shape (True = kept)
    scale, threshold : float64 Tensors of shape ``(C,)``
    step : float
    bits : int in 1..8
    grid : "offset" or "symmetric"

    Returns
    -------
    Tensor of ``w``'s dtype and device.

    Examples
    --------
    >>> w = torch.tensor([[0.3, -0.9, 0.05, 0.5]])
    >>> m = torch.tensor([[True, True, False, True]])
    >>> one = torch.ones(1, dtype=torch.float64)
    >>> fake_quant_torch(w, m, one, 0.1 * one, 0.5, 2).tolist()
    [[0.3499999940395355, -0.8500000238418579, 0.0, 0.3499999940395355]]
    """
    if grid not in _GRID_IDS:
        raise ValueError(f"fake_quant: grid must be 'offset' or 'symmetric', got {grid!r}")
    cdt = _compute_dtype(w.dtype)
    w = w.detach()  # a quantizer: its gradient is the straight-through one (FakeQuantSTE)
    d = float(step)
    kmax = float(1 << (int(bits) - 1))
    sym = grid == "symmetric"
    x2 = _rows_view(w)
    m2 = _rows_view(mask.to(device=w.device))
    c = x2.shape[0]
    s = scale.to(device=w.device, dtype=torch.float64).reshape(c, 1)
    th = threshold.to(device=w.device, dtype=torch.float64).reshape(c, 1)
    if _use_compile(w):
        y = _run_compiled("fq", _fq_block, x2, m2, s, th, d, kmax, sym, cdt)
        if y is not None:
            return y.to(w.dtype).reshape(w.shape)
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    o2 = out.view(x2.shape)
    for rs, cs in _blocks(*x2.shape):
        o2[rs, cs] = _fq_block_eager(x2[rs, cs], m2[rs, cs], s[rs], th[rs], d, kmax, sym, cdt)
    return out


def codebook_midpoints(codebook):
    r"""Decision boundaries of a sorted codebook: :math:`m_j = (c_j + c_{j+1}) / 2` in float64.

    >>> codebook_midpoints(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)).tolist()
    [-0.25, 1.25]
    """
    c = codebook.to(torch.float64)
    return (c[:-1] + c[1:]) / 2.0


def fake_quant_codebook_torch(w, mask, codebook, scale=None):
    r"""Nearest-centroid fake quantization of kept weights, in torch ops (any device).

    The centroids are in units of the per-output-channel ``scale`` ``s_r`` (default, or an
    empty tensor: ones, absolute units). The index of a kept weight is the number of
    midpoints strictly below ``w / s_r`` (float64), so a weight exactly on a midpoint takes
    the lower centroid:

    .. math::

        i(w) = \#\{j : m_j < w / s_r\},\qquad \hat w = [\text{mask}]\; s_r c_{i(w)}

    The product (float64) is rounded to float32 and then to ``w``'s dtype, bit for bit
    :func:`opq_core.kernels.codebook.fake_quant_codebook`. Memory and devices as in
    :func:`fake_quant_torch`.

    >>> w = torch.tensor([[-0.25, 0.3, 3.0]])
    >>> cb = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    >>> fake_quant_codebook_torch(w, torch.ones(1, 3, dtype=torch.bool), cb).tolist()
    [[-1.0, 0.5, 2.0]]
    """
    cdt = _compute_dtype(w.dtype)
    c = codebook.to(device=w.device, dtype=torch.float64)
    if c.numel() == 0:
        return torch.zeros_like(w)
    w = w.detach()
    mids = codebook_midpoints(c)
    x2 = _rows_view(w)
    m2 = _rows_view(mask.to(device=w.device))
    s2 = _codebook_scale(scale, x2.shape[0], w.device)
    if _use_compile(w):
        y = _run_compiled("cb", _cb_block, x2, m2, s2, c, mids, cdt)
        if y is not None:
            return y.to(w.dtype).reshape(w.shape)
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    o2 = out.view(x2.shape)
    for rs, cs in _blocks(*x2.shape):
        o2[rs, cs] = _cb_block(x2[rs, cs], m2[rs, cs], s2[rs], c, mids, cdt)
    return out


def _codebook_scale(scale, rows, device):
    """(rows, 1) float64 channel scales of a codebook layer (None or empty: ones)."""
    if scale is None or scale.numel() == 0:
        return torch.ones((rows, 1), dtype=torch.float64, device=device)
    s = scale.to(device=device, dtype=torch.float64).reshape(-1, 1)
    if s.shape[0] != rows:
        raise ValueError(f"fake_quant_codebook: scale has {s.shape[0]} values for {rows} "
                         "output channels")
    return s


def ste_backward_torch(grad, mask):
    """``grad`` where kept, ``+0.0`` where pruned (torch ops, any device)."""
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


# --------------------------------------------------------------------------------------
# CPU: the opq_core kernels through NumPy views
# --------------------------------------------------------------------------------------

#: Numba threads of the CPU kernels called from autograd: ``None`` (default) picks them per
#: call with :func:`kernel_threads`; an int fixes the count for every call.
KERNEL_THREADS: int | None = None

#: Elements each Numba thread must get before one more thread is woken (:func:`kernel_threads`).
ELEMENTS_PER_THREAD = 1 << 20


def kernel_threads(numel: int) -> int:
    r"""Numba threads for one CPU kernel call on a tensor of ``numel`` elements.

    .. math:: T = \max(1, \min(T_{\max}, \lfloor n / 2^{20} \rfloor)),\qquad
              T_{\max} = \min(\text{Numba's threads}, \text{torch.get\_num\_threads()})

    A pass over a tensor is memory-bound and short: waking a thread costs tens of
    microseconds, and right after a torch operator torch's own OpenMP threads are still
    spinning on the same cores. Below about a million elements per thread (a few MB, well
    under a millisecond per pass) the extra threads cost more than they bring, so the layers
    of a small CNN (all under 1 M weights) stay on the calling thread inside a training step,
    while a lone 25 M-weight layer gets every core. ``torch.get_num_threads()`` caps the
    count, so a process that limited torch to ``k`` threads gets at most ``k`` here too.
    :data:`KERNEL_THREADS` overrides the rule (benchmarks/bench_kernels.py measures both).

    >>> kernel_threads(1000)
    1
    """
    if KERNEL_THREADS is not None:
        return max(1, int(KERNEL_THREADS))
    cap = min(int(numba.config.NUMBA_NUM_THREADS), int(torch.get_num_threads()))
    return max(1, min(cap, int(numel) // ELEMENTS_PER_THREAD))


class _kernel_threads:
    """Run Numba's parallel kernels with :func:`kernel_threads` threads (big tensors only;
    smaller ones use the serial kernels anyway); the previous setting is restored."""

    __slots__ = ("n", "prev")

    def __init__(self, numel):
        self.n = kernel_threads(numel) if numel >= _PARALLEL_MIN_SIZE else None
        self.prev = None

    def __enter__(self):
        if self.n is not None:
            prev = numba.get_num_threads()
            n = min(self.n, numba.config.NUMBA_NUM_THREADS)
            if prev != n:
                self.prev = prev
                numba.set_num_threads(n)

    def __exit__(self, *exc):
        if self.prev is not None:
            numba.set_num_threads(self.prev)
        return False


def _fq_cpu(w, mask, scale, threshold, step, bits, grid):
    cdt = _compute_dtype(w.dtype)
    x = w if w.dtype == cdt else w.to(cdt)
    xn = _np(x)
    out = _buffers.take(xn.shape, xn.dtype)
    with _kernel_threads(x.numel()):
        _k.fake_quant(xn, _np(mask), _np(scale), _np(threshold), step, bits, grid, out=out)
    y = torch.from_numpy(out)
    return y if y.dtype == w.dtype else y.to(w.dtype)


_codebook_impl = None


def _codebook_kernel():
    """``opq_core.kernels.codebook.fake_quant_codebook`` when that module exists, else None."""
    global _codebook_impl
    if _codebook_impl is None:
        try:
            mod = importlib.import_module("opq_core.kernels.codebook")
            _codebook_impl = getattr(mod, "fake_quant_codebook", False)
        except ImportError:
            _codebook_impl = False
    return _codebook_impl or None


def _fqc_cpu(w, mask, codebook, scale=None):
    fn = _codebook_kernel()
    if fn is None or codebook.numel() == 0:
        return fake_quant_codebook_torch(w, mask, codebook, scale)
    cdt = _compute_dtype(w.dtype)
    x = w if w.dtype == cdt else w.to(cdt)
    sc = None if scale is None or scale.numel() == 0 else _np(scale.to(torch.float64))
    with _kernel_threads(x.numel()):
        out = fn(_np(x), _np(mask), _np(codebook.to(torch.float64)), scale=sc)
    y = torch.from_numpy(np.ascontiguousarray(out))
    return y if y.dtype == w.dtype else y.to(w.dtype)


def _ste_cpu(grad, mask):
    if grad.dtype not in (torch.float32, torch.float64):
        return ste_backward_torch(grad, mask)
    gn = _np(grad)
    out = _buffers.take(gn.shape, gn.dtype)
    with _kernel_threads(grad.numel()):
        _k.ste_backward(gn, _np(mask), out=out)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# custom operators: opaque to torch.compile, CPU kernel vs torch-ops per device
# --------------------------------------------------------------------------------------

@torch.library.custom_op("opq::fake_quant", mutates_args=())
def _fake_quant_op(w: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                   threshold: torch.Tensor, step: float, bits: int, grid: str) -> torch.Tensor:
    return fake_quant_torch(w, mask, scale, threshold, step, bits, grid)


@_fake_quant_op.register_kernel("cpu")
def _(w, mask, scale, threshold, step, bits, grid):
    return _fq_cpu(w, mask, scale, threshold, step, bits, grid)


@_fake_quant_op.register_fake
def _(w, mask, scale, threshold, step, bits, grid):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.custom_op("opq::fake_quant_codebook", mutates_args=())
def _fake_quant_codebook_op(w: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor,
                            scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return fake_quant_codebook_torch(w, mask, codebook, scale)


@_fake_quant_codebook_op.register_kernel("cpu")
def _(w, mask, codebook, scale=None):
    return _fqc_cpu(w, mask, codebook, scale)


@_fake_quant_codebook_op.register_fake
def _(w, mask, codebook, scale=None):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.custom_op("opq::ste_backward", mutates_args=())
def _ste_backward_op(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ste_backward_torch(grad, mask)


@_ste_backward_op.register_kernel("cpu")
def _(grad, mask):
    return _ste_cpu(grad, mask)


@_ste_backward_op.register_fake
def _(grad, mask):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------

def _eager_cpu(t):
    """CPU tensor outside torch.compile: call the kernel directly (same result as the op)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _ste(grad, mask):
    grad = grad.contiguous()
    if _eager_cpu(grad):
        return _ste_cpu(grad, mask)
    return _ste_backward_op(grad, mask)


class FakeQuantSTE(torch.autograd.Function):
    """Uniform-grid prune + fake-quant with a straight-through gradient.

    ``FakeQuantSTE.apply(w, mask, scale, threshold, step, bits, grid)``; see
    :func:`fake_quant_torch` for the formula. Only ``w`` receives a gradient.
    """

    @staticmethod
    def forward(ctx, w, mask, scale, threshold, step, bits, grid):
        ctx.save_for_backward(mask)
        if _eager_cpu(w):  # the operator's CPU kernel without the dispatcher's overhead
            return _fq_cpu(w, mask, scale, threshold, float(step), int(bits), str(grid))
        return _fake_quant_op(w, mask, scale, threshold, float(step), int(bits), str(grid))

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _ste(grad, mask), None, None, None, None, None, None


class CodebookSTE(torch.autograd.Function):
    """Codebook (ANNC) prune + fake-quant with a straight-through gradient.

    ``CodebookSTE.apply(w, mask, codebook[, scale])``; see :func:`fake_quant_codebook_torch`.
    """

    @staticmethod
    def forward(ctx, w, mask, codebook, scale=None):
        ctx.save_for_backward(mask)
        if scale is None:
            scale = codebook.new_empty(0)
        if _eager_cpu(w):
            return _fqc_cpu(w, mask, codebook, scale)
        return _fake_quant_codebook_op(w, mask, codebook, scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _ste(grad, mask), None, None, None


def fake_quant_ste(w, mask, scale, threshold, step, bits, grid="offset"):
    """Functional form of :class:`FakeQuantSTE`."""
    return FakeQuantSTE.apply(w, mask, scale, threshold, step, bits, grid)


def fake_quant_codebook_ste(w, mask, codebook, scale=None):
    """Functional form of :class:`CodebookSTE`."""
    return CodebookSTE.apply(w, mask, codebook, scale)
