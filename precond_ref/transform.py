"""The core contract: the :class:`Transform` type, per-group method assembly, schedules, validation.

Every method in :mod:`precond_ref.methods` is built by :func:`build_transform` from two pure
functions on one *group* of leaves (a single parameter, or a weight with its bias):

``init_group(leaves, paths, xp) -> dict[str, array]`` and
``update_group(grads, state, params, ctx) -> (updates, new_state)`` (or ``update_groups``, the same
over all groups of a call at once, for a method that stacks equal-shape work across groups).

:func:`build_transform` maps them over a tree and owns what every method shares: the step counter,
the non-finite-gradient policy (README of the specs, rule 6), structure/shape/dtype checks that name
the offending leaf, casting updates to the parameter dtype, and the guard that a state array never
silently changes shape or dtype.

The state is a :class:`PrecondState` of arrays only (no Python scalars), so it is a JAX pytree that
``jax.jit`` can carry, and its per-group dictionaries map one-to-one onto a torch ``state_dict``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Hashable, Iterable, NamedTuple, Optional, Sequence, Union

from array_api_compat import array_namespace, is_jax_namespace

from ._backend import (
    IdentityDict,
    JAX_MATMUL_PRECISION as _JAX_PRECISION,
    NO_CONTEXT as _NO_CONTEXT,
    cast,
    compute_dtype,
    computed_once,
    cond,
    device_key as _device_key,
    hashable as _hashable,
    cond_under_cpu_jit,
    float32_matmul_precision,
    float64_where_available,
    finite_or_zero,
    host_all_finite,
    host_bool,
    is_dense,
    as_operand,
    array_device,
    is_number,
    is_tracer as _is_tracer,
    is_zero,
    placement,
    scalar_array,
    scalar_zero,
    select,
    sums_of_squares,
    torch_compiling as _torch_compiling,
)
from .blocking import stack, unstack
from .tree import Path, path_str, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "Transform",
    "PrecondState",
    "LeafGroup",
    "StepContext",
    "Schedule",
    "build_transform",
    "apply_updates",
    "schedule_value",
    "compute_dtype",
    "float64_where_available",
    "scalar_array",
    "cast",
    "scalar_zero",
    "placement",
    "computed_once",
    "is_zero",
    "is_due",
    "gradient_ok",
    "OVERFLOW_MARGIN",
    "Interval",
    "float32_matmul_precision",
    "cond",
    "cond_under_cpu_jit",
    "singleton_groups",
    "weight_bias_groups",
    "missing_members",
    "check_interval",
    "check_positive",
    "check_nonnegative",
    "check_unit_interval",
    "check_choice",
    "check_positive_int",
    "check_learning_rate",
    "check_bool",
]

Array = Any
Schedule = Callable[[Array], Any]
ScalarOrSchedule = Union[float, Schedule]


def _nothing_due(step: int) -> tuple[bool, ...]:
    return ()


def _each_leaf_alone(paths: Sequence[Any], leaves: Sequence[Any]) -> list["LeafGroup"]:
    return singleton_groups(paths, leaves)


class Transform(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``updates, state = update(grads, state, params)``.

    ``updates`` are *added* to the parameters (learning rate and sign included), as in optax.
    Methods that need more than gradients take it as keyword arguments of ``update``
    (e.g. ``batch_size=`` for the root-free methods).

    Methods with periodic work (a root every ``precondition_every`` steps, ...) decide on which
    call it runs from the number of calls made before (skipped non-finite steps included). Given
    ``update(..., step=i)`` with ``i`` that number as a Python int, the decision is made on the
    host: no device value is read, which keeps a GPU step free of host synchronisations. Without
    it, the decision reads the state's counters (a ``lax.cond`` under ``jax.jit``; a device read
    elsewhere). ``due(i)`` returns those host decisions as a tuple of bools, which a compiled caller
    passes as ``update(..., due=due(i))`` so that the compiled code depends on them alone.

    ``group_leaves(paths, leaves)`` gives the groups of leaves the method treats as one block (a
    weight with its bias for MBF and IF-Shampoo's ``grouping="weight_bias"``), for an adapter that
    must apply :func:`missing_members`.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    due: Callable[[int], tuple[bool, ...]] = _nothing_due
    #: The float32 matmul precision ``update`` runs at (see :func:`float32_matmul_precision`).
    matmul_precision: str = "highest"
    group_leaves: Callable[[Sequence[Any], Sequence[Any]], list["LeafGroup"]] = _each_leaf_alone


class PrecondState(NamedTuple):
    """State of every method.

    Attributes
    ----------
    count:
        0-D int32 array, the number of updates applied (skipped non-finite steps excluded).
    nonfinite_count:
        0-D int32 array, the number of updates skipped because a gradient was not finite.
    groups:
        ``{group key: {name: array}}``; the key is the path string of the group's first leaf.
    """

    count: Array
    nonfinite_count: Array
    groups: dict[str, dict[str, Array]]


class LeafGroup(NamedTuple):
    """Leaves that one method treats as one block (usually a single parameter)."""

    key: str
    indices: tuple[int, ...]
    paths: tuple[Path, ...]


Interval = Union[int, Callable[[Any], Any]]


def is_due(interval: Interval, calls: Any) -> Any:
    """Whether periodic work with this interval runs on the call numbered ``calls`` (0-based).

    ``calls % interval == 0``, so the first call runs it; a callable interval is a predicate
    ``calls -> bool``. ``calls`` is a Python int (host decision, a Python bool) or a 0-D integer
    array (a 0-D bool array); predicates must accept both. An interval given as a 0-D integer
    array (``optax.inject_hyperparams`` passes one, traced under ``jax.jit``) gives a 0-D bool
    array whatever ``calls`` is, never a host read: :func:`cond` then selects on the device.
    """
    if callable(interval):
        return interval(calls)
    if hasattr(interval, "shape"):
        return calls % interval == 0
    if interval == 1:
        return True  # statically: no branch, whatever calls is
    return calls % interval == 0


class StepContext(NamedTuple):
    """What ``update_group`` receives besides arrays.

    ``count`` is the number of updates applied *before* this one (0 on the first update), as a
    0-D int32 array; ``extra`` holds the keyword arguments given to ``update``; ``paths`` are the
    tree paths of the group's leaves (for layout rules that depend on names, such as Flax's
    out-last ``kernel``). ``calls`` counts the calls before this one, skipped steps included: a
    Python int when the caller passed ``step=``, else a 0-D int32 array. ``due`` holds the host
    decisions a compiled caller passed (``{interval: bool}``), or ``None``. ``ok`` is the step's
    0-D bool skip predicate (``None`` when nothing is skipped), ``settled`` the entries
    :meth:`unless_skipped` already selected (an :class:`IdentityDict` of them), and ``shared`` the values :meth:`once`
    computed for this update (one dict for all its groups). ``applied`` is ``True`` when the step
    is known on the host not to be skipped (``ok`` was read where that costs no synchronisation):
    selections by ``ok`` are then skipped, but for an array that is not dense (see
    :func:`is_dense`), whose selection would lay it out anew.
    """

    xp: Any
    count: Array
    extra: dict[str, Any]
    paths: tuple[Path, ...] = ()
    calls: Any = None
    due: Any = None
    ok: Any = None
    settled: Optional[IdentityDict] = None
    shared: Optional[dict] = None
    applied: bool = False

    def once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, evaluated once per update for all groups that ask with an equal ``key``.

        For per-step values that do not depend on a group's arrays (a bias correction, the
        learning rate as a 0-D array of a dtype on a device): every group of a model would
        otherwise compute its own copy, a few 0-D operations each (kernel launches on a GPU, graph
        nodes for a compiler to trace). ``key`` names the value and everything it depends on
        besides the step's hyperparameters (which one transform's groups share), e.g. dtype and
        device; an element of ``key`` that is unhashable (CuPy's device) enters as its
        :func:`~precond_ref._backend.hashable` stand-in.
        """
        if self.shared is None:
            return compute()
        key = tuple([_hashable(k) for k in key])
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    def scalar(self, name: str, hyperparameter: ScalarOrSchedule, dtype: Any, device: Any) -> Array:
        """Hyperparameter ``name`` at this step as a 0-D array of ``dtype`` on ``device``, made
        once per update (:meth:`once`)."""
        return self.once((name, dtype, device), lambda: scalar_array(self.xp, self.value(hyperparameter), dtype, device))

    def value(self, hyperparameter: ScalarOrSchedule) -> Any:
        """A hyperparameter at this step (constants pass through; schedules get ``count``)."""
        return schedule_value(hyperparameter, self.count)

    def every(self, interval: Interval) -> Any:
        """Does the periodic work with this interval run on this call? (see :func:`is_due`).

        A Python bool when the call number is known on the host (``update(..., step=)`` or
        ``due=``), so that :func:`cond` branches without reading the device; a 0-D bool array
        otherwise. The interval must be one the method declared to :func:`build_transform`.
        """
        if self.due is not None:
            for declared, decision in self.due:
                if is_number(declared) != is_number(interval):
                    continue  # never `is` between a number and a function: dynamo < 2.13 cannot trace it
                if declared == interval if is_number(declared) else declared is interval:
                    return decision
            raise ValueError(f"interval {interval!r} was not declared to build_transform(intervals=...)")
        return is_due(interval, self.calls)

    def unless_skipped(self, new: Array, old: Array) -> Array:
        """A state entry after this step: ``new``, or ``old`` if the step is skipped (non-finite rule).

        :func:`build_transform` makes this selection for every entry a method returns. A method
        that forms its update from new state entries selects them here first and forms the update
        from the result: a compiler then reads the stored entry instead of recomputing it from the
        old one in the parameters' loop, which on XLA's CPU backend copies every donated state array
        (measured in ``docs/backends.md``). The transform does not select such an entry again.
        """
        if self.ok is None or (self.applied and is_dense(new)):
            return new
        selected = select(self.xp, self.ok, new, old)
        self.settled[selected] = True
        return selected


def settle_pieces(ctx: StepContext, whole: Array, pieces: Sequence[Array]) -> Sequence[Array]:
    """``pieces`` (the slices of ``whole`` a method hands back to its leaves), marked as selected by
    the non-finite rule when ``whole`` was (:meth:`StepContext.unless_skipped`): a slice of a
    selection is the selection of the slice, so the transform does not select each piece again.
    A method that stacks its leaves' state then makes one selection per stack, not one per leaf."""
    if ctx.settled is not None and whole in ctx.settled:
        for piece in pieces:
            ctx.settled[piece] = True
    return pieces


def leafwise(
    xp: Any, fn: Callable[..., Any], *operands: Sequence[Array], zeros: Optional[Sequence[Array]] = None,
    ctx: Optional[StepContext] = None,
) -> list[Any]:
    """``[fn(*args) for args in zip(*operands)]`` for an element-wise ``fn`` (a selection, a finite
    test, a momentum step): each of ``operands`` holds one array per leaf, of the leaf's shape;
    with ``zeros`` (each leaf's 0-D zero of the dtype it computes in) ``fn`` also gets the leaf's
    zero, last. ``fn`` returns an array or a tuple of arrays of the leaf's shape. With ``ctx``, a
    leaf's part of a result ``fn`` selected (:meth:`StepContext.unless_skipped`) counts as
    selected too (:func:`settle_pieces`).

    Eagerly outside JAX, on the leaves of one layout (each operand's dtype and device) joined end
    to end: each leaf's operands flattened, :func:`precond_ref.blocking.stack` (one ``fn`` call per
    join, with its first leaf's zero), each leaf handed its slices in its own shape. An eager call
    is a kernel the host issues: on a GPU, where a step's skip predicate cannot be read on the host
    and every leaf is selected, that is three calls for all the leaves instead of three per leaf.
    On a CPU a leaf already large stays alone (blocking's policy: a copy costs a CPU more than a
    call). Under a compiler (``torch.compile``, JAX) leaf by leaf, which it fuses. The numbers are
    the same either way.
    """
    count = len(operands[0])
    if count < 2 or _torch_compiling() or is_jax_namespace(xp):
        return [fn(*args) for args in zip(*operands, *(() if zeros is None else (zeros,)))]
    tupled = []

    def joined(*arrays: Array, first: int) -> tuple:
        out = fn(*arrays) if zeros is None else fn(*arrays, zeros[first])
        tupled.append(isinstance(out, tuple))
        return out if tupled[-1] else (out,)

    members = [tuple(xp.reshape(values[i], (-1,)) for values in operands) for i in range(count)]
    stacks = stack(xp, members, labels=None if zeros is None else [(z.dtype, _device_key(z)) for z in zeros])
    computed = [joined(*s.operands, first=s.indices[0]) for s in stacks]
    outs = unstack(stacks, computed, count)
    results = [tuple(xp.reshape(a, tuple(leaf.shape)) for a in out) for out, leaf in zip(outs, operands[0])]
    if ctx is not None and ctx.settled:  # nothing selected yet this step (a step read as finite): nothing to mark
        for s, wholes in zip(stacks, computed):
            for k, whole in enumerate(wholes):
                settle_pieces(ctx, whole, [results[i][k] for i in s.indices])
    return results if tupled[0] else [out for (out,) in results]


def schedule_value(hyperparameter: ScalarOrSchedule, count: Array) -> Any:
    """Evaluate a constant-or-schedule hyperparameter at ``count``.

    A number comes back as :func:`as_operand` makes it (a NumPy scalar as a Python float: as an
    operand it would try to absorb arrays of other namespaces, ``np.float64(0.1) * x`` fails for an
    ``array_api_strict`` array); an array as it is.
    """
    value = hyperparameter(count) if callable(hyperparameter) else hyperparameter
    return as_operand(None, value, None) if is_number(value) else value


def singleton_groups(paths: Sequence[Path], leaves: Sequence[Array]) -> list[LeafGroup]:
    """The default grouping: every leaf is its own block."""
    return [LeafGroup(path_str(p), (i,), (p,)) for i, p in enumerate(paths)]


def weight_bias_groups(
    paths: Sequence[Path], leaves: Sequence[Array], *, kernel_out_last: bool = True
) -> list[LeafGroup]:
    """Pair each 2-D ``weight`` (out-first) or ``kernel`` (out-last) with its sibling ``bias``.

    The pairing rule of specs README section 5, shared by the methods that treat a layer's
    weight and bias as one block (MBF's homogeneous column, IF-Shampoo's ``grouping="weight_bias"``).
    A sibling ``bias`` is paired when it is 1-D with length equal to the weight's output size
    (``weight.shape[0]``; ``kernel.shape[-1]`` for Flax's out-last ``kernel``); every other leaf is
    a group of its own. Group keys are the path strings of the weights; groups are ordered by the
    position of their first member. ``kernel_out_last=False`` reads ``kernel`` leaves as out-first
    (for a caller that has already canonicalised them).
    """
    index = {tuple(path): i for i, path in enumerate(paths)}
    bias_of: dict[int, int] = {}
    for i, path in enumerate(paths):
        if not path or path[-1] not in ("weight", "kernel") or len(leaves[i].shape) != 2:
            continue
        j = index.get(tuple(path[:-1]) + ("bias",))
        if j is None or len(leaves[j].shape) != 1:
            continue
        out_last = kernel_out_last and path[-1] == "kernel"
        if leaves[j].shape[0] == leaves[i].shape[-1 if out_last else 0]:
            bias_of[i] = j
    paired = set(bias_of.values())
    groups = []
    for i, path in enumerate(paths):
        if i in paired:
            continue
        if i in bias_of:
            j = bias_of[i]
            groups.append(LeafGroup(path_str(path), (i, j), (path, paths[j])))
        else:
            groups.append(LeafGroup(path_str(path), (i,), (path,)))
    return groups


def missing_members(groups: Sequence[LeafGroup], present: Sequence[bool]) -> list[int]:
    """The leaves without a gradient that share a group with a leaf that has one.

    The rule for a partial gradient of a multi-leaf group (in torch, a weight whose bias has no
    gradient, or the reverse): such a leaf takes part in its group's step with a zero gradient and
    is left unchanged (its update is dropped and its own step count is not advanced), so that the
    group keeps one state and one step count; at the next step where both have gradients they are
    stepped together again. ``present[i]`` says whether leaf ``i`` has a gradient. A JAX or NumPy
    gradient tree has every leaf, so only the torch adapter meets the case.
    """
    return [i for g in groups if any(present[j] for j in g.indices) for i in g.indices if not present[i]]


# --------------------------------------------------------------------------------------------
# Hyperparameter validation: a bad value raises ValueError naming the argument and the range.
# Values that are arrays (optax.inject_hyperparams passes them, possibly traced) are not checked.


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_closed: bool = True,
    high_closed: bool = False,
) -> None:
    """``value`` in the interval between ``low`` and ``high`` (closed ends as flagged)."""
    if isinstance(value, bool) or (not is_number(value) and not hasattr(value, "shape")):
        _fail(name, value, "a real number")
    if not is_number(value):
        return
    ok = (value >= low if low_closed else value > low) and (value <= high if high_closed else value < high)
    if not ok or math.isnan(value):
        lo = "[" if low_closed else "("
        hi = "]" if high_closed else ")"
        _fail(name, value, f"in {lo}{low}, {high}{hi}")


def check_positive(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, math.inf, low_closed=False)


def check_nonnegative(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, math.inf)


def check_unit_interval(name: str, value: Any) -> None:
    """A decay or momentum coefficient in [0, 1)."""
    check_interval(name, value, 0.0, 1.0)


def check_learning_rate(name: str, value: Any) -> None:
    """A non-negative number or a schedule ``count -> value``.

    Zero is allowed, as in ``torch.optim``: schedulers such as ``CosineAnnealingLR(eta_min=0)``
    reach it, and the step is then zero (state statistics still advance, as in Adam).
    """
    if not callable(value):
        check_nonnegative(name, value)


def check_positive_int(name: str, value: Any, *, allow_callable: bool = False) -> None:
    if allow_callable and callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        extra = " or a callable count -> bool" if allow_callable else ""
        _fail(name, value, f"an integer >= 1{extra}")


def check_choice(name: str, value: Any, choices: Iterable[Hashable]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


# --------------------------------------------------------------------------------------------


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf-wise, each result in its parameter's dtype."""

    def add(p: Array, u: Array) -> Array:
        xp = array_namespace(p, u)
        return p + (u if u.dtype == p.dtype else xp.astype(u, p.dtype))

    return tree_map(add, params, updates)


def _check_leaves(leaves: Sequence[Array], paths: Sequence[Path], what: str) -> Any:
    if not leaves:
        raise ValueError(f"{what} has no array leaves")
    try:
        xp = array_namespace(*leaves)
    except TypeError as err:
        raise TypeError(f"{what}: every leaf must be an array of one namespace ({err})") from None
    for path, leaf in zip(paths, leaves):
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"{what} leaf {path_str(path)!r} has dtype {leaf.dtype}; only real floating dtypes "
                "are supported (mask integer, boolean and complex leaves out)"
            )
    return xp


#: A gradient whose squared norm reaches this fraction of the largest number of its compute dtype
#: is treated like a non-finite one: every statistic built from products of gradient entries
#: (squares, outer products, Gram matrices, sums over the tensor) and scaled by up to 2^32 (a batch
#: size, a 1/damping) then stays finite. ‖g‖ ≥ 2.8e14 in float32, 6e149 in float64: a gradient
#: no training produces, whose squares would overflow a float32 statistic already at 1.8e19.
OVERFLOW_MARGIN = 2.0**-32


def gradient_ok(xp: Any, leaves: Sequence[Array]) -> Array:
    """0-D bool array: every gradient leaf is finite with a squared norm below the overflow margin.

    One sum of squares per leaf (in the compute dtype): NaN or Inf make it NaN or Inf, and a
    comparison with NaN is false; a compiler fuses it into one pass over each gradient, the only
    reduction the step's skip decision waits for.
    """
    wides: dict[Any, list[Array]] = {}
    for leaf in leaves:
        dtype = compute_dtype(xp, leaf.dtype)
        wides.setdefault(_dtype_and_device(leaf, dtype), []).append(cast(xp, leaf, dtype))
    sums: dict[Any, list[Array]] = {}
    for key, arrays in wides.items():
        together = sums_of_squares(xp, arrays)  # one operation for all, where the backend has one
        sums[key] = together if together is not None else [_sum_of_squares(xp, x) for x in arrays]
    # One comparison per dtype and device, not per leaf: the 0-D operations of a step are kernel
    # launches on a GPU, and a model has dozens of small leaves.
    ok = None
    for (dtype, _), values in sums.items():
        limit = xp.finfo(dtype).max * OVERFLOW_MARGIN
        group_ok = values[0] < limit if len(values) == 1 else xp.all(xp.stack(values) < limit)
        ok = group_ok if ok is None else xp.logical_and(ok, group_ok)
    return ok


def _sum_of_squares(xp: Any, x: Array) -> Array:
    """``Σ x²``; under ``torch.compile`` summed along the rows first: the same sum in another order.

    TorchInductor's CPU code sums a whole tensor in one loop that carries its partial sum through
    memory (cascade summation), slower than the contiguous row sums (measured in
    ``docs/backends.md``, "The contract's step"). The trailing axes are merged, not split: rows
    that cut across the tensor's own rows make it slower still. Eagerly the two sums would be two
    operations (kernel launches on a GPU) where one does; XLA gains nothing.
    """
    square = x * x
    if x.ndim < 2 or not _torch_compiling():
        return xp.sum(square)
    return xp.sum(xp.sum(xp.reshape(square, (x.shape[0], math.prod(x.shape[1:]))), axis=-1))


def _dtype_and_device(leaf: Array, dtype: Any) -> tuple:
    """A key grouping leaves whose 0-D results can be stacked: ``dtype`` and the leaf's device."""
    return (dtype, _device_key(leaf))


def _first_bad_gradient(xp: Any, leaves: Sequence[Array], paths: Sequence[Path]) -> str:
    for path, leaf in zip(paths, leaves):
        if not bool(xp.all(xp.isfinite(leaf))):
            return f"non-finite gradient in leaf {path_str(path)!r}"
        if not bool(gradient_ok(xp, [leaf])):
            return f"gradient of leaf {path_str(path)!r} too large for the statistics (squared norm above {OVERFLOW_MARGIN} x the largest float)"
    return "non-finite gradient"  # pragma: no cover


def build_transform(
    *,
    name: str,
    init_group: Callable[[tuple[Array, ...], tuple[Path, ...], Any], dict[str, Array]],
    update_group: Optional[Callable[..., tuple[tuple[Array, ...], dict[str, Array]]]] = None,
    update_groups: Optional[Callable[..., list[tuple[tuple[Array, ...], dict[str, Array]]]]] = None,
    group_leaves: Callable[[Sequence[Path], Sequence[Array]], list[LeafGroup]] = singleton_groups,
    on_nonfinite: str = "skip",
    needs_params: bool = False,
    intervals: Sequence[Interval] = (),
    matmul_precision: str = "highest",
    elementwise: bool = False,
    layout_hint: Optional[Callable[[dict, dict], str]] = None,
    legacy_names: Optional[Callable[[dict], dict]] = None,
) -> Transform:
    """Assemble a tree-level :class:`Transform` from a method's per-group functions.

    Parameters
    ----------
    name:
        The method's name, used in error messages.
    init_group:
        ``(leaves, paths, xp) -> {name: array}``: the state of one group. Zero-size groups are not
        passed to it (they get an empty state and zero updates).
    update_group:
        ``(grads, state, params, ctx) -> (updates, new_state)`` for one group; ``params`` is the
        group's tuple of parameters, or ``None`` when ``update`` was called without them.
        ``new_state`` must have the same names, shapes and dtypes as ``state``.
    update_groups:
        ``(grads, states, params, ctxs) -> [(updates, new_state), ...]``, given instead of
        ``update_group``: the same function over lists of all the (non-empty) groups of one call,
        in order, so that a method can stack blocks of equal shape across groups into one batched
        matmul or solve (one kernel instead of one per parameter on a GPU). ``ctxs[i]`` is the
        context ``update_group`` would get for group ``i``.
    group_leaves:
        ``(paths, leaves) -> [LeafGroup]``: which leaves form one block; singletons by default.
    on_nonfinite:
        ``"skip"``: a step whose gradient tree holds a NaN or Inf, or whose new state or updates
        would (a finite gradient so large that a statistic overflows), returns zero updates, leaves
        the state unchanged (the counter does not advance) and increments ``nonfinite_count``; the
        selection is element-wise (no device value is read), except where reading costs no
        synchronisation (NumPy; torch on the CPU outside ``torch.compile``: ``_backend.host_bool``),
        where a step read as finite makes no selections at all (the same numbers). ``"raise"``: ``FloatingPointError``
        naming the first offending gradient leaf, or the state entry that overflowed (needs
        concrete arrays, so it is refused under ``jax.jit``).
    needs_params:
        Whether ``update`` requires ``params`` (e.g. for weight decay).
    intervals:
        The intervals (ints or predicates ``calls -> bool``) that ``update_group`` passes to
        ``ctx.every``: :meth:`Transform.due` evaluates them on the host for compiled callers.
    matmul_precision:
        The float32 matmul precision of the step (:func:`float32_matmul_precision`); full float32 by
        default, which faithful modes must keep.
    elementwise:
        ``update_group`` computes each entry of a single leaf's updates and state from the same
        entry of its inputs alone (no reduction over the leaf, nothing read from its shape or path),
        and every state entry has the leaf's shape. Leaves of at most :data:`FLAT_MAX_ELEMENTS`
        elements (:data:`FLAT_MAX_TRACED_ELEMENTS` under ``torch.compile`` or ``jax.jit``) and of
        one dtype layout then run as one flat leaf through the whole step (skip
        decision, ``update_group``, selections): one trace under a compiler and one operation
        instead of one per parameter eagerly, with the same numbers. With ``on_nonfinite="skip"``
        only (``"raise"`` names the offending leaf); the overflow margin then applies to the flat
        leaf's squared norm, the sum of its leaves' (a stricter test).
    layout_hint:
        ``(found, layout) -> str``, both ``{entry: (shape, dtype)}``: text appended to the error for
        a state that does not fit the gradients, or ``""``; kept as ``init.layout_hint`` for
        adapters that check loaded state. Says which arguments reproduce a layout an older version
        made, where a default changed the layout.
    legacy_names:
        ``entries -> entries``: a group's state saved under the entry names an earlier version
        wrote, as the same arrays under the current names (the very dict given when no name is
        old). ``update`` renames such a state before anything else (a restored optax state keeps
        working; the state it returns has the current names); kept as ``init.legacy_names`` for
        adapters that rename on load (torch's ``load_state_dict``).
    """
    check_choice("matmul_precision", matmul_precision, tuple(_JAX_PRECISION))
    check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
    if (update_group is None) == (update_groups is None):
        raise TypeError(f"{name}: build_transform needs exactly one of update_group and update_groups")
    if elementwise and (update_group is None or group_leaves is not singleton_groups):
        raise TypeError(f"{name}: elementwise=True needs update_group and the default singleton groups")
    # The state layout init_group gives a group's leaves, by group and leaf shapes/dtypes: update
    # compares it with the state it is given (the gradients stand in for the parameters).
    # init records the layouts it makes, so that update builds a state only for gradients unlike
    # the parameters init saw (a state from elsewhere, another dtype): no second copy of the state.
    layouts: dict[tuple, dict[str, tuple]] = {}
    # The shapes init saw at each leaf path, so that update can name a gradient of the wrong shape
    # (a transposed one) when it is given no params and the state's layout would not show it
    # (S-AdaGrad's sketch of the flattened leaf). A set: one transform may be initialised on
    # several trees.
    leaf_shapes: dict[str, set] = {}

    def layout_key(group: LeafGroup, leaves: tuple[Array, ...], xp: Any) -> tuple:
        return (group.key, group.paths, tuple(tuple(x.shape) for x in leaves), tuple(x.dtype for x in leaves), xp.__name__)

    def layout_for(group: LeafGroup, leaves: tuple[Array, ...], xp: Any) -> dict[str, tuple]:
        key = layout_key(group, leaves, xp)
        if key not in layouts:
            layouts[key] = _layout(init_group(leaves, group.paths, xp))
        return layouts[key]

    def init(params: Any) -> PrecondState:
        leaves, treedef = tree_flatten(params)
        xp = _check_leaves(leaves, treedef.paths, f"{name}: params")
        dev = array_device(leaves[0])
        for path, leaf in zip(treedef.paths, leaves):
            leaf_shapes.setdefault(path_str(path), set()).add(tuple(leaf.shape))
        groups = {}
        for group in group_leaves(treedef.paths, leaves):
            members = tuple(leaves[i] for i in group.indices)
            if all(math.prod(leaf.shape) == 0 for leaf in members):
                groups[group.key] = {}
            else:
                groups[group.key] = _unaliased(xp, init_group(members, group.paths, xp), members)
                layouts[layout_key(group, members, xp)] = _layout(groups[group.key])

        def counter() -> Array:
            return xp.zeros((), dtype=xp.int32, device=dev)

        return PrecondState(count=counter(), nonfinite_count=counter(), groups=groups)

    declared = tuple(intervals)
    precision = matmul_precision

    def due(step: int) -> tuple[bool, ...]:
        return tuple(bool(is_due(interval, step)) for interval in declared)

    def update(
        grads: Any,
        state: PrecondState,
        params: Any = None,
        *,
        step: int | None = None,
        due: tuple[bool, ...] | None = None,
        **extra: Any,
    ) -> tuple[Any, PrecondState]:
        try:
            grad_leaves, treedef = tree_flatten(grads)
            xp = array_namespace(*grad_leaves)
        except TypeError:
            xp = None  # _update names the problem
        if legacy_names is not None and isinstance(state, PrecondState):
            state = _renamed(state, legacy_names)
        with float32_matmul_precision(xp, precision) if xp is not None else _NO_CONTEXT:
            packed = None
            if elementwise and on_nonfinite == "skip" and xp is not None:
                packed = _pack(name, layout_for, grad_leaves, treedef, state, params, xp)
            if packed is None:
                return _update(grads, state, params, step, due, extra)
            flat_grads, flat_state, flat_params, unpack = packed
            return unpack(*_update(flat_grads, flat_state, flat_params, step, due, extra))

    def _update(
        grads: Any, state: PrecondState, params: Any, step: int | None, due: Any, extra: dict
    ) -> tuple[Any, PrecondState]:
        if not isinstance(state, PrecondState):
            raise TypeError(f"{name}: state must be the PrecondState returned by init, got {type(state)}")
        grad_leaves, treedef = tree_flatten(grads)
        xp = _check_leaves(grad_leaves, treedef.paths, f"{name}: grads")
        param_leaves = None
        if params is not None:
            param_leaves, param_def = tree_flatten(params)
            if param_def.paths != treedef.paths:
                raise ValueError(
                    f"{name}: grads and params have different tree structures: grads leaves "
                    f"{[path_str(p) for p in treedef.paths]}, params leaves "
                    f"{[path_str(p) for p in param_def.paths]}"
                )
            _check_namespace(name, xp, treedef.paths, grad_leaves, param_leaves, "parameter")
            for path, g, p in zip(treedef.paths, grad_leaves, param_leaves):
                if tuple(g.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, "
                        f"parameter has shape {tuple(p.shape)}"
                    )
                if g.dtype != p.dtype:
                    raise TypeError(
                        f"{name}: gradient of {path_str(path)!r} has dtype {g.dtype}, "
                        f"parameter has dtype {p.dtype}"
                    )
        elif needs_params:
            raise ValueError(f"{name}: update needs params (pass update(grads, state, params))")
        else:
            for path, g in zip(treedef.paths, grad_leaves):
                seen = leaf_shapes.get(path_str(path))
                if seen and tuple(g.shape) not in seen:
                    shapes = " or ".join(str(shape) for shape in sorted(seen))
                    raise ValueError(
                        f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, "
                        f"parameter has shape {shapes} (as given to init)"
                    )

        groups = group_leaves(treedef.paths, grad_leaves)
        expected, found = {g.key for g in groups}, set(state.groups)
        if expected != found:
            raise ValueError(
                f"{name}: grads do not match the optimizer state: leaves missing from the state "
                f"{sorted(expected - found)}, state entries with no gradient {sorted(found - expected)}"
            )

        ok = gradient_ok(xp, grad_leaves)
        if on_nonfinite == "raise":
            if _is_tracer(ok):
                raise ValueError(
                    f"{name}: on_nonfinite='raise' needs concrete arrays and cannot run under "
                    "jax.jit; use on_nonfinite='skip'"
                )
            if not bool(ok):
                raise FloatingPointError(f"{name}: {_first_bad_gradient(xp, grad_leaves, treedef.paths)}")
        # Where reading the skip predicate costs no synchronisation (NumPy, torch on the CPU,
        # eagerly), a step known to be finite makes none of the skip's selections: they would
        # select their first operand. Except of an operand that is not dense, whose selection
        # would also lay it out anew (is_dense): the later steps then round as they would have.
        # Every other step (a skipped one included) selects element-wise, never reading a device
        # value.
        finite_step = on_nonfinite == "raise" or host_bool(xp, ok) is True
        # A skipped step's arithmetic runs on zeros: its results are discarded anyway, and NaN or
        # huge inputs would only raise warnings (NumPy) or errors (LAPACK on NaN) on the way.
        # Not on JAX for a method with reductions or matmuls: JAX neither warns nor raises (its
        # factorisations return NaN), and XLA's CPU backend cannot fuse the selection into a
        # column reduction (YNNPACK) or a matmul reading the gradient, so it wrote a zeroed copy.
        # An element-wise method's loops take the selection in (measured: docs/backends.md).
        # A 0-D zero per dtype and device serves every leaf's selections (the update is cast to
        # the gradient's dtype).
        ctx = StepContext(xp=xp, count=state.count, extra=extra, shared={})
        zeros = [ctx.once(("zero", g.dtype, _device_key(g)), lambda g=g: scalar_zero(xp, g)) for g in grad_leaves]
        if elementwise or not is_jax_namespace(xp):
            chosen = [i for i, g in enumerate(grad_leaves) if not (finite_step and is_dense(g))]
            joined = leafwise(xp, lambda g, zero: select(xp, ok, g, zero),
                              [grad_leaves[i] for i in chosen], zeros=[zeros[i] for i in chosen])
            grad_leaves = list(grad_leaves)
            for i, g in zip(chosen, joined):
                grad_leaves[i] = g

        if due is not None:
            if len(due) != len(declared):
                raise ValueError(f"{name}: due has {len(due)} decisions, the method declares {len(declared)} intervals")
            decisions, calls = tuple(zip(declared, due)), None
        else:
            decisions = None
            calls = step if step is not None else state.count + state.nonfinite_count
        skipping = on_nonfinite == "skip" and not finite_step
        selecting = on_nonfinite == "skip"
        ctx = ctx._replace(calls=calls, due=decisions, ok=ok if selecting else None, settled=IdentityDict(), applied=finite_step)
        updates: list[Any] = [None] * len(grad_leaves)
        new_groups = {}
        members = [
            (
                group,
                tuple(grad_leaves[i] for i in group.indices),
                None if param_leaves is None else tuple(param_leaves[i] for i in group.indices),
            )
            for group in groups
        ]
        live = [m for m in members if not all(math.prod(leaf.shape) == 0 for leaf in m[1])]
        if not _torch_compiling():  # dynamo cannot trace the dict compare; torch's .grad always fits
            for group, g, _ in live:
                _check_state_namespace(name, xp, group, g, state.groups[group.key])
                _check_fits(name, group, g, state.groups[group.key], layout_for(group, g, xp), layout_hint)
        contexts = [ctx._replace(paths=group.paths) for group, _, _ in live]
        if not live:  # every group is zero-size: nothing for the method to compute
            results = []
        elif update_groups is not None:
            results = update_groups(
                [g for _, g, _ in live], [state.groups[group.key] for group, _, _ in live], [p for _, _, p in live], contexts
            )
        else:
            results = [update_group(g, state.groups[group.key], p, c) for (group, g, p), c in zip(live, contexts)]
        by_key = {group.key: result for (group, _, _), result in zip(live, results)}
        for group, g, _ in members:
            old = state.groups[group.key]
            if group.key in by_key:
                upd, new = by_key[group.key]
            else:  # a zero-size group: no state, zero updates
                upd, new = tuple(xp.zeros_like(leaf) for leaf in g), {}
            _check_group(name, group, g, upd, old, new)
            for i, u in zip(group.indices, upd):
                target = grad_leaves[i].dtype
                updates[i] = u if u.dtype == target else xp.astype(u, target)
            new_groups[group.key] = new

        # The parameters never receive a NaN or Inf, whatever a method's numerics did; the step's
        # own skip selects element-wise (no device read), fused into the kernels computing it.
        # Two selections, not one on ok & isfinite(u): XLA's CPU backend does not fuse an expensive
        # producer of u (a division) into a consumer that reads u twice, and would write u out.
        if skipping:  # (finite_step is False: the finite test below would not read the host)
            updates = leafwise(xp, lambda u, zero: finite_or_zero(xp, select(xp, ok, u, zero), zero), updates, zeros=zeros)
        elif not (finite_step and host_all_finite(xp, updates)):  # the step's own test reads nothing else
            updates = leafwise(xp, lambda u, zero: finite_or_zero(xp, u, zero), updates, zeros=zeros)
        if selecting:
            new_groups = {key: dict(entries) for key, entries in new_groups.items()}
            for key, entries in new_groups.items():
                for k, v in entries.items():
                    old = state.groups[key][k]
                    # An entry the step left untouched, or that the method selected, needs no
                    # selection; nor does a dense one of a step known to be applied.
                    if v is not old and v not in ctx.settled and not (finite_step and is_dense(v)):
                        entries[k] = select(xp, ok, v, old)
        if finite_step:  # the step is applied: one addition, the skipped steps' count as it was
            new_state = PrecondState(count=state.count + 1, nonfinite_count=state.nonfinite_count, groups=new_groups)
        else:
            applied = xp.astype(ok, xp.int32)
            new_state = PrecondState(
                count=state.count + applied,
                nonfinite_count=state.nonfinite_count + (1 - applied),
                groups=new_groups,
            )
        return tree_unflatten(treedef, updates), new_state

    init.layout_hint = layout_hint  # type: ignore[attr-defined]
    init.legacy_names = legacy_names  # type: ignore[attr-defined]
    return Transform(init, update, due, matmul_precision, group_leaves)


#: The largest leaf an ``elementwise`` method runs together with others as one flat leaf, eagerly
#: and under a compiler (``torch.compile``, ``jax.jit``). Larger leaves run alone: the copies into
#: and out of a flat leaf cost passes over the data, against a per-leaf cost of a few dozen
#: Python-level operations eagerly and of a kernel or two compiled (measurements: docs/backends.md,
#: "Flat leaves of element-wise methods").
FLAT_MAX_ELEMENTS = 2**16
FLAT_MAX_TRACED_ELEMENTS = 2**14


def _pack(
    name: str, layout_for: Callable, grad_leaves: list, treedef: Any, state: Any, params: Any, xp: Any
) -> Optional[tuple]:
    """An ``elementwise`` method's small leaves that agree in dtype and state layout as one flat leaf
    per layout: a :func:`blocking.stack` of the flattened gradients, parameters and state entries.

    Returns the flat tree's gradients, state and parameters (a leaf left alone keeps its group key)
    and ``unpack(updates, new_state)``, which hands each packed leaf its slices of the results
    (:func:`blocking.unstack`) in its own shape; ``None`` when no two leaves pack. Leaves that do
    not fit their state, or a tree that does not match, are left to ``_update``, which names the
    problem. ``layout_for(group, leaves, xp)`` is the state layout ``init_group`` gives the leaves.
    """
    if not isinstance(state, PrecondState):
        return None
    param_leaves = None
    if params is not None:
        param_leaves, param_def = tree_flatten(params)
        if param_def.paths != treedef.paths:
            return None
        # before concatenating, which would turn the other library's arrays into this one's
        _check_namespace(name, xp, treedef.paths, grad_leaves, param_leaves, "parameter")
    groups = singleton_groups(treedef.paths, grad_leaves)
    if {g.key for g in groups} != set(state.groups) or len(groups) != len(state.groups):
        return None
    if not _torch_compiling():
        for group, g in zip(groups, grad_leaves):
            _check_state_namespace(name, xp, group, (g,), state.groups[group.key])
    limit = FLAT_MAX_TRACED_ELEMENTS if _torch_compiling() or any(map(_is_tracer, grad_leaves)) else FLAT_MAX_ELEMENTS
    states = [state.groups[group.key] for group in groups]
    leaves = [(g,) if param_leaves is None else (g, param_leaves[i]) for i, g in enumerate(grad_leaves)]

    def packable(i: int) -> bool:
        g, entries = grad_leaves[i], states[i]
        p = None if param_leaves is None else param_leaves[i]
        return (
            0 < math.prod(g.shape) <= limit
            and len(entries) > 0
            and xp.isdtype(g.dtype, "real floating")
            and (p is None or (tuple(p.shape) == tuple(g.shape) and p.dtype == g.dtype))
            and _layout(entries) == layout_for(groups[i], (g,), xp)
            and all(tuple(v.shape) == tuple(g.shape) for v in entries.values())
        )

    candidates = [i for i in range(len(groups)) if packable(i)]
    stacks = [
        s
        for s in stack(
            xp,
            [tuple([_flat(xp, a) for a in (*leaves[i], *states[i].values())]) for i in candidates],
            key=_dtypes,  # all 1-D; no device lookups per operand (eager steps of many small leaves)
            labels=[tuple(states[i]) for i in candidates],
        )
        if len(s.indices) > 1
    ]
    if not stacks:
        return None
    packs = [tuple(candidates[j] for j in s.indices) for s in stacks]
    flat_keys = [f"<{name} flat {n}>" for n in range(len(stacks))]
    packed = {i for members in packs for i in members}
    alone = [i for i in range(len(groups)) if i not in packed]
    flat_grads = {groups[i].key: grad_leaves[i] for i in alone}
    flat_params = None if param_leaves is None else {groups[i].key: param_leaves[i] for i in alone}
    flat_groups = {groups[i].key: states[i] for i in alone}
    for key, members, s in zip(flat_keys, packs, stacks):
        flat_grads[key] = s.operands[0]
        if flat_params is not None:
            flat_params[key] = s.operands[1]
        flat_groups[key] = dict(zip(states[members[0]], s.operands[len(leaves[members[0]]) :]))

    def unpack(updates: dict, new_state: PrecondState) -> tuple[Any, PrecondState]:
        out = [updates.get(group.key) for group in groups]
        new_groups = dict(new_state.groups)
        for key, members, s in zip(flat_keys, packs, stacks):
            new, old = new_state.groups[key], flat_groups[key]
            changed = [k for k in new if new[k] is not old[k]]  # an entry the step left untouched is the leaf's own
            sliced = unstack([s], [(updates[key], *(new[k] for k in changed))], len(candidates))
            for i, j in zip(members, s.indices):
                shape = tuple(grad_leaves[i].shape)
                update, *entries = sliced[j]
                out[i] = _shaped(xp, update, shape)
                own = new_groups[groups[i].key] = dict(states[i])
                for k, entry in zip(changed, entries):
                    own[k] = _shaped(xp, entry, shape)
        new_groups = {key: new_groups[key] for key in state.groups}
        return tree_unflatten(treedef, out), new_state._replace(groups=new_groups)

    return flat_grads, state._replace(groups=flat_groups), flat_params, unpack


def _flat(xp: Any, a: Array) -> Array:
    """``reshape(a, (-1,))``; a 1-D ``a`` itself (no operation in an eager step)."""
    return a if a.ndim == 1 else xp.reshape(a, (-1,))


def _shaped(xp: Any, a: Array, shape: tuple) -> Array:
    """``reshape(a, shape)``; ``a`` itself when it has that shape already."""
    return a if tuple(a.shape) == shape else xp.reshape(a, shape)


def _dtypes(operands: tuple) -> tuple:
    """The dtypes of ``operands``: what tells flattened leaves of one method's state layout apart."""
    return tuple(a.dtype for a in operands)


def _layout(entries: dict[str, Array]) -> dict[str, tuple]:
    """The layout of a group's state: ``{name: (shape, dtype)}``."""
    return {k: (tuple(v.shape), v.dtype) for k, v in entries.items()}


def _unaliased(xp: Any, entries: dict[str, Array], params: Sequence[Array]) -> dict[str, Array]:
    """The state entries with no array shared between two entries or with a parameter.

    A method may return one zeros array for several entries; the core never mutates it, but the
    torch adapter keeps state tensors in place and ``torch.compile`` guards against aliased inputs.
    """
    seen = {id(p) for p in params}
    out = {}
    for key, value in entries.items():
        if id(value) in seen:
            value = xp.asarray(value, copy=True)
        seen.add(id(value))
        out[key] = value
    return out


def _namespace_name(xp: Any) -> str:
    """``numpy`` for ``array_api_compat.numpy``, ``jax.numpy`` for JAX, ..."""
    return getattr(xp, "__name__", repr(xp)).removeprefix("array_api_compat.")


def _check_namespace(
    name: str, xp: Any, paths: Sequence[Path], grads: Sequence[Array], others: Sequence[Array], what: str
) -> None:
    """Refuse, by leaf, parameters of another array library than the gradients (JAX parameters
    with NumPy gradients would fail deep inside a method, or silently return the other library's
    arrays). Leaves of the gradient's type (or a subclass: torch's ``Parameter``) pass at the cost
    of an ``isinstance`` each; otherwise one namespace lookup for the whole tree, and leaf by leaf
    only to name the culprit. Not under ``torch.compile``, whose tensors are all torch's."""
    if _torch_compiling() or all(isinstance(o, type(g)) for g, o in zip(grads, others)):
        return
    try:
        if array_namespace(*others) is xp:
            return
    except TypeError:
        pass
    for path, g, other in zip(paths, grads, others):
        try:
            other_xp = array_namespace(other)
        except TypeError:
            other_xp = type(other)
        if other_xp is not xp:
            raise TypeError(
                f"{name}: gradient of {path_str(path)!r} is a {_namespace_name(xp)} array, its {what} "
                f"a {_namespace_name(other_xp)} array; give the gradients, parameters and state of "
                "one array library"
            )


def _check_state_namespace(name: str, xp: Any, group: LeafGroup, grads: tuple[Array, ...], state: dict[str, Array]) -> None:
    """Refuse, by leaf, a state of another array library than the gradients (checked on one entry
    per group, and only where the types differ: no namespace lookup in the usual step)."""
    entry = next(iter(state.values()), None)
    if entry is None or isinstance(entry, type(grads[0])):
        return
    _check_namespace(name, xp, group.paths[:1], grads[:1], [entry], "optimizer state")


def _renamed(state: PrecondState, legacy_names: Callable[[dict], dict]) -> PrecondState:
    """``state`` with every group's entries under the current names (``build_transform``'s
    ``legacy_names``); the very object when no group had an old name."""
    groups = {key: legacy_names(entries) for key, entries in state.groups.items()}
    if all(groups[key] is entries for key, entries in state.groups.items()):
        return state
    return state._replace(groups=groups)


def _check_fits(
    name: str, group: LeafGroup, grads: tuple[Array, ...], state: dict[str, Array], layout: dict[str, tuple],
    hint: Optional[Callable[[dict, dict], str]] = None,
) -> None:
    """Refuse, by name, gradients that do not fit the group's state: a transposed or reshaped
    gradient, another dtype (a float64 gradient for float32 state), a missing partner leaf (MBF's
    bias); ``layout`` is the state ``init_group`` gives these gradients."""
    found = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if found == layout:
        return
    given = ", ".join(f"{path_str(path)!r} {tuple(g.shape)}/{g.dtype}" for path, g in zip(group.paths, grads))
    wrong = sorted(set(found) ^ set(layout)) or [k for k in sorted(found) if found[k] != layout[k]]
    detail = "; ".join(
        f"{k!r}: state {found[k][0]}/{found[k][1]}, gradient needs {layout[k][0]}/{layout[k][1]}"
        if k in found and k in layout
        else f"{k!r} {'only in the state' if k in found else 'missing from the state'}"
        for k in wrong
    )
    raise ValueError(
        f"{name}: the gradient of {given} does not fit the optimizer state of this group ({detail}); "
        "a transposed gradient, another dtype, or a weight without its bias?"
        + (hint(found, layout) if hint is not None else "")
    )


def _check_group(
    name: str,
    group: LeafGroup,
    grads: tuple[Array, ...],
    updates: tuple[Array, ...],
    old: dict[str, Array],
    new: dict[str, Array],
) -> None:
    """Refuse, by name, any update that would change the layout of the state (e.g. broadcasting)."""
    where = path_str(group.paths[0])
    for g, u in zip(grads, updates):
        if tuple(u.shape) != tuple(g.shape):
            raise ValueError(f"{name}: update of {where!r} has shape {tuple(u.shape)}, gradient {tuple(g.shape)}")
    if set(new) != set(old):
        raise ValueError(f"{name}: state of {where!r} changed its entries {sorted(old)} -> {sorted(new)}")
    for key, value in new.items():
        if tuple(value.shape) != tuple(old[key].shape) or value.dtype != old[key].dtype:
            raise ValueError(
                f"{name}: the gradient of {where!r} (shape {tuple(grads[0].shape)}, dtype "
                f"{grads[0].dtype}) does not fit the optimizer state: {key!r} would change from "
                f"{tuple(old[key].shape)}/{old[key].dtype} to {tuple(value.shape)}/{value.dtype}"
            )
