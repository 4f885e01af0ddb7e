"""Options the engine resolves for a rule, the same way for every method that has them: the batch
size ``B`` of an update (the root-free methods scale their statistics by it), the dtype of a
rule's state, a rule's hyperparameters as operands of the dtype a group computes in, and a state
entry filled with a hyperparameter's value."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

from .._backend import as_operand, compute_dtype, is_number
from ..transform import check_positive_int

__all__ = [
    "BATCH_SIZE_HELP", "UPDATE_KEYWORDS", "CALL_KEYWORDS", "check_update_keywords", "FLOATING_DTYPE_NAMES", "check_batch_size", "batch_size", "check_dtype", "state_dtype", "operands",
    "filled", "widened",
]

#: The names a dtype option takes as a string: the real floating dtypes of the array API standard
#: and bf16 (torch's and JAX's). A name is resolved in the parameters' namespace at ``init``.
FLOATING_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")

# Names of dtypes that are not real floating (the array API's, and NumPy's spelling of bool): an
# object of one of these is refused at construction, whichever library it comes from.
_OTHER_DTYPE_NAMES = frozenset(
    ["bool", "bool_", "complex64", "complex128"]
    + [f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)]
)

BATCH_SIZE_HELP = (
    "the root-free methods multiply the squared gradient by the batch size B, the number of "
    "examples the loss averages over (B*g*g estimates the per-example second moment; a summed, "
    "not averaged, loss makes it wrong by B**2). Pass batch_size= to the factory or to update"
)


#: The keyword arguments of a transform's ``update`` beyond ``step``, ``due`` and ``gradients_ok``:
#: the per-call inputs some methods read (B of the root-free methods and IF-Shampoo); every method
#: takes them, so that one training loop can pass them to any method.
UPDATE_KEYWORDS = ("batch_size",)

#: The keyword arguments of every transform's ``update`` that say which call it is and what the
#: caller decided (``step``: the call's index; ``due``: the host decisions of periodic work;
#: ``gradients_ok``: the whole tree's skip decision).
CALL_KEYWORDS = ("step", "due", "gradients_ok")


def check_update_keywords(name: str, extra: dict) -> None:
    """``TypeError`` for a keyword of ``update`` that no method reads (a misspelt ``batch_size``
    would otherwise be ignored, and the factory's value or none used), naming the method ``name``
    and the closest valid keyword."""
    for key in extra:
        if key not in UPDATE_KEYWORDS:
            import difflib

            valid = (*CALL_KEYWORDS, *UPDATE_KEYWORDS)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(valid)}"
            raise TypeError(f"{name}: update() got an unexpected keyword argument {key!r}; {hint}")


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


def dtype_name(value: Any) -> str:
    """The name of a dtype object of any array library, read without importing one: a NumPy (or
    CuPy, ml_dtypes) dtype's ``name``, a scalar type's class name (``np.float32``, ``jnp.float32``),
    else the last dotted part of its text (``torch.float32``, ``array_api_strict.float32``)."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(value, type):
        return value.__name__
    return str(value).rsplit(".", 1)[-1]


def check_dtype(name: str, value: Any) -> None:
    """A dtype option's errors at construction, where the parameters' array library is not known yet:
    ``None`` (the method's default), one of :data:`FLOATING_DTYPE_NAMES`, or a dtype object. An
    object is refused here when it is an array (what ``optax.inject_hyperparams`` makes of a
    dtype it takes for a schedule), a Python number or type, or a dtype whose name says it is
    not real floating; whether it is a real floating dtype of the parameters' namespace is
    checked at ``init`` (:func:`state_dtype`)."""
    if value is None:
        return
    if isinstance(value, str):
        if value not in FLOATING_DTYPE_NAMES:
            raise ValueError(f"{name} must be a real floating dtype or one of the names {FLOATING_DTYPE_NAMES}, got {value!r}")
        return
    # NumPy's dtypes have a ``shape`` too (``np.float32`` the class, ``np.dtype("float32")`` no ``dtype``).
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type):
        raise ValueError(
            f"{name} must be a dtype, got an array; under optax.inject_hyperparams pass "
            f"static_args=('{name}',) (a dtype is callable, so it is taken for a schedule)"
        )
    # Identity, not equality: NumPy's float64 dtype compares equal to Python's float.
    python_types = (bool, int, float, complex)
    if isinstance(value, python_types) or any(value is t for t in python_types) or dtype_name(value) in _OTHER_DTYPE_NAMES:
        raise TypeError(f"{name} must be a real floating dtype or one of the names {FLOATING_DTYPE_NAMES}, got {value!r}")


def state_dtype(xp: Any, param_dtype: Any, requested: Any = None, default: Optional[Callable] = None,
                name: str = "state_dtype") -> Any:
    """The dtype of a state kept for parameters of ``param_dtype``: the one ``requested`` (a dtype
    of ``xp``, or its name: ``"float32"`` is ``xp.float32``), else ``default(xp, param_dtype)``
    where a method has one (``None`` from it: none), else the parameters' compute dtype
    (:func:`precond_ref._backend.compute_dtype`: float32 for bf16 and fp16). A name ``xp`` lacks,
    an object that is not a dtype of ``xp``, or a dtype that is not real floating is an error
    naming the option ``name``."""
    dtype = requested
    if isinstance(dtype, str):
        dtype = getattr(xp, requested, None)
        if dtype is None:
            library = getattr(xp, "__name__", xp)
            raise ValueError(f"{name}={requested!r}: the parameters' array library {library} has no {requested} dtype")
    if dtype is None and default is not None:
        dtype = default(xp, param_dtype)
    if dtype is None:
        dtype = compute_dtype(xp, param_dtype)
    try:
        floating = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError) as error:  # not a dtype of xp (e.g. a torch dtype for NumPy arrays)
        raise TypeError(
            f"{name} must be a real floating dtype of the parameters' array library "
            f"{getattr(xp, '__name__', xp)} or its name, got {requested!r} ({error})"
        ) from None
    if not floating:
        raise TypeError(f"{name} must be a real floating dtype, got {dtype}")
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


def operands(xp: Any, config: NamedTuple, dtype: Any, scheduled: tuple = ()) -> NamedTuple:
    """``config`` with every numeric field but those ``scheduled`` as an operand of arithmetic in
    ``dtype`` (:func:`precond_ref._backend.as_operand`: a Python number as itself, an array
    hyperparameter, as ``optax.inject_hyperparams`` passes, as an array of ``dtype``), and so too
    the numeric values of a field that is a dict (Sketchy's options of the FD step); the others as
    they are; ``config`` itself where every such field is a Python number already (its operand).

    Each layout hands a rule's function the configuration made for the dtype of the arrays that
    function computes in: an array hyperparameter of a wider dtype (``optax.inject_hyperparams``
    makes every hyperparameter an array of the widest dtype in the parameter tree) would otherwise
    promote the arithmetic, and with it the state, out of that dtype."""
    changed = {}
    for name, value in zip(config._fields, config):
        if type(value) in _AS_IS or name in scheduled:
            continue
        if isinstance(value, dict):
            entries = {k: v if type(v) in _AS_IS else _operand(xp, v, dtype) for k, v in value.items()}
            if any(entries[k] is not v for k, v in value.items()):
                changed[name] = entries
        else:
            operand = _operand(xp, value, dtype)
            if operand is not value:
                changed[name] = operand
    return config._replace(**changed) if changed else config


def widened(xp: Any, value: Any, dtype: Any) -> Any:
    """A hyperparameter's value at a step (a number, or an array: a scheduled one, as
    ``optax.inject_hyperparams`` or a torch learning-rate tensor passes it) as a factor of a product
    with other hyperparameters that is rounded to ``dtype`` afterwards: an array of fewer bits than
    ``dtype`` cast to ``dtype`` (exactly), anything else as it is. The element-wise runner gives a
    rule's step scalars each hyperparameter so (``engine.elementwise.StepValues.value``) and casts
    the scalars to the state's dtype afterwards (``step_scalars``).

    A Python number is a weak scalar: times a float32 array it is rounded to float32, so the
    product of a float32 learning rate and a Python weight decay, formed before the cast to a
    float64 step, would carry float32's rounding into it. An array of ``dtype`` or wider is kept:
    its product is rounded once, from the wider dtype, as a product of Python numbers is."""
    if is_number(value) or not hasattr(value, "dtype") or xp.finfo(value.dtype).bits >= xp.finfo(dtype).bits:
        return value
    return xp.astype(value, dtype)


#: the types of configuration values that are their own operands (a Python number is a weak
#: scalar; the others are not numeric): tested first, as every step makes the configuration of
#: each dtype it computes in several times
_AS_IS = frozenset({int, float, bool, str, type(None)})


def _operand(xp: Any, value: Any, dtype: Any) -> Any:
    """A numeric value (a number, an array) as an operand of ``dtype``; anything else itself."""
    if is_number(value) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return as_operand(xp, value, dtype)
    return value
