"""Stacked operands (a leading block axis ``b``): a per-block value shaped to scale a stack
(:func:`per_block`), the identity in a factor's structure (:func:`identity`; a dense factor a
``(b, d, d)`` stack, a diagonal one a ``(b, d)`` stack of its diagonals, whose products are
:mod:`precond_ref.linalg`'s), and the arrays a step makes once (:func:`constant`, :func:`number`,
:func:`keeping_constants`). ``tests/test_factors.py`` checks each against its plain formula."""

from __future__ import annotations

from .._backend import constant, is_number, keeping_constants, number, placement
from ..linalg import is_diagonal

__all__ = ["per_block", "identity", "constant", "number", "keeping_constants"]


def per_block(xp, value, like):
    """A per-block value of shape (b,) shaped to multiply a stack ``like`` (b, ...) block by block
    (``value`` with ``like.ndim - 1`` unit axes); scalars pass through."""
    if is_number(value):  # a host number (under torch.compile maybe a symbolic one, with no attributes)
        return value
    if hasattr(value, "shape") and len(value.shape) == 1:
        return xp.reshape(value, (value.shape[0],) + (1,) * (len(like.shape) - 1))
    return value


def identity(xp, factor, scale: float = 1.0):
    """``scale·I`` in the structure of ``factor`` (diagonal: the number ``scale``); made once per
    size, scale, dtype and device (:func:`constant`)."""
    if is_diagonal(factor):
        return scale * 1.0
    d, dtype = factor.shape[-1], factor.dtype
    make = lambda: scale * xp.eye(d, dtype=dtype, device=placement(xp, factor))  # noqa: E731
    return constant(xp, ("eye", d, scale, dtype), make, factor)
