"""The demo, not part of the adapter: small data sets and models (:mod:`.examples`) and the
quick-start run (:mod:`.run`)."""
from . import examples
from .run import METHODS, digits_task, run_demo

__all__ = ["run_demo", "digits_task", "METHODS", "examples"]
