"""Deprecated import path: the demo's data sets and models live in :mod:`opq_torch.demo.examples`."""
from .demo.examples import *  # noqa: F401,F403
from .demo.examples import __all__  # noqa: F401
