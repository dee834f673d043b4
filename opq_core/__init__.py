"""opq_core: one-shot pruning + quantization, framework-agnostic (NumPy + Numba + SciPy).

``import opq_core`` never imports torch.
"""
from . import error_model, stats

__version__ = "0.1.0"
__all__ = ["error_model", "stats", "__version__"]
