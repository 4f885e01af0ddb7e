"""Backend and compiler shims: the few places where the core asks which array library or compiler runs it.

The bottom layer of :mod:`precond_ref`: it imports only the standard library and ``array_api_compat``
(never a framework: JAX and torch are reached through ``sys.modules`` once their arrays are here),
and every other module of the core may import it. Each helper states its plain meaning first; what
the helper does beyond it (a form a compiler treats better, a branch without a host read) changes
no number. Measurements behind these forms are in ``docs/backends.md`` ("Backend shims").

:mod:`precond_ref.transform` re-exports the public names it used to define here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import sys
from typing import Any, Callable, ContextManager, Iterator, Optional

import array_api_compat
from array_api_compat import device as _compat_device, is_jax_namespace

# array_api_compat's is_torch_namespace / is_numpy_namespace are functools.lru_cache-wrapped:
# dynamo warns of every such call it traces (the core's steps run under torch.compile), so the
# core tests the namespace's name itself, as they do.
_COMPAT_TORCH = f"{array_api_compat.__name__}.torch"
_TORCH_NAMES = frozenset({"torch", _COMPAT_TORCH})
_NUMPY_NAMES = frozenset({"numpy", f"{array_api_compat.__name__}.numpy"})


def is_torch_namespace(xp: Any) -> bool:
    """Whether the namespace (a module) ``xp`` is torch's (torch itself or array_api_compat's wrapper of it)."""
    return xp.__name__ in _TORCH_NAMES


def is_numpy_namespace(xp: Any) -> bool:
    """Whether the namespace (a module) ``xp`` is NumPy's (NumPy itself or array_api_compat's wrapper of it)."""
    return xp.__name__ in _NUMPY_NAMES

Array = Any


def namespace_of(*arrays: Any) -> Any:
    """``array_api_compat.array_namespace(*arrays)``, the namespace of the arrays' library.

    While ``torch.compile`` traces and every array is a torch tensor, array_api_compat's torch
    namespace without array_api_compat's tests of each array's type: the same answer, which dynamo
    would otherwise trace call by call (a dozen calls an array, in every traced step).
    """
    if arrays and torch_compiling():
        torch, wrapped = sys.modules["torch"], sys.modules.get(_COMPAT_TORCH)
        if wrapped is not None and all([isinstance(a, torch.Tensor) for a in arrays]):
            return wrapped
    return array_api_compat.array_namespace(*arrays)


# --------------------------------------------------------------------------------------------
# Hyperparameters: statically known numbers, or arrays (optax.inject_hyperparams, maybe traced).


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number known on the host: a Python or NumPy real, not a bool.

    An array (a 0-D one included, traced or not) is not: no Python branch may read its value.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_zero(value: Any) -> bool:
    """Whether a hyperparameter is statically zero: ``is_number(value) and value == 0``.

    Only a number can be: an array (``optax.inject_hyperparams`` passes hyperparameters as arrays,
    traced under jit) counts as possibly non-zero, so a term or a state entry that it switches off
    is kept, and the state's layout never depends on a traced value.
    """
    return is_number(value) and value == 0


def as_operand(xp: Any, value: Any, dtype: Any) -> Any:
    """A hyperparameter as an operand of arithmetic in ``dtype``.

    A Python number is itself (a weak scalar: it takes the dtype of the array it meets); a NumPy
    scalar is the Python number of equal value (NumPy and JAX would promote a float32 array with
    ``np.float64``; ``astype`` of it fails in torch); an array is ``astype(value, dtype)``. ``xp``
    and ``dtype`` are read for an array only.
    """
    if is_number(value):
        return value if type(value) in (int, float) else float(value)
    return xp.astype(value, dtype)


# --------------------------------------------------------------------------------------------
# Dtypes and devices


def cast(xp: Any, x: Array, dtype: Any) -> Array:
    """``astype(x, dtype)``, but ``x`` itself when it already is of ``dtype``: ``astype`` copies by
    default, a needless pass over the array in every eager step (NumPy, CuPy, torch uncompiled)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def scalar_array(xp: Any, value: Any, dtype: Any, device: Any) -> Array:
    """A Python number or 0-D array (e.g. a scheduled hyperparameter) as a 0-D array of ``dtype``.

    ``full((), value)`` for a number rather than ``asarray``: on a GPU it is a fill kernel, not a
    blocking host copy. On JAX ``device`` is ignored (see :func:`placement`).
    """
    if isinstance(value, numbers.Real):  # Python and NumPy scalars alike
        return xp.full((), float(value), dtype=dtype, device=None if is_jax_namespace(xp) else device)
    return xp.astype(value, dtype)


def array_device(x: Array) -> Any:
    """``array_api_compat.device(x)``, the device ``x`` lives on, with a torch tensor's ``x.device``
    read directly: the generic lookup first tests ``x`` against NumPy, Dask, JAX and sparse
    arrays, and an eager step asks for devices hundreds of times (in torch, where the answer is
    ``x.device`` all the same).

    A JAX array sharded over several devices answers ``None``: its ``device`` is then its
    sharding, which an array of another shape (a 0-D counter, a block's statistic) cannot take;
    made with ``device=None`` the new array stays uncommitted and follows the arrays it meets.
    An uncommitted JAX array (one made during an eager step, bound to no device) answers ``None``
    too: its ``device`` is the default device, and an array made there with ``device=`` would be
    committed to it and then meet a sharded array that spans several devices."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device
    if is_tracer(x):
        # A JAX tracer has no device. Asked for it, a tracer builds its error message from a search
        # of everything traced so far, which a step that groups hundreds of arrays by device repeats
        # for each: tracing then grows with the square of the step's size.
        return None
    device = _compat_device(x)
    if device is None or hasattr(device, "device_set"):  # a JAX Sharding has a device_set
        return None
    jax = sys.modules.get("jax")
    return None if jax is not None and isinstance(x, jax.Array) and not x.committed else device


def placement(xp: Any, x: Array) -> Any:
    """The ``device`` argument for an array made during a step to meet ``x``: ``x``'s device, or
    ``None`` on JAX, where the new array stays uncommitted and follows the arrays it meets (the
    device of a sharded array is a multi-device sharding, which an array of another shape cannot
    take)."""
    return None if is_jax_namespace(xp) else array_device(x)


def index_dtype(xp: Any, x: Array) -> Any:
    """The integer dtype of index arrays made beside ``x``: the namespace's default for indexing
    (int32 on JAX without x64, where asking for int64 would warn and give int32 anyway; int64
    elsewhere), int64 where the namespace does not say."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return xp.int64
    return info().default_dtypes(device=array_device(x))["indexing"]


def scalar_zero(xp: Any, x: Array) -> Array:
    """``zeros((), dtype=x.dtype)`` on ``x``'s device: the operand ``where`` broadcasts
    (``zeros_like`` would fill a whole array first in an eager step)."""
    return xp.zeros((), dtype=x.dtype, device=placement(xp, x))


def float64_where_available(xp: Any, x: Array) -> Any:
    """``xp.float64`` where ``x``'s backend has float64 arithmetic, else ``None`` (JAX without
    x64, where ``astype`` to float64 silently stays float32; torch on MPS, which has no float64)."""
    if is_jax_namespace(xp) and not sys.modules["jax"].config.jax_enable_x64:
        return None
    if getattr(array_device(x), "type", None) == "mps":
        return None
    return xp.float64


def widened_dtype(xp: Any, x: Array) -> Any:
    """``xp.float64`` where a :func:`widening` block of ``x``'s backend computes in float64, else
    ``None``: :func:`float64_where_available`, and also JAX without x64 for an array on a CPU or a
    GPU (a tracer: JAX's default backend), whose XLA computes float64 there once the block enables
    it."""
    wide = float64_where_available(xp, x)
    if wide is not None or not is_jax_namespace(xp):
        return wide
    platform = getattr(array_device(x), "platform", None) or sys.modules["jax"].default_backend()
    return xp.float64 if platform in ("cpu", "gpu", "cuda", "rocm") else None


@contextlib.contextmanager
def widening(xp: Any, x: Array) -> Iterator[Any]:
    """A block that computes in float64 what it widens from ``x``'s dtype: yields
    :func:`widened_dtype`. JAX without x64 has no float64 arrays (``astype`` to float64 silently
    stays float32); there the block enables x64 for itself alone (``jax.enable_x64``: its scoped
    setting, also while ``jax.jit`` traces), so a computation widened and rounded back within it
    (a decomposition, a bias correction's power) gives what the other backends give. What leaves
    the block must be back in ``x``'s dtype."""
    wide = widened_dtype(xp, x)
    if wide is None or not is_jax_namespace(xp) or sys.modules["jax"].config.jax_enable_x64:
        yield wide
        return
    with sys.modules["jax"].enable_x64(True):
        yield wide


def float32_power(xp: Any, base: Any, exponent: Array) -> Array:
    """``float32(float32(base) ** exponent)``: the authors' ``beta ** step`` for their float32 step.

    Backends' float32 ``pow`` differ by ulps (records/backends-measurements.md, AGD), and faithful
    trajectories amplify that; computed in float64 (where the backend has it) and rounded once, the
    result is the float32 power every backend agrees on (JAX without x64 too, within a
    :func:`widening` block; its float32 ``pow`` differs by an ulp for 327 of the steps 1-5000 of
    ``0.99**t`` on XLA's CPU).
    """
    with widening(xp, exponent) as wide:
        wide = wide or xp.float32
        base32 = xp.full((), base, dtype=xp.float32, device=placement(xp, exponent))
        return xp.astype(xp.astype(base32, wide) ** xp.astype(exponent, wide), xp.float32)


def float32_sqrt(xp: Any, x: Array) -> Array:
    """``float32(sqrt(float64(x)))`` for a float32 ``x``: the correctly rounded float32 square root.

    The authors take ``bias_correction2.sqrt()`` of a float32 0-D tensor, IEEE 754's float32 square
    root, which the standard requires to be correctly rounded and which CUDA (the authors' GPUs),
    NumPy and XLA return. torch's eager CPU kernel is not correctly rounded on every CPU:
    sqrt(float32(1 - 0.999^4)) = sqrt(0.0039939284) is 0.06319753 there and 0.06319754 correctly
    rounded. The square root taken in float64 and rounded once to float32 is the correctly rounded
    one on every backend: float64 carries 53 >= 2*24 + 2 bits, for which double rounding of a
    square root is innocuous (Figueroa 1995; records/backends-measurements.md, AGD). JAX without x64
    takes it within a :func:`widening` block; where float64 is missing (torch on MPS) this is the
    backend's float32 sqrt.
    """
    with widening(xp, x) as wide:
        wide = wide or xp.float32
        return xp.astype(xp.sqrt(xp.astype(x, wide)), xp.float32)


def hashable(value: Any) -> Any:
    """``value`` itself where its type is hashable, else a hashable stand-in equal for equal
    values: the name of its type and its ``repr`` (CuPy's ``Device`` is unhashable, and its
    ``repr`` names the device, ``<CUDA Device 0>``). Hashability is read off the type
    (``__hash__ = None``, as ``collections.abc.Hashable`` reads it), not tried with ``hash``,
    which dynamo cannot always trace."""
    if type(value).__hash__ is None:
        return (type(value).__name__, repr(value))
    return value


def device_key(x: Array) -> Any:
    """A hashable stand-in for ``array_device(x)`` (:func:`hashable` of it), for the keys that group
    arrays by device: equal for arrays on one device, different for arrays on different devices.
    A torch tensor's ``x.device`` (hashable) is read directly, as :func:`array_device` reads it: a
    step under ``torch.compile`` traces a key for each operand it groups."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device
    return None if is_tracer(x) else hashable(_compat_device(x))  # a JAX tracer: as array_device


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """float32 for floating dtypes of fewer than 32 bits (bf16, fp16), else ``dtype`` itself."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


# --------------------------------------------------------------------------------------------
# Tracing and compilation


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (a value inside ``jax.jit`` and friends); False without JAX."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def torch_compiling() -> bool:
    """Whether ``torch.compile`` (TorchDynamo) is tracing the current call; False without torch."""
    return "torch" in sys.modules and sys.modules["torch"].compiler.is_compiling()


@contextlib.contextmanager
def _setting(read: Callable, write: Callable, value: Any) -> Iterator[None]:
    """Within it, ``write(value)``; on leaving, ``write`` of what ``read()`` gave before (a context
    variable of the core's, torch's float32 matmul precision)."""
    previous = read()
    write(value)
    try:
        yield
    finally:
        write(previous)


_OWNED_STATE: contextvars.ContextVar[bool] = contextvars.ContextVar("precond_ref_owned_state", default=False)


def owned_state() -> ContextManager[None]:
    """Within it, an ``update`` may write a new state entry over the array of the state it was given
    (:func:`state_owned`): for a caller that owns its state and drops the previous one after the
    step (a torch optimizer, CuPy's captured step), so that a step of a state larger than the free
    memory needs no second copy of it. Outside it the core is pure: ``update`` writes no array it
    was given, and the previous state stays valid."""
    return _setting(_OWNED_STATE.get, _OWNED_STATE.set, True)


def state_owned() -> bool:
    """Whether the current ``update`` may write over the state it was given (:func:`owned_state`)."""
    return _OWNED_STATE.get()


class IdentityDict:
    """A dict keyed by object identity: ``d[k]`` is the value stored under the very object ``k``
    (``is``, not ``==``: arrays compare element-wise, and most do not hash).

    Eagerly a dict by ``id(k)`` that holds ``k`` beside its value, so that no other object takes
    its ``id`` while it is here. Made under ``torch.compile``, whose keys are torch tensors, a dict
    keyed by the tensors themselves: a tensor hashes by its identity, which dynamo traces as the
    identity of the traced tensor (one lookup, where a search of the entries would trace a
    comparison per entry), while ``id`` of a tensor made in the traced function it cannot always
    trace.
    """

    def __init__(self) -> None:
        self._traced: Optional[dict] = {} if torch_compiling() else None
        self._by_id: dict[int, tuple] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        if self._traced is not None:
            return self._traced.get(key, default)
        pair = self._by_id.get(id(key))
        return default if pair is None or pair[0] is not key else pair[1]

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT

    def __len__(self) -> int:
        return len(self._by_id) if self._traced is None else len(self._traced)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._traced is None:
            self._by_id[id(key)] = (key, value)
        else:
            self._traced[key] = value


_ABSENT = object()


# --------------------------------------------------------------------------------------------
# float32 matrix products


#: Our names (torch's) -> JAX's names of the float32 matmul precisions.
JAX_MATMUL_PRECISION = {"highest": "float32", "high": "tensorfloat32", "medium": "bfloat16"}

#: A shared do-nothing context, cheaper than a fresh one per step.
NO_CONTEXT = contextlib.nullcontext()


def float32_matmul_precision(xp: Any, precision: str) -> ContextManager[None]:
    """A context in which float32 matrix products run at ``precision``, whatever the device.

    ``"highest"``: full float32 (what CPUs do); ``"high"``: TF32; ``"medium"``: bf16 products.
    JAX on a GPU defaults to TF32 and torch follows the process-wide
    ``torch.set_float32_matmul_precision``: a reference must not change its answer with the device
    or with a training script's global setting. Under JAX tracing the precision is recorded into
    the traced products; torch's is a process-wide setting, set here around eager calls and by the
    torch adapter around compiled ones. CuPy multiplies float32 at full precision unless
    ``CUPY_TF32=1`` is set by the user.

    Where nothing is to be set (torch already at ``precision``, the usual case, or NumPy/CuPy) the
    context is :data:`NO_CONTEXT`.
    """
    if precision not in JAX_MATMUL_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(map(repr, JAX_MATMUL_PRECISION))}, got {precision!r}")
    if is_jax_namespace(xp):
        return sys.modules["jax"].default_matmul_precision(JAX_MATMUL_PRECISION[precision])
    if is_torch_namespace(xp) and not torch_compiling():
        torch = sys.modules["torch"]
        if torch.get_float32_matmul_precision() != precision:
            return _setting(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, precision)
    return NO_CONTEXT


# --------------------------------------------------------------------------------------------
# Branches


def cond(xp: Any, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
    """``true_fn(*operands) if pred else false_fn(*operands)``, without re-tracing under ``jax.jit``.

    A Python bool (an interval decision made on the host, see
    :meth:`precond_ref.engine.StepContext.every`) branches in Python. An array predicate is a
    ``lax.cond`` under JAX tracing and a ``torch.cond`` under ``torch.compile`` (the frameworks are
    already imported when their arrays are here, so the core does not import them); with concrete
    arrays it is read once on the host, which on a GPU is a synchronisation (an eager ``lax.cond``
    would trace both branches again on every call). Both branches must return arrays of identical
    shapes and dtypes.
    """
    if is_jax_namespace(xp) and is_tracer(pred):
        return sys.modules["jax"].lax.cond(pred, true_fn, false_fn, *operands)
    if torch_compiling() and hasattr(pred, "shape"):
        # torch.cond's branches may not return their operands themselves: copies.
        copied = [lambda *ops, fn=fn: _copies(xp, fn(*ops)) for fn in (true_fn, false_fn)]
        return sys.modules["torch"].cond(pred, *copied, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def iterate(xp: Any, count: int, body: Callable, carry: Any) -> Any:
    """``carry = body(carry)`` ``count`` times (a host count), a fixed-length loop of device work.

    Under ``jax.jit`` a ``lax.fori_loop``, traced once (a Python loop would trace ``count`` copies of
    the body, and XLA's compilation time grows with them); under ``torch.compile`` for a CPU one
    ``while_loop`` of the body, for the same reason (dynamo traces the body once, and TorchInductor
    compiles one body rather than kernels fused from every copy), but not on a GPU, where
    TorchInductor's loop reads its condition on the host at every turn (a synchronisation that a
    captured CUDA step cannot make); elsewhere a Python loop. The same operations on the same values.
    """
    if is_jax_namespace(xp) and any(is_tracer(x) for x in carry):
        return sys.modules["jax"].lax.fori_loop(0, count, lambda _, c: body(c), carry)
    if is_torch_namespace(xp) and torch_compiling() and on_cpu(xp, carry[0]):
        torch = sys.modules["torch"]
        start = torch.zeros((), dtype=torch.int64, device=carry[0].device)
        more, step = (lambda turn, *values: turn < count), (lambda turn, *values: (turn + 1, *body(values)))
        return tuple(torch._higher_order_ops.while_loop(more, step, (start, *carry))[1:])
    for _ in range(count):
        carry = body(carry)
    return carry


def _copies(xp: Any, tree: Any) -> Any:
    """``tree`` with every array copied, in the traversal of :func:`precond_ref.tree.tree_map` (dict
    keys sorted where they sort, so both branches of a ``torch.cond`` return one structure)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        try:
            keys = sorted(tree)
        except TypeError:
            keys = list(tree)
        return {k: _copies(xp, tree[k]) for k in keys}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_copies(xp, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copies(xp, v) for v in tree)
    return xp.asarray(tree, copy=True)


def cond_under_cpu_jit(xp: Any, pred: Array, fast_fn: Callable, safe_fn: Callable, *operands: Any) -> Any:
    """``tuple(where(pred, f, s) for f, s in zip(fast_fn(*operands), safe_fn(*operands)))``: two ways
    to the same arrays (to rounding), the first cheaper but valid only where ``pred`` holds (0-D, or
    one per row of the results, e.g. per matrix of a stack, broadcast against them).

    Under ``jax.jit`` for a CPU, a ``lax.cond`` of a 0-D ``pred``: only the branch taken runs.
    Elsewhere both run and an element-wise selection picks, never a host read of ``pred``: eagerly a read would be a
    synchronisation on a GPU, and XLA's GPU conditional copies its predicate to the host and waits
    for it, once per step (what running both branches costs there is unmeasured). Both branches
    return a tuple of arrays of identical shapes and dtypes.
    """
    if is_jax_namespace(xp) and is_tracer(pred) and pred.ndim == 0 and sys.modules["jax"].default_backend() == "cpu":
        return sys.modules["jax"].lax.cond(pred, fast_fn, safe_fn, *operands)
    return tuple(xp.where(pred, f, s) for f, s in zip(fast_fn(*operands), safe_fn(*operands)))


# --------------------------------------------------------------------------------------------
# The step's selections, in as few operations as each backend allows


def host_bool(xp: Any, x: Array) -> Any:
    """``bool(x)`` of a 0-D array where reading it costs no synchronisation, else ``None``.

    Free to read: a NumPy array, and a torch tensor on the CPU outside ``torch.compile`` (an eager
    CPU kernel has finished when it returns). Never read: a JAX array (traced under ``jax.jit``,
    and eagerly a wait on its asynchronous dispatch), a tensor on a GPU (a synchronisation),
    anything under ``torch.compile`` (a graph break), other namespaces.
    """
    cpu_tensor = is_torch_namespace(xp) and getattr(x.device, "type", None) == "cpu"
    if not torch_compiling() and (is_numpy_namespace(xp) or cpu_tensor):
        return bool(x)
    return None


def is_dense(x: Array) -> bool:
    """Whether ``x`` is laid out in row-major order without gaps (NumPy's and CuPy's
    ``c_contiguous``, torch's ``is_contiguous()``); ``True`` for an array with no such notion.

    A selection ``where(pred, x, y)`` writes a new array, and for an ``x`` of another layout (a
    column slice, a transpose) in another layout than ``x``'s, which the next step's matrix products
    and sums may round differently. A step that drops a selection that would select ``x`` keeps it
    where ``x`` is not dense: the same numbers, bit for bit, in every later step.
    """
    contiguous = getattr(x, "is_contiguous", None)  # torch's; NumPy's and CuPy's in their flags
    if callable(contiguous):
        return bool(contiguous())
    return bool(getattr(getattr(x, "flags", None), "c_contiguous", True))


def select(xp: Any, pred: Array, a: Array, b: Array) -> Array:
    """``where(pred, a, b)`` of arrays ``a`` and ``b``. On torch, for arrays of one dtype, ``torch.where`` itself:
    ``array_api_compat``'s ``where`` first converts an array beside a 0-D one to their common dtype,
    an operation even when that is its own (a dispatch per call in an eager step; under
    ``torch.compile`` a conversion that does nothing, and half a dozen calls for dynamo to trace)."""
    if is_torch_namespace(xp) and a.dtype == b.dtype:
        return sys.modules["torch"].where(pred, a, b)
    return xp.where(pred, a, b)


def matmul(xp: Any, a: Array, b: Array) -> Array:
    """``a @ b``. On torch, for operands of one dtype, ``torch.matmul`` itself: ``array_api_compat``'s
    ``matmul`` first converts both operands to their common dtype, an operation each even when that
    is their own (as :func:`select` for ``where``)."""
    if is_torch_namespace(xp) and a.dtype == b.dtype:
        return sys.modules["torch"].matmul(a, b)
    return xp.matmul(a, b)


def matmul_into(xp: Any, a: Array, b: Array, out: Array) -> None:
    """``out[...] = a @ b`` for an ``out`` that overlaps neither operand (such as a block of rows of a
    larger array). For operands of ``out``'s dtype on NumPy, CuPy and torch (there for operands that
    need no gradient: torch's ``out=`` refuses those), the library's matmul writes the product
    straight into ``out`` (a strided view included: the matrix kernels take its row stride), one
    write of it instead of a new array written, read back and written again by the assignment; the
    same kernel computes it, only its output's place differs. Elsewhere, assignment."""
    if a.dtype == b.dtype == out.dtype:
        if is_torch_namespace(xp):
            torch = sys.modules["torch"]
            if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
                torch.matmul(a, b, out=out)
                return
        elif is_numpy_namespace(xp):
            sys.modules["numpy"].matmul(a, b, out=out)
            return
        elif array_api_compat.is_cupy_array(out):
            sys.modules["cupy"].matmul(a, b, out=out)
            return
    out[...] = matmul(xp, a, b)


def ratio_or_zero(xp: Any, numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator`` where the denominator is positive, else 0: no 0/0 where both
    vanish, and no division by the placeholder of the unselected branch."""
    positive = denominator > 0.0
    return xp.where(positive, numerator / xp.where(positive, denominator, xp.ones_like(denominator)),
                    xp.zeros_like(denominator))


def finite_or_zero(xp: Any, u: Array, zero: Array) -> Array:
    """``where(isfinite(u), u, zero)`` for a 0-D ``zero`` of ``u``'s dtype: the non-finite entries of
    ``u`` set to zero, every other entry (``-0.0`` included) kept.

    Eagerly on torch one ``nan_to_num`` (NaN and both infinities to zero: the same entries) instead
    of two operations. Under ``torch.compile`` ``|u| <= finfo.max`` tests finiteness (false for NaN
    and ±Inf): TorchInductor's CPU code tests ``isfinite`` as ``u == u`` and ``|u| != inf`` with
    mask conversions between them (a cost measured in ``records/backends-measurements.md``).
    """
    if torch_compiling():
        return select(xp, xp.abs(u) <= xp.finfo(u.dtype).max, u, zero)
    if is_torch_namespace(xp):
        return sys.modules["torch"].nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
    return xp.where(xp.isfinite(u), u, zero)


def sums_of_squares(xp: Any, arrays: list) -> Any:
    """``[sum(x * x) for x in arrays]`` for arrays of one dtype and device, or ``None`` where this
    backend has no single operation for it (then the caller sums leaf by leaf).

    Eagerly on torch one ``_foreach_powsum(arrays, 2)``: one dispatch (one multi-tensor kernel on a
    GPU) for all the arrays instead of a product and a sum each. Its summation order is its own,
    so each sum may differ from the leaf-by-leaf one by rounding (the sum of ``n`` squares to
    ``n`` ulps): what the caller compares it with must tolerate that (a threshold far from any
    value met in training, NaN and Inf propagating alike).
    """
    if torch_compiling() or len(arrays) < 2 or not is_torch_namespace(xp):
        return None
    powsum = getattr(sys.modules["torch"], "_foreach_powsum", None)
    return None if powsum is None else list(powsum(arrays, 2))


def vector_norms(xp: Any, arrays: list) -> list:
    """``[xp.linalg.vector_norm(a) for a in arrays]`` (0-D arrays). Eagerly on torch, for at least
    two arrays, one ``_foreach_norm(arrays, 2)``: one dispatch for all (one multi-tensor kernel on
    a GPU). torch's CPU kernel computes each norm as ``linalg.vector_norm`` does (the same numbers);
    a GPU's multi-tensor kernel sums in its own order (each norm within a few ulps)."""
    if not torch_compiling() and len(arrays) > 1 and is_torch_namespace(xp):
        return list(sys.modules["torch"]._foreach_norm(arrays, 2))
    return [xp.linalg.vector_norm(a) for a in arrays]


def host_all_finite(xp: Any, arrays: list) -> Any:
    """``True`` where every entry of every array is surely finite, read on the host where that
    costs no synchronisation and fewer operations than a guard per array; ``False`` where some entry
    may not be; ``None`` where nothing can be read for free.

    Eagerly on torch on the CPU, for arrays of one dtype: one ``_foreach_norm(arrays, 2)`` and a test
    of the stacked norms, a fixed handful of operations whatever the number of arrays. A NaN or ±Inf
    entry makes its array's norm NaN or Inf; so do finite entries whose squares sum past the dtype's
    largest number (``False`` then only sends the caller to its element-wise guard, which keeps every
    finite entry). Not the maximum norm (``inf``): torch's CPU kernel for it is about 20 times slower
    than the 2-norm's (records/backends-measurements.md).
    """
    if torch_compiling() or not is_torch_namespace(xp):
        return None
    torch = sys.modules["torch"]
    arrays = [a for a in arrays if a.numel()]  # an empty array has no largest entry (and no non-finite one)
    if not arrays:
        return True
    if len(arrays) < 2 or any(a.device.type != "cpu" or a.dtype != arrays[0].dtype for a in arrays):
        return None
    return bool(torch.all(torch.isfinite(torch.stack(torch._foreach_norm(arrays, 2)))))


def on_cpu(xp: Any, x: Array) -> bool:
    """Whether ``x`` lives in host memory (a tracer: whether JAX's default backend is the CPU)."""
    dev = array_device(x)
    if is_jax_namespace(xp):  # a tracer's device has no platform: the default backend's
        return (getattr(dev, "platform", None) or sys.modules["jax"].default_backend()) == "cpu"
    kind = getattr(dev, "type", None)  # torch's; NumPy "cpu", array_api_strict CPU_DEVICE; CuPy devices are GPUs
    return kind == "cpu" if isinstance(kind, str) else "cpu" in str(dev).lower()


#: rows summed together first by :func:`sum_across`
ROW_BLOCK = 16


def sum_across(xp: Any, x: Array, axis: int) -> Array:
    """``xp.sum(x, axis=axis)`` of a matrix, or of each matrix of a stack ``(..., m, n)``, in
    another order: column sums (the rows' axis, ``-2``) of at least two blocks of
    :data:`ROW_BLOCK` rows add the rows of each block first.

    TorchInductor's CPU code otherwise walks the matrix in strips of 8 columns from the first row
    to the last, a 4-KiB stride per row; summed in blocks, it reads whole rows
    (``records/backends-measurements.md``, "ASGO and DASGO"). Under ``torch.compile`` the rows past
    the last block are summed from the last block's worth of rows, those already summed replaced
    by zeros: no branch on the row count and no slice that may be empty, so that one graph
    compiled for matrices of every size (``dynamic=True``) serves every row count.
    """
    rows = x.shape[-2] // ROW_BLOCK * ROW_BLOCK
    if axis % x.ndim != x.ndim - 2 or rows < 2 * ROW_BLOCK:
        return xp.sum(x, axis=axis)
    blocks = xp.reshape(x[..., :rows, :], (*x.shape[:-2], rows // ROW_BLOCK, ROW_BLOCK, x.shape[-1]))
    total = xp.sum(xp.sum(blocks, axis=-2), axis=-2)
    if torch_compiling():
        start = x.shape[-2] - ROW_BLOCK
        tail = xp.arange(ROW_BLOCK, dtype=xp.int64, device=placement(xp, x)) >= rows - start
        zeros = xp.zeros_like(x[..., :1, :])
        return total + xp.sum(xp.where(xp.expand_dims(tail, axis=1), x[..., start:, :], zeros), axis=-2)
    return total if rows == x.shape[-2] else total + xp.sum(x[..., rows:, :], axis=-2)


def squared_sums(xp: Any, g: Array, axis: int) -> Array:
    """``Σ_i G_ij²`` (``axis=0`` or ``-2``: ``diag(GᵀG)``; ``axis=1`` or ``-1``: ``diag(GGᵀ)``) of a
    matrix, or of each matrix of a stack ``(..., m, n)`` (negative axes), by :func:`sum_across`.

    On JAX the squares are formed as ``(G/2)·G`` and the sums doubled (exact but for subnormals),
    so that XLA does not share one ``G·G`` with the non-finite check's sum and write it out for
    two CPU reductions (``records/backends-measurements.md``, ASGO and DASGO).
    """
    if is_jax_namespace(xp):
        return sum_across(xp, (g * 0.5) * g, axis) * 2
    return sum_across(xp, g * g, axis)


# --------------------------------------------------------------------------------------------
# Fast forms, each beside its plain form
#
# The forms below compute what their plain form states (a concatenation, a stack, a selection
# per leaf, a value itself) in fewer operations or copies: views of a persistent stack, runs of
# pieces selected at once, slices remembered within a traced step, a per-step value a compiler
# computes once. Each gives the plain form's numbers, bit for bit, and within :func:`plain_forms`
# each takes its plain form (docs/engine.md, "The plain forms"). Forms elsewhere that read the same switch: the joins of
# :func:`precond_ref.engine.joined.leafwise` and :func:`~precond_ref.engine.joined.pack`, the
# joins across shapes of :func:`precond_ref.engine.matrices.matrix_joins`, the torch adapter's
# copies by runs (through :func:`consecutive_runs`).


_PLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("precond_ref_plain_forms", default=False)


def plain_forms(plain: bool = True) -> ContextManager[None]:
    """Within it (``plain=True``), every form of the core that differs from its plain formula takes
    the plain one: a join is ``concat``, a stack ``stack``, a selection one per leaf, leaves run
    one by one, nothing of a step is remembered or viewed. The numbers are the same, bit for bit,
    but for an element-wise method's packed leaves under ``jax.jit``, which XLA compiles as other
    kernels than the leaves alone (within an ulp or so of each result), and for a product BLAS
    may round differently on a view at an offset than on a fresh copy (MBF on torch, within the
    rounding model); only the operations a step issues, and their cost, differ. ``plain=False``
    is the default, the fast forms.

    A context variable: it holds for the thread (or task) that enters it, around a call of a
    transform's ``update``, a torch optimizer's ``step`` or an optax update, eagerly. A step
    compiled by ``torch.compile`` or traced by ``jax.jit`` reads it while it is traced: a step
    traced outside it keeps its fast forms within it, and the other way round, until it is traced
    again.
    """
    return _setting(_PLAIN.get, _PLAIN.set, bool(plain))


def plain() -> bool:
    """Whether the plain forms run (:func:`plain_forms`); under ``torch.compile`` read once while
    the step is traced, as a constant of the traced step (dynamo cannot read a context variable)."""
    return _plain_while_tracing() if torch_compiling() else _PLAIN.get()


def _plain_while_tracing() -> bool:
    return _PLAIN.get()


# What ``torch._dynamo.assume_constant_result`` marks (the core imports no framework): dynamo calls
# the function while it traces and keeps the result as a constant of the traced step.
_plain_while_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


_SLICES: contextvars.ContextVar[Optional["IdentityDict"]] = contextvars.ContextVar("precond_ref_slices", default=None)


def remembered_slices(xp: Any) -> ContextManager[None]:
    """Within it, on JAX (which has no views), the slices along the leading axis that
    :func:`leading_slices` cuts are remembered with the array they were cut from, so that a join of
    consecutive ones (:func:`joined`, :func:`selected_by_runs`) is that array, or one slice of it,
    instead of a concatenation: within one traced step, what a view gives eagerly (a stack a step
    handed back in slices is the stack again where the next operation joins the slices). XLA joins
    slices of one array only where nothing lies between them and their join, and a join of more
    than a few pieces stays unfused, each piece then written out by a kernel of its own. Elsewhere,
    and within :func:`plain_forms`, nothing is remembered. What it saves: ``docs/backends.md``
    ("Backend shims")."""
    if plain() or not is_jax_namespace(xp) or _SLICES.get() is not None:
        return NO_CONTEXT
    return _setting(_SLICES.get, _SLICES.set, IdentityDict())


def remembered() -> Optional["IdentityDict"]:
    """The slices :func:`remembered_slices` remembers, or ``None`` outside it (and while
    ``torch.compile`` traces: dynamo cannot read a context variable)."""
    return None if torch_compiling() or plain() else _SLICES.get()


def leading_slices(a: Array, lengths: Any) -> Any:
    """``a`` cut along its leading axis into consecutive slices of ``lengths``, each remembered
    within :func:`remembered_slices`. Eagerly on torch one ``split`` (views, as slices are) instead
    of one slicing operation per piece (a compiler fuses the slices; NumPy's are free)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor) and not torch_compiling():
        return a.split(list(lengths))
    slices, start, known = [], 0, remembered()
    for length in lengths:
        piece = a[start : start + length, ...]
        if known is not None:
            known[piece] = (a, start, start + length)
        slices.append(piece)
        start += length
    return slices


def leading_rows(xp: Any, a: Array) -> list:
    """``xp.unstack(a)``: the rows ``a[j]`` along the leading axis, each remembered within
    :func:`remembered_slices`, so that a stack of rows of a few arrays (:func:`stacked`) is those
    arrays, joined and gathered from, not a join of one piece each."""
    known = remembered()
    if known is None:
        return list(xp.unstack(a))
    rows = [a[j, ...] for j in range(a.shape[0])]
    for j, row in enumerate(rows):
        known[row] = (a, j, None)
    return rows


def _gathered_rows(xp: Any, arrays: list) -> Optional[Array]:
    """Within :func:`remembered_slices`, ``xp.stack(arrays)`` where every array is a remembered row
    (:func:`leading_rows`): the arrays they are rows of, joined, and one gather of the rows (a slice
    where they are consecutive rows of one array); ``None`` otherwise."""
    where = [remembered().get(a) for a in arrays]
    if any(w is None or w[2] is not None for w in where):
        return None
    parents, offsets = [], IdentityDict()
    for parent, _, _ in where:
        if parent not in offsets:
            offsets[parent] = sum(p.shape[0] for p in parents)
            parents.append(parent)
    if any(p.dtype != parents[0].dtype or tuple(p.shape[1:]) != tuple(parents[0].shape[1:]) for p in parents):
        return None
    whole = joined(xp, parents) if len(parents) > 1 else parents[0]
    index = [offsets.get(parent) + j for parent, j, _ in where]
    if index == list(range(index[0], index[0] + len(index))):
        return whole if len(index) == whole.shape[0] else whole[index[0] : index[0] + len(index), ...]
    return xp.take(whole, xp.asarray(index, dtype=xp.int32), axis=0)


def _slice_runs(arrays: list) -> Optional[list]:
    """Within :func:`remembered_slices`, ``arrays`` as runs: each maximal run of consecutive
    remembered slices of one array (:func:`leading_slices`) as that array or its one slice, each
    other array as itself; ``None`` where no two arrays make such a run (nothing to gain)."""
    known = remembered()
    runs: list = []  # [array, (parent, start, stop) or None]; the array None for a run of two slices or more
    for a in arrays:
        where = known.get(a)
        where = None if where is None or where[2] is None else where  # a row is no slice
        last = runs[-1][1] if runs else None
        if where is not None and last is not None and where[0] is last[0] and where[1] == last[2]:
            runs[-1] = [None, (last[0], last[1], where[2])]
        else:
            runs.append([a, where])
    if len(runs) == len(arrays):
        return None
    for run in runs:
        if run[0] is None:
            parent, start, stop = run[1]
            whole = start == 0 and stop == parent.shape[0]
            run[0] = parent if whole else parent[start:stop, ...]
            if not whole:  # a slice made here, remembered as the pieces were
                known[run[0]] = run[1]
    return [a for a, _ in runs]


def computed_once(xp: Any, value: Any) -> Any:
    """``value`` itself (the same numbers), in a form a compiler computes once per step.

    For a per-step value read by every element of an array: a 0-D value (a bias correction, a
    scheduled rate) or a vector broadcast over a matrix (DASGO's column scale). Eagerly, and for
    anything without a ``shape``, ``value`` passes through. Under ``torch.compile`` or JAX tracing
    it is ``max`` over eight broadcast copies of ``value``: exact (the maximum of equal values is
    that value), and a reduction, which TorchInductor materialises before the loops that read it;
    an element-wise value it would inline into every such loop, recomputing e.g. ``pow(b, t)`` per
    element. Copies by a broadcast, not ``stack`` (which gives Inductor a buffer to allocate on
    every call); eight, because Inductor unrolls a smaller multi-output reduction back into its
    readers (``config.unroll_reductions_threshold``). Within :func:`plain_forms`, ``value``.
    """
    if plain() or not hasattr(value, "shape") or not (is_tracer(value) or torch_compiling()):
        return value
    return xp.max(xp.broadcast_to(value, (_COPIES, *value.shape)), axis=0)


_COPIES = 8




def joined(xp: Any, arrays: Any) -> Array:
    """``xp.concat(arrays, axis=0)``, as a view of the pieces' memory where they lie end to end.

    A step hands each leaf back its slice of a stacked state entry (a view); when the next step
    joins the same slices in the same order, they are consecutive, C-contiguous pieces of one
    allocation, and their join is that memory itself: a view (no copy, no operation), equal to the
    concatenation element for element, so the stack persists across steps. Otherwise (pieces of
    different allocations, with gaps, out of order or overlapping, of different dtypes, not
    contiguous, a torch piece that requires grad or is a subclass such as a DTensor or a
    compiler's fake tensor), and always for JAX, array_api_strict and under ``torch.compile``, the
    concatenation. The view covers exactly the pieces' memory, so writing it writes only them.
    Within :func:`plain_forms`, the concatenation. On JAX, which has no views, within
    :func:`remembered_slices` each run of consecutive slices of one array is that array or its
    one slice, joined with the rest.
    """
    arrays = list(arrays)
    if len(arrays) < 2:
        return xp.concat(arrays, axis=0)
    if remembered() is None:
        view = consecutive_view(arrays, new_axis=False)
        return xp.concat(arrays, axis=0) if view is None else view
    runs = _slice_runs(arrays) or arrays
    return runs[0] if len(runs) == 1 else xp.concat(runs, axis=0)


def pieces(xp: Any, flat: Array, shapes: Any) -> list:
    """``flat`` (1-D) cut into consecutive pieces of ``shapes``, each reshaped to its shape (views
    where the backend has them): the inverse of :func:`joined` of arrays of those shapes flattened."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(xp.reshape(flat[start : start + size], tuple(shape)))
        start += size
    return out


def stacked(xp: Any, arrays: Any) -> Array:
    """``xp.stack(arrays)`` (along a new leading axis), as a view of the pieces' memory where they
    lie end to end (:func:`joined`'s rule; on JAX, remembered rows gathered, :func:`_gathered_rows`);
    within :func:`plain_forms`, and while ``torch.compile`` traces, the stack."""
    arrays = list(arrays)
    if len(arrays) < 2:
        return xp.stack(arrays)
    view = consecutive_view(arrays, new_axis=True) if remembered() is None else _gathered_rows(xp, arrays)
    return xp.stack(arrays) if view is None else view


def consecutive_runs(xp: Any, columns: Any) -> list:
    """The runs ``(start, stop)`` of positions, in order, at which the arrays of every column
    (sequences of one length), flattened, are consecutive pieces of one allocation
    (:func:`consecutive_view`); a position that continues no run is a run of its own."""
    count = len(columns[0])
    if torch_compiling() or not all(_extent(column[0]) is not None for column in columns if count):
        return [(i, i + 1) for i in range(count)]
    # Only a C-contiguous array can lie in a run: flattening another would copy it.
    flat = [[xp.reshape(a, (-1,)) if is_dense(a) else None for a in column] for column in columns]
    runs: list = []
    for i in range(count):  # position i continues the last run where every column's pieces i-1, i lie end to end
        if i and all(f[i - 1] is not None and f[i] is not None and consecutive_view(f[i - 1 : i + 1], new_axis=False)
                     is not None for f in flat):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def selected_by_runs(xp: Any, pred: Array, news: Any, olds: Any) -> list:
    """``[select(xp, pred, new, old) for new, old in zip(news, olds)]``, as one selection for each
    run of ``news`` that are consecutive pieces of one allocation (a stack a step handed back,
    :func:`consecutive_runs`) whose olds are C-contiguous: on the run's news and olds, flattened
    and joined (:func:`joined`: a view where the olds are such a run too, as last step's selection
    leaves them), each pair handed its slice of it, a view in the new array's shape; elsewhere one
    selection per pair (flattening a non-contiguous old would copy it). The same numbers, element for element;
    the selection's result is a stack whose slices the next step joins again without a copy.
    Within :func:`remembered_slices` (JAX), the news that are consecutive slices of one array, in
    whatever order they come, are selected at once likewise: one selection of that array (or its
    slice) and of their olds joined, each handed its slice of the result. Within
    :func:`plain_forms`, and while ``torch.compile`` traces (which has no views of the pieces to
    find runs in, nor slices remembered), one selection per pair: every run is then of one pair."""
    known, out = remembered(), []
    if known is None:  # views: runs of consecutive pieces, flattened and joined
        runs = consecutive_runs(xp, [news])
        if len(runs) == len(news):  # every run of one pair (always while torch.compile traces)
            return [select(xp, pred, new, old) for new, old in zip(news, olds)]
        for start, stop in runs:
            if stop - start == 1 or not all(is_dense(old) for old in olds[start:stop]):
                out += [select(xp, pred, new, old) for new, old in zip(news[start:stop], olds[start:stop])]
                continue
            flat = [joined(xp, [xp.reshape(a, (-1,)) for a in side[start:stop]]) for side in (news, olds)]
            out += pieces(xp, select(xp, pred, *flat), [new.shape for new in news[start:stop]])
        return out
    where = [known.get(new) for new in news]
    where = [None if w is None or w[2] is None else w for w in where]  # a row is no slice
    rank = IdentityDict()  # the arrays the slices were cut from, numbered in order of first appearance
    for w in where:
        if w is not None and w[0] not in rank:
            rank[w[0]] = len(rank)
    runs: list = []  # runs of consecutive slices of one array, each a list of (its number, start, stop, position)
    for k, start, stop, i in sorted((rank.get(w[0]), w[1], w[2], i) for i, w in enumerate(where) if w is not None):
        if runs and runs[-1][-1][0] == k and runs[-1][-1][2] == start:
            runs[-1].append((k, start, stop, i))
        else:
            runs.append([(k, start, stop, i)])
    out = [None] * len(news)
    for ids in ([i for *_, i in run] for run in runs if len(run) > 1):
        whole = select(xp, pred, joined(xp, [news[i] for i in ids]), joined(xp, [olds[i] for i in ids]))
        for i, piece in zip(ids, leading_slices(whole, [news[i].shape[0] for i in ids])):
            out[i] = piece
    return [select(xp, pred, new, old) if o is None else o for new, old, o in zip(news, olds, out)]


def consecutive_view(arrays: list, new_axis: bool) -> Optional[Array]:
    """The C-contiguous array of their stack (``new_axis``: pieces of one shape) or concatenation
    along axis 0 over the memory of ``arrays`` when they are consecutive, non-empty, C-contiguous
    pieces of one allocation, of one dtype and one exact array type (torch's ``Tensor``, NumPy's or
    CuPy's ``ndarray``; a torch piece that requires grad is none); ``None`` otherwise, within
    :func:`plain_forms` and while ``torch.compile`` traces (whose tensors are no views of one
    allocation)."""
    first = arrays[0]
    where = None if plain() or torch_compiling() else _extent(first)
    rest = tuple(first.shape) if new_axis else tuple(first.shape[1:])
    if where is None or where[1] is None or (len(first.shape) == 0 and not new_axis) or any(
            type(a) is not type(first) or tuple(a.shape if new_axis else a.shape[1:]) != rest for a in arrays):
        return None  # (an allocation of None: an array that is no view of another)
    kind, owner, start, _ = where
    end = start
    for a in arrays:
        _, base, begins, ends = _extent(a)
        if (base is not owner or begins != end or ends == end or a.dtype != first.dtype or not is_dense(a)
                or getattr(a, "requires_grad", False)):
            return None
        end = ends
    shape = (len(arrays), *rest) if new_axis else (sum(a.shape[0] for a in arrays), *rest)
    if kind == "numpy":
        if type(owner) is not type(first) or not owner.flags.c_contiguous:
            return None
        view = type(first)(shape, dtype=first.dtype, buffer=owner, offset=start - owner.__array_interface__["data"][0])
        view.flags.writeable = first.flags.writeable
        return view
    if kind == "torch":
        return first.as_strided(shape, tuple(math.prod(shape[i + 1:]) for i in range(len(shape))), start)  # C order
    return type(first)(shape, dtype=first.dtype, memptr=first.data)


def _extent(x: Array) -> Optional[tuple]:
    """``(library, allocation, start, end)`` of ``x`` in its memory, for the exact array types of
    :func:`consecutive_view` (``None`` for another): NumPy points every view at the array that owns
    the memory (``base``) and counts addresses in bytes; torch keeps the allocation's tensor as every
    view's ``_base`` and counts storage offsets in elements; CuPy points at its memory (``data.mem``),
    in bytes."""
    kind, np, torch, cp = type(x), sys.modules.get("numpy"), sys.modules.get("torch"), sys.modules.get("cupy")
    if np is not None and kind is np.ndarray:
        start = x.__array_interface__["data"][0]
        return "numpy", x.base, start, start + x.nbytes
    if torch is not None and kind is torch.Tensor:
        return "torch", x._base, x.storage_offset(), x.storage_offset() + x.numel()
    if cp is not None and kind is cp.ndarray:
        return "cupy", x.data.mem, x.data.ptr, x.data.ptr + x.nbytes
    return None


# --------------------------------------------------------------------------------------------
# Constants a step makes once, kept by the transform that made them


_KEPT: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("precond_ref_constants", default=None)


def keeping_constants(kept: Optional[dict]) -> ContextManager[None]:
    """Within it, :func:`constant` keeps the arrays it makes in ``kept`` and finds them there on
    later calls: ``kept`` is a transform's own (made with it, dropped with it), so that nothing a
    step makes outlives the optimizer. Nothing is set while ``torch.compile`` traces (dynamo cannot
    set a context variable; :func:`constant` makes its arrays for the traced step then)."""
    return NO_CONTEXT if torch_compiling() else _setting(_KEPT.get, _KEPT.set, kept)


def constant(xp, key, make, like):
    """``make()``, an array that depends on nothing but ``key`` and ``like``'s namespace and device
    (an identity, an index array), made once per transform and kept with it
    (:func:`keeping_constants`): made anew, it is a kernel of every eager step (from host data on
    an accelerator, a copy the step waits for). Outside a transform's ``init`` and ``update`` it is
    made anew. Under a compiler it is made anew for the traced step: under ``torch.compile``
    traced; under ``jax.jit`` evaluated while tracing (``jax.ensure_compile_time_eval``), so that
    the compiled step holds it as a literal: XLA does not fold a constant computed from ``iota``,
    and the step would compute it, a kernel per piece of it."""
    if is_tracer(like):
        with sys.modules["jax"].ensure_compile_time_eval():
            return make()
    kept = None if torch_compiling() else _KEPT.get()
    if kept is None:
        return make()
    # The maker's code (its definition in the source, not the closure) is part of the key: two callers
    # that happen to choose equal keys (an ``("eye", 2, 1.0, dtype)`` and an ``("eye", 2, 1, dtype)``)
    # never get each other's array.
    full_key = (xp.__name__, device_key(like), getattr(make, "__code__", make), key)
    if full_key not in kept:
        kept[full_key] = make()
    return kept[full_key]


def number(xp, value: float, like):
    """``value`` as a 0-D array of ``like``'s dtype and device, made once (:func:`constant`): a
    number a selection broadcasts, not a new array of the operands' shape each step; filled on the
    device (no host data copied). A ``value`` that is an array (a hyperparameter as
    ``optax.inject_hyperparams`` passes it, a NumPy 0-D array) has no value to key the kept
    constant by: it is cast to ``like``'s dtype (:func:`as_operand`) on every call."""
    if not is_number(value):
        return as_operand(xp, value, like.dtype)
    make = lambda: xp.full((), value, dtype=like.dtype, device=placement(xp, like))  # noqa: E731
    return constant(xp, ("number", value, like.dtype), make, like)


def clip(xp, x, low: float, high: float):
    """``x`` bounded to ``[low, high]``, as ``minimum(maximum(x, low), high)`` against 0-D numbers:
    ``array_api_compat``'s ``clip`` on CuPy selects with a boolean mask, whose count it reads on the
    host (no CUDA-graph capture, a wait for the device)."""
    return xp.minimum(xp.maximum(x, number(xp, low, x)), number(xp, high, x))
