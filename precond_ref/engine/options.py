"""Options the engine resolves for a rule, the same way for every method that has them: the batch
size ``B`` of an update (the root-free methods scale their statistics by it), the dtype of a
rule's state, and a state entry filled with a hyperparameter's value."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .._backend import as_operand, compute_dtype, is_number
from ..transform import check_positive_int

__all__ = ["BATCH_SIZE_HELP", "check_batch_size", "batch_size", "state_dtype", "filled"]

BATCH_SIZE_HELP = (
    "the root-free methods multiply the squared gradient by the batch size B, the number of "
    "examples the loss averages over (B*g*g estimates the per-example second moment; a summed, "
    "not averaged, loss makes it wrong by B**2). Pass batch_size= to the factory or to update"
)


def check_batch_size(value: Any, where: str = "batch_size") -> None:
    """A batch size is ``None`` (given to ``update`` instead), an array (a hyperparameter as
    ``optax.inject_hyperparams`` passes it) or a positive integer."""
    if value is None or hasattr(value, "shape"):
        return
    check_positive_int(where, value)


def batch_size(name: str, factory_value: Any, extra: dict) -> Any:
    """B for this update: the per-call ``batch_size`` (in ``update``'s keyword arguments ``extra``)
    overrides the factory's; neither is an error naming the method ``name``."""
    value = extra.get("batch_size")
    if value is None:
        value = factory_value
    else:
        check_batch_size(value, f"{name}: update's batch_size")
    if value is None:
        raise ValueError(f"{name}: no batch size given; {BATCH_SIZE_HELP}")
    return value


def state_dtype(xp: Any, param_dtype: Any, requested: Any = None, default: Optional[Callable] = None) -> Any:
    """The dtype of a state kept for parameters of ``param_dtype``: the one ``requested``, else
    ``default(xp, param_dtype)`` where a method has one (``None`` from it: none), else the
    parameters' compute dtype (:func:`precond_ref._backend.compute_dtype`: float32 for bf16 and
    fp16). A dtype that is not real floating is an error."""
    dtype = requested
    if dtype is None and default is not None:
        dtype = default(xp, param_dtype)
    if dtype is None:
        dtype = compute_dtype(xp, param_dtype)
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"state/factor dtype must be a real floating dtype, got {dtype}")
    return dtype


def float32(xp: Any, param_dtype: Any) -> Any:
    """float32 whatever the parameters' dtype (a ``default`` of :func:`state_dtype`: the state
    dtype of methods whose authors keep it in float32)."""
    return xp.float32


def filled(xp: Any, shape: tuple, value: Any, dtype: Any, device: Any):
    """An array of ``shape`` whose every entry is the hyperparameter ``value`` (a number, or an
    array as ``optax.inject_hyperparams`` passes it) in ``dtype``."""
    if is_number(value):
        return xp.full(shape, value, dtype=dtype, device=device)
    return xp.ones(shape, dtype=dtype, device=device) * as_operand(xp, value, dtype)
