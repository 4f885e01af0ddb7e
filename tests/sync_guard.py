"""An array namespace that stands for a GPU: it refuses every device-to-host and host-to-device
transfer while armed, so a CPU test proves that ``update`` would run without host synchronisation.

On CUDA (torch, CuPy) a step synchronises the host with the device whenever a device value is
read (``bool(x)``, ``float(x)``, ``int(x)``, ``x.item()``, ``x.tolist()``, indexing with an array
index, ``len`` of a data-dependent shape) and whenever host data is copied into a device array
(``xp.asarray(0.5, device=...)`` is a blocking copy; ``xp.full((), 0.5, ...)`` is a fill kernel).
:class:`GuardedArray` wraps a NumPy array and forwards every array-API operation, but while the
guard is armed each of those transfers raises :class:`HostTransfer` with a stack trace into the
offending line. Python scalars as operands (``x * 0.5``) are fine: a GPU kernel takes them as
arguments.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator

import array_api_compat.numpy as _np_xp
import numpy as np

from precond_ref.tree import tree_map

__all__ = ["GuardedArray", "HostTransfer", "armed", "namespace", "wrap", "unwrap"]


class HostTransfer(AssertionError):
    """A device value was read on the host, or host data was copied to the device, while armed."""


_ARMED = [False]


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """Refuse host transfers inside the block."""
    previous, _ARMED[0] = _ARMED[0], True
    try:
        yield
    finally:
        _ARMED[0] = previous


def _refuse(what: str) -> None:
    if _ARMED[0]:
        raise HostTransfer(f"host synchronisation: {what}")


def _wrap_leaf(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) and not isinstance(value, (np.dtype, type)):
        return GuardedArray(np.asarray(value))
    return value


def wrap(value: Any) -> Any:
    """NumPy arrays (and NumPy scalars, which NumPy returns for 0-D results) become guarded;
    tuples, lists, dicts and named tuples are wrapped element-wise."""
    return tree_map(_wrap_leaf, value)


def unwrap(value: Any) -> Any:
    return tree_map(lambda v: v._array if isinstance(v, GuardedArray) else v, value)


def _contains_guarded(value: Any) -> bool:
    if isinstance(value, GuardedArray):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains_guarded(v) for v in value)
    return False


class _Namespace:
    """The guarded namespace: every function of ``array_api_compat.numpy``, arguments unwrapped
    and results wrapped; ``asarray`` of host data refused while armed."""

    __name__ = "sync_guard"

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in ("linalg", "fft"):
            return _Namespace(attr)
        if isinstance(attr, type) or not callable(attr) or name in ("isdtype", "finfo", "iinfo", "result_type"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return wrap(attr(*unwrap(args), **unwrap(kwargs)))

        return call

    def asarray(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if not _contains_guarded(obj):
            _refuse(f"asarray of host data {type(obj).__name__} (a host-to-device copy; use full)")
        return wrap(self._inner.asarray(unwrap(obj), *args, **kwargs))

    def clip(self, x: Any, /, min: Any = None, max: Any = None) -> Any:
        # array_api_compat's clip on CuPy (its generic form) copies each bound to the device and
        # selects with a boolean mask, whose count the host reads: refused while armed, as there
        # (NumPy's own clip, which the inner namespace runs, reads nothing).
        _refuse("clip (on CuPy array_api_compat's clip indexes with a boolean mask, a device read)")
        return wrap(self._inner.clip(unwrap(x), min=unwrap(min), max=unwrap(max)))


namespace = _Namespace(_np_xp)


def _binary(name: str) -> Any:
    def method(self: "GuardedArray", other: Any) -> Any:
        if not isinstance(other, (GuardedArray, numbers.Number)):
            return NotImplemented
        return wrap(getattr(self._array, name)(unwrap(other)))

    method.__name__ = name
    return method


def _unary(name: str) -> Any:
    def method(self: "GuardedArray") -> Any:
        return wrap(getattr(self._array, name)())

    method.__name__ = name
    return method


class GuardedArray:
    """A NumPy array behind the guarded namespace (see the module docstring)."""

    __slots__ = ("_array",)
    __array_priority__ = 1000  # NumPy defers binary operators to us

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __array_namespace__(self, api_version: Any = None) -> Any:
        return namespace

    @property
    def dtype(self) -> Any:
        return self._array.dtype

    @property
    def shape(self) -> tuple:
        return self._array.shape

    @property
    def ndim(self) -> int:
        return self._array.ndim

    @property
    def size(self) -> int:
        return self._array.size

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def T(self) -> "GuardedArray":
        return GuardedArray(self._array.T)

    @property
    def mT(self) -> "GuardedArray":
        return GuardedArray(np.swapaxes(self._array, -1, -2))

    def to_device(self, device: Any, /, stream: Any = None) -> "GuardedArray":
        return self

    def __getitem__(self, key: Any) -> Any:
        if _contains_guarded(key):
            _refuse("indexing with an array (a data-dependent shape)")
        return wrap(self._array[unwrap(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("the core never writes into an array")

    # reads of device values
    def __bool__(self) -> bool:
        _refuse("bool() of an array")
        return bool(self._array)

    def __float__(self) -> float:
        _refuse("float() of an array")
        return float(self._array)

    def __int__(self) -> int:
        _refuse("int() of an array")
        return int(self._array)

    def __index__(self) -> int:
        _refuse("an array used as an index (__index__)")
        return self._array.__index__()

    def __complex__(self) -> complex:
        _refuse("complex() of an array")
        return complex(self._array)

    def item(self) -> Any:
        _refuse("item()")
        return self._array.item()

    def tolist(self) -> Any:
        _refuse("tolist()")
        return self._array.tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        _refuse("conversion to a host NumPy array (__array__)")
        return np.asarray(self._array, dtype=dtype)

    def __iter__(self) -> Any:
        _refuse("iteration over an array")
        return iter(wrap(list(self._array)))

    def __repr__(self) -> str:
        return f"GuardedArray({self._array!r})"

    def __len__(self) -> int:
        return len(self._array)

    for _name in (
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
        "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__",
        "__rpow__", "__matmul__", "__rmatmul__", "__and__", "__rand__", "__or__", "__ror__",
        "__xor__", "__rxor__", "__lshift__", "__rshift__", "__lt__", "__le__", "__gt__", "__ge__",
        "__eq__", "__ne__",
    ):
        locals()[_name] = _binary(_name)
    for _name in ("__neg__", "__pos__", "__abs__", "__invert__"):
        locals()[_name] = _unary(_name)
    del _name

    __hash__ = None  # type: ignore[assignment]
