"""Deprecated import path: synthetic weights live in :mod:`opq_core.synthetic`."""
from .synthetic import *  # noqa: F401,F403
from .synthetic import __all__  # noqa: F401
