"""Framework adapters: :mod:`precond_ref.adapters.torch` and :mod:`precond_ref.adapters.jax`.

Import the submodule you need; this package imports neither framework by itself.
"""
