r"""Run a compressed model with its weights kept packed: :func:`pack`.

:func:`pack` replaces every compressed ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*``
of a model compressed by :func:`opq_torch.compress` (or loaded by :func:`opq_torch.load`)
with a :class:`PackedLinear` / :class:`PackedConv` that holds only what the packed
``.opq`` layout stores for the layer (see :mod:`opq_core._packed`): the kept weights'
``bits``-bit symbols, the sparsity pattern as a bitmask or a gap code, the per-channel
quantizer, plus a few row-block checkpoints. No dense weight stays in memory.

Forward:

- a ``PackedLinear`` on the CPU with at most ``small_batch`` input rows and no autograd
  runs :func:`opq_core._packed.packed_matmul`, a Numba kernel that reads the packed codes
  directly (batch-1 inference is memory bound: it reads the packed bytes, not a dense
  float32 matrix);
- otherwise (larger batches, convolutions, another device, autograd) the dense weight is
  decoded on the fly, used once and dropped.

The decoded weights equal the compressed model's weights bit for bit; outputs equal the
compressed model's within float rounding (a different summation order). Packed modules
are for inference: they have no trainable weight.

>>> import torch, opq_torch
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> _ = opq_torch.compress(net, sparsity=0.8, bits=4)
>>> packed = opq_torch.pack(net)
>>> x = torch.randn(2, 16)
>>> torch.allclose(packed(x), net(x), atol=1e-5)
True
>>> type(packed[0]).__name__
'PackedLinear'
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opq_core._packed import PackedLayer, pack_layer, packed_matmul
from opq_core.format import layer_codes

from .compress import _compressed_modules, _require

__all__ = ["pack", "load_packed", "PackedLinear", "PackedConv", "is_packed", "packed_nbytes"]

_ARRAYS = ("index_bytes", "code_bytes", "scale", "threshold", "codebook", "block_row",
           "block_sym", "block_gap", "block_pos")
_META = ("name", "shape", "dtype", "bits", "grid", "step", "kept", "index")
_STATE_VERSION = 1


class _Packed(nn.Module):
    """Common part: the packed weight as buffers + its metadata as extra state."""

    def __init__(self, layer: PackedLayer, bias, weight_dtype: torch.dtype):
        super().__init__()
        for k in _ARRAYS:
            self.register_buffer(k, torch.from_numpy(np.ascontiguousarray(getattr(layer, k))))
        self.meta = {k: getattr(layer, k) for k in _META}
        self.meta["shape"] = tuple(int(s) for s in self.meta["shape"])
        self.weight_dtype = weight_dtype
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self):
        return {"version": _STATE_VERSION, "meta": dict(self.meta),
                "weight_dtype": str(self.weight_dtype).replace("torch.", "")}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "meta" not in state:
            raise ValueError(f"{type(self).__name__}: the state_dict holds no packed layer "
                             f"(got {type(state).__name__})")
        self.meta = dict(state["meta"])
        self.meta["shape"] = tuple(self.meta["shape"])
        self.weight_dtype = getattr(torch, state.get("weight_dtype", "float32"))

    @property
    def name(self) -> str:
        return self.meta["name"]

    def layer(self) -> PackedLayer:
        """The packed weight as a :class:`opq_core._packed.PackedLayer` (shares memory with
        the buffers; they are copied to the CPU first when they live elsewhere)."""
        arrs = {k: getattr(self, k).detach().cpu().numpy() for k in _ARRAYS}
        return PackedLayer(**self.meta, **arrs)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight held (buffers), bias excluded."""
        return sum(int(getattr(self, k).numel() * getattr(self, k).element_size())
                   for k in _ARRAYS)

    def weight_dense(self, device=None) -> torch.Tensor:
        """The decoded dense weight (the compressed model's weight, bit for bit)."""
        w = torch.from_numpy(self.layer().decode())
        return w.to(device=device if device is not None else self.code_bytes.device,
                    dtype=self.weight_dtype)

    def extra_repr(self):
        m = self.meta
        return (f"name={m['name']!r}, shape={tuple(m['shape'])}, bits={m['bits']}, "
                f"grid={m['grid']!r}, index={m['index']!r}, nbytes={self.nbytes}")


class PackedLinear(_Packed):
    """A compressed ``nn.Linear`` held packed (see the module docstring).

    ``small_batch``: the most input rows that go through the packed kernel (default 32).
    """

    def __init__(self, layer: PackedLayer, bias=None, weight_dtype=torch.float32, *,
                 small_batch: int = 32):
        super().__init__(layer, bias, weight_dtype)
        self.in_features = int(layer.shape[1])
        self.out_features = int(layer.shape[0])
        self.small_batch = int(small_batch)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PackedLinear {self.name!r}: input has {x.shape[-1]} features "
                             f"in its last dimension, the layer takes {self.in_features}")
        rows = x.numel() // self.in_features if self.in_features else 0
        direct = (x.device.type == "cpu" and 0 < rows <= self.small_batch
                  and x.dtype in (torch.float32, torch.float64, torch.float16)
                  and not (torch.is_grad_enabled() and x.requires_grad))
        if not direct:
            return F.linear(x, self.weight_dense(x.device).to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.detach().reshape(rows, self.in_features).to(torch.float32).numpy()
        y = torch.from_numpy(packed_matmul(self.layer(), x2))
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONVT = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
          nn.ConvTranspose3d: F.conv_transpose3d}


class PackedConv(_Packed):
    """A compressed convolution (or transposed convolution) held packed; its weight is
    decoded on the fly in every forward."""

    def __init__(self, layer: PackedLayer, conv: nn.Module, weight_dtype=torch.float32):
        super().__init__(layer, conv.bias, weight_dtype)
        base = next(c for c in (*_CONV, *_CONVT) if isinstance(conv, c))
        self.kind = base.__name__
        self.transposed = base in _CONVT
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)
        self.padding_mode = conv.padding_mode
        self._pad = getattr(conv, "_reversed_padding_repeated_twice", None)
        self._fn = (_CONVT if self.transposed else _CONV)[base]

    def forward(self, x):
        w = self.weight_dense(x.device).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.transposed:
            return self._fn(x, w, b, self.stride, self.padding, self.output_padding,
                            self.groups, self.dilation)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return self._fn(x, w, b, self.stride, 0, self.dilation, self.groups)
        return self._fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return f"{self.kind}, " + super().extra_repr()


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parent = root
    parts = path.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)


def pack(model: nn.Module, *, inplace: bool = False, small_batch: int = 32,
         index: str = "auto") -> nn.Module:
    """Replace every compressed layer of ``model`` by its packed module.

    Parameters
    ----------
    model : nn.Module compressed by :func:`opq_torch.compress` (or loaded by
        :func:`opq_torch.load`)
    inplace : bool
        Modify ``model`` itself (no temporary copy of the dense weights); by default a
        copy is packed and ``model`` is left as it is.
    small_batch : int
        Linear layers run the packed kernel for at most this many input rows.
    index : {"auto", "bitmask", "gap"}
        The sparsity pattern's coding; ``"auto"`` takes the cheaper, as the packed file.

    Returns
    -------
    nn.Module
        The packed model (``model`` itself when ``inplace``).
    """
    mods = _require(model, "pack")
    _check_pack_args("pack", small_batch, index)
    for path, mod, attr, q in mods:
        _check_packable("pack", q.layer, path, mod, attr)
        if len(mod.parametrizations.weight) != 1:
            raise ValueError(f"pack: layer {q.name!r} has {len(mod.parametrizations.weight)} "
                             "parametrizations on its weight; only opq's can be packed")
    out = model if inplace else copy.deepcopy(model)
    for path, mod, _, q in _compressed_modules(out):
        lp = q.layer
        with torch.no_grad():
            w = mod.weight.detach()
        wdt = w.dtype
        wn = (w.float() if wdt == torch.bfloat16 else w).cpu().numpy()
        mask = q.mask.detach().cpu().numpy()
        # the effective weights are on the plan's grid: quantizing them gives their codes
        pl = pack_layer(lp, layer_codes(lp, wn, mask), mask, index=index)
        _set_module(out, path, _packed_module(pl, mod, wdt, small_batch).to(device=w.device))
    return out


def _check_pack_args(fn, small_batch, index):
    if not isinstance(small_batch, int) or isinstance(small_batch, bool) or small_batch < 0:
        raise ValueError(f"{fn}: small_batch must be an int >= 0, got {small_batch!r}")
    if index not in ("auto", "bitmask", "gap"):
        raise ValueError(f"{fn}: index must be 'auto', 'bitmask' or 'gap', got {index!r}")


def _check_packable(fn, lp, path, mod, attr):
    """ValueError unless plan layer ``lp`` is the weight of a Linear / Conv module
    ``mod`` (at ``path``, not the model itself) planned along axis 0."""
    if attr != "weight" or not isinstance(mod, (nn.Linear, *_CONV, *_CONVT)):
        raise ValueError(f"{fn}: layer {lp.name!r} is a {type(mod).__name__}; only Linear "
                         "and Conv/ConvTranspose layers can be packed")
    if lp.channel_axis:
        raise ValueError(f"{fn}: layer {lp.name!r} ({type(mod).__name__}) is planned along "
                         f"its stored axis {lp.channel_axis}; packed layers hold plans "
                         "along axis 0 (compress it with a plan along axis 0, e.g. from the "
                         "command line, to pack it)")
    if path == "":
        raise ValueError(f"{fn}: the model itself is the compressed layer {lp.name!r}; "
                         "wrap it in a container (e.g. nn.Sequential) to pack it")


def _packed_module(pl, mod, wdt, small_batch):
    if isinstance(mod, nn.Linear):
        return PackedLinear(pl, mod.bias, wdt, small_batch=small_batch)
    return PackedConv(pl, mod, wdt)


def load_packed(path, model: nn.Module, *, small_batch: int = 32, index: str = "auto",
                progress: bool = False) -> nn.Module:
    """Read an ``.opq`` file into ``model`` with its compressed layers packed, straight
    from the file's codes: the dense weights of the compressed layers are never built.

    ``model`` is a fresh (not compressed) instance of the saved architecture, as for
    :func:`opq_torch.load`; every compressed layer must be the weight of a Linear or
    Conv/ConvTranspose module planned along axis 0 (what :func:`pack` packs). The result
    equals ``pack(load(path, model), index=index)``: the same packed buffers, outputs bit
    for bit. Memory: besides the model, one layer's mask and codes (2 bytes per weight)
    at a time; each dense weight of ``model`` that a packed module replaces is released.
    Everything is checked before the model is touched.

    Returns ``model`` itself, packed.
    """
    from opq_core.format import OpqStream

    from ._layers import discover
    from .io import _match_file
    fn = "load_packed"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if _compressed_modules(model) or is_packed(model):
        raise ValueError(f"{fn}: model is already compressed or packed; pass a freshly "
                         "built model")
    _check_pack_args(fn, small_batch, index)
    with OpqStream(path) as st:
        where = f"{fn}: {str(path)!r} does not fit this model"
        layers = discover(model, fn=fn)
        keys, ignored = _match_file(model, layers, [(k, *st.info(k)) for k in st.names],
                                    set(st.plan.names), where, fn)
        slots = {}
        for lp in st.plan.layers:
            slot = layers.slots.get(keys[lp.name])
            if slot is None:
                raise ValueError(f"{where}: layer {lp.name!r} is not a compressible tensor "
                                 "of this model")
            if slot.aliases:
                raise ValueError(f"{fn}: layer {lp.name!r} is tied to "
                                 f"{slot.alias_names[0]!r}; a tied weight cannot be packed")
            _check_packable(fn, lp, slot.path, slot.module, slot.attr)
            slots[lp.name] = slot
        # only now is the model changed: the other tensors, then each layer packed
        with torch.no_grad():
            for name in st.file.other_names:
                if name in ignored:
                    continue
                t = torch.from_numpy(np.ascontiguousarray(st.tensor(name)))
                _tensor_at(model, keys[name]).copy_(t)
        todo = st.plan.layers
        if progress:
            from tqdm import tqdm
            todo = tqdm(todo, desc="pack", unit="layer")
        for lp in todo:
            slot = slots[lp.name]
            mask, codes = st.layer_codes(lp.name)
            pl = pack_layer(lp, codes, mask, index=index)
            del mask, codes
            w = getattr(slot.module, slot.attr)
            new = _packed_module(pl, slot.module, w.dtype, small_batch).to(device=w.device)
            del w
            _set_module(model, slot.path, new)
    if ignored:
        import warnings
        warnings.warn(f"{fn}: {str(path)!r}: integer tensor(s) the model does not hold were "
                      f"not loaded: {', '.join(ignored)}", UserWarning, stacklevel=2)
    return model


def _tensor_at(model, key):
    """The parameter or buffer of ``model`` named ``key`` in its state_dict."""
    mod_path, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(mod_path) if mod_path else model, attr)


def is_packed(model: nn.Module) -> bool:
    """True when some module of ``model`` is a packed layer."""
    return any(isinstance(m, _Packed) for m in model.modules())


def packed_nbytes(model: nn.Module) -> dict:
    """``{layer name: bytes held}`` of every packed layer of ``model``."""
    return {m.name: m.nbytes for m in model.modules() if isinstance(m, _Packed)}
