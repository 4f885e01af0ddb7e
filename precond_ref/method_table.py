"""Moved to :mod:`precond_ref.compare.methods`; this re-export keeps ``from .method_table import ...`` working."""

from .compare.methods import BASELINES, METHODS, MethodEntry, entry_by_name, method_names

__all__ = ["MethodEntry", "METHODS", "BASELINES", "entry_by_name", "method_names"]
