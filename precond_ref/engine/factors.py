"""Kronecker factors of dense or diagonal structure, stacked (a leading block axis ``b``): the
products a factored rule states (IF-Shampoo), each one line of math for both structures, a dense
factor a ``(b, d, d)`` stack and a diagonal one a ``(b, d)`` stack of its diagonals. Each function's
docstring gives its plain formula; ``tests/test_factors.py`` checks it against that formula."""

from __future__ import annotations

from .._backend import cast, constant, is_number, keeping_constants, number, placement
from ..linalg import mode_gram, mode_product

__all__ = [
    "along", "is_diagonal", "times_transposed", "gram", "mean_trace", "unfolding_gram", "identity", "times", "frobenius",
    "product_except", "per_block", "constant", "number", "keeping_constants",
]


def per_block(xp, value, like):
    """A per-block value of shape (b,) shaped to multiply a stack ``like`` (b, ...) block by block
    (``value`` with ``like.ndim - 1`` unit axes); scalars pass through."""
    if is_number(value):  # a host number (under torch.compile maybe a symbolic one, with no attributes)
        return value
    if hasattr(value, "shape") and len(value.shape) == 1:
        return xp.reshape(value, (value.shape[0],) + (1,) * (len(like.shape) - 1))
    return value


def along(xp, diagonal, axis: int, ndim: int):
    """A stack of diagonal factors (b, d) shaped to multiply ``axis`` of a (b, ...) tensor."""
    shape = [1] * ndim
    shape[0], shape[axis] = diagonal.shape
    return xp.reshape(diagonal, tuple(shape))


def is_diagonal(factor) -> bool:
    """A diagonal factor is stored as the (b, d) stack of its diagonals."""
    return factor.ndim == 2


def times_transposed(xp, tensor, factor, axis: int):
    """``T ×_axis Kᵀ``: contract ``axis`` of ``T`` with the first index of ``K`` (diagonal: ``T·k`` along it)."""
    if is_diagonal(factor):
        return tensor * along(xp, factor, axis, len(tensor.shape))
    return mode_product(tensor, factor, axis, transpose=True)


def gram(xp, factor):
    """``KᵀK`` (diagonal: ``k ⊙ k``)."""
    return factor * factor if is_diagonal(factor) else xp.matmul(factor.mT, factor)


def mean_trace(xp, gram):
    """``Tr(A)/d`` of a stack of (b, d, d) matrices; of a diagonal (b, d) its mean."""
    return xp.mean(gram if gram.ndim == 2 else xp.linalg.diagonal(gram), axis=-1)


def unfolding_gram(xp, tensor, axis: int, factor):
    """``Y_(n) Y_(n)ᵀ``, the Gram of the mode-``axis`` unfolding (diagonal ``factor``: its diagonal,
    the sum of ``Y ⊙ Y`` over the other axes)."""
    if not is_diagonal(factor):
        return mode_gram(tensor, axis, batch=1)
    rest = tuple(i for i in range(1, len(tensor.shape)) if i != axis)
    square = tensor * tensor
    return xp.sum(square, axis=rest) if rest else square


def identity(xp, factor, scale: float = 1.0):
    """``scale·I`` in the structure of ``factor`` (diagonal: the number ``scale``); made once per
    size, scale, dtype and device (:func:`constant`)."""
    if is_diagonal(factor):
        return scale * 1.0
    d, dtype = factor.shape[-1], factor.dtype
    make = lambda: scale * xp.eye(d, dtype=dtype, device=placement(xp, factor))  # noqa: E731
    return constant(xp, ("eye", d, scale, dtype), make, factor)


def times(xp, factor, matrix):
    """``K m`` (diagonal: ``k ⊙ m``)."""
    return factor * matrix if is_diagonal(factor) else xp.matmul(factor, matrix)


def frobenius(xp, matrix):
    """``‖m‖_F`` per block (diagonal: the vector norm)."""
    return xp.linalg.vector_norm(matrix, axis=-1) if matrix.ndim == 2 else xp.linalg.matrix_norm(matrix)


def product_except(xp, values, n: int, dtype):
    """``Π_{i≠n} values_i`` in ``dtype`` (the empty product is 1), multiplied left to right."""
    product = None
    for i, value in enumerate(values):
        if i != n:
            value = cast(xp, value, dtype)
            product = value if product is None else product * value
    return 1.0 if product is None else product
