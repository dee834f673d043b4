"""Deprecated import path: the codebook quantizer lives in :mod:`opq_core.kernels.codebook`."""
from .kernels.codebook import *  # noqa: F401,F403
from .kernels.codebook import __all__  # noqa: F401
