"""opq_core: one-shot pruning + quantization, framework-agnostic (NumPy + Numba + SciPy).

``import opq_core`` never imports torch.

>>> import numpy as np, opq_core
>>> w = {"fc": np.random.default_rng(0).laplace(size=(16, 32))}
>>> p = opq_core.plan(w, sparsity=0.75, bits=4)
>>> p.kept
128
"""
from . import error_model, stats
from ._plan import LayerPlan, Plan
from .allocate import plan
from .format import CompressedFile, read_opq, write_opq
from .io import load_weights, open_weights, save_weights

__version__ = "0.1.0"
__all__ = ["plan", "Plan", "LayerPlan", "error_model", "stats", "load_weights",
           "open_weights", "save_weights", "read_opq", "write_opq", "CompressedFile",
           "__version__"]
