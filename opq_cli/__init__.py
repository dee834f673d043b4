"""opq_cli: the ``opq`` command; the only package that imports both opq_core and opq_torch."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
