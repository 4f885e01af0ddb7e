"""The engine's checks of what it is given, each naming the offending leaf: trees of arrays of one
library and real floating dtype, gradients that fit the state, updates and new state that keep
the state's layout; and a state saved under older names: its failure counter
(:func:`renamed_failures`), a tiled state's factors saved per tile or with a vector's dense tiles
(:func:`tiled_legacy_names`)."""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, Optional, Sequence

from array_api_compat import array_namespace

from .._backend import namespace_of, torch_compiling
from ..transform import LeafGroup
from ..tree import Path, path_str, tree_flatten
from .phases import tile_phase

__all__ = [
    "check_leaves", "check_params", "check_groups", "check_namespace", "check_state_namespace", "check_fits", "check_group", "layout_of", "unaliased",
    "renamed_failures", "tiled_legacy_names", "stacked_tiles", "diagonal_vector",
]

Array = Any


def check_leaves(leaves: Sequence[Array], paths: Sequence[Path], what: str, xp: Any = None) -> Any:
    """The namespace of ``leaves`` (``xp`` where the caller found it already), refusing an empty
    tree, leaves of several libraries and leaves of other than a real floating dtype."""
    if not leaves:
        raise ValueError(f"{what} has no array leaves")
    if xp is None:
        try:
            xp = namespace_of(*leaves)
        except TypeError as err:
            raise TypeError(f"{what}: every leaf must be an array of one namespace ({err})") from None
    for path, leaf in zip(paths, leaves):
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"{what} leaf {path_str(path)!r} has dtype {leaf.dtype}; only real floating dtypes "
                "are supported (mask integer, boolean and complex leaves out)"
            )
    return xp


def check_step(name: str, step: Any) -> None:
    """``TypeError`` or ``ValueError`` naming ``step`` where it is not the number of earlier calls:
    a Python (or NumPy) integer of at least 0, or a 0-D integer array (a counter traced under
    ``jax.jit``). A float would be accepted by the interval's ``%`` and silently move every
    refresh off its call."""
    if hasattr(step, "shape") and hasattr(step, "dtype"):
        if tuple(step.shape) != () or "int" not in str(step.dtype):
            raise TypeError(f"{name}: step must be the number of earlier calls, an integer or a 0-D integer array, "
                            f"got an array of shape {tuple(step.shape)} and dtype {step.dtype}")
        return
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name}: step must be the number of earlier calls, an integer, got {step!r}")
    if step < 0:
        raise ValueError(f"{name}: step must be the number of earlier calls, at least 0, got {step}")


def check_due(name: str, due: Any, intervals: int) -> None:
    """``TypeError`` or ``ValueError`` naming ``due`` where it is not the tuple of decisions
    ``Transform.due(step)`` returns: one per interval the method declares."""
    if not isinstance(due, (tuple, list)):
        raise TypeError(f"{name}: due must be the tuple of decisions due(step) returns, got {type(due).__name__} {due!r}")
    if len(due) != intervals:
        raise ValueError(f"{name}: due has {len(due)} decisions, the method declares {intervals} intervals")


def check_params(name: str, xp: Any, grads: Sequence[Array], paths: Sequence[Path], params: Any, needs_params: bool,
                 leaf_shapes: dict[str, set]) -> Optional[list]:
    """The parameter leaves (``None`` without params), checked against the gradients: tree,
    library, shapes, dtypes; without params, the gradients' shapes against those ``init`` saw
    (``leaf_shapes``: by leaf path, a set of shapes)."""
    if params is None:
        if needs_params:
            raise ValueError(f"{name}: update needs params (pass update(grads, state, params))")
        for path, g in zip(paths, grads):
            seen = leaf_shapes.get(path_str(path))
            if seen and tuple(g.shape) not in seen:
                shapes = " or ".join(str(shape) for shape in sorted(seen))
                raise ValueError(f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, "
                                 f"parameter has shape {shapes} (as given to init)")
        return None
    param_leaves, param_def = tree_flatten(params)
    if param_def.paths != paths:
        raise ValueError(f"{name}: grads and params have different tree structures: grads leaves "
                         f"{[path_str(p) for p in paths]}, params leaves {[path_str(p) for p in param_def.paths]}")
    check_namespace(name, xp, paths, grads, param_leaves, "parameter")
    for path, g, p in zip(paths, grads, param_leaves):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"{name}: gradient of {path_str(path)!r} has shape {tuple(g.shape)}, parameter has shape {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"{name}: gradient of {path_str(path)!r} has dtype {g.dtype}, parameter has dtype {p.dtype}")
    return param_leaves


def check_groups(name: str, groups: list[LeafGroup], state_groups: dict) -> list[LeafGroup]:
    """``groups``, refused unless they are those of the state's groups, by key."""
    expected, found = {g.key for g in groups}, set(state_groups)
    if expected != found:
        raise ValueError(f"{name}: grads do not match the optimizer state: leaves missing from the state "
                         f"{sorted(expected - found)}, state entries with no gradient {sorted(found - expected)}")
    return groups


def layout_of(entries: dict[str, Array]) -> dict[str, tuple]:
    """The layout of a group's state: ``{name: (shape, dtype)}``."""
    return {k: (tuple(v.shape), v.dtype) for k, v in entries.items()}


#: The earlier names of a group's ``failures`` counter (engine docs): the roots' two counters, the
#: sketches' and the factors'.
_OLD_FAILURES = ("root_failures", "root_fallbacks", "sketch_failures", "factor_failures")


def renamed_failures(entries: dict[str, Array]) -> dict[str, Array]:
    """``build_transform``'s ``legacy_names`` of the failure counter: a group's state saved with
    the counter under an earlier name as the same state with ``failures``, the sum of the old
    counters it held (the roots' failures and fallbacks were counted apart); the very dict when
    it holds none."""
    old = [entries[k] for k in _OLD_FAILURES if k in entries]
    if not old:
        return entries
    renamed = {k: v for k, v in entries.items() if k not in _OLD_FAILURES}
    renamed["failures"] = sum(old[1:], old[0])
    return renamed


def tiled_legacy_names(entries: dict, layout: Any, diagonal: Optional[Callable] = None) -> dict:
    """``build_transform``'s ``legacy_names`` of a tiled transform
    (:func:`~precond_ref.engine.tiles.tiled_transform`): a group's state saved per tile by an
    earlier version as the current stacks (:func:`stacked_tiles`, the tiles' phases from the
    ``layout``'s ``interval`` and ``stagger``), its failure counter's earlier names renamed; where
    ``diagonal`` is given (a vector's factor diagonal), a vector's dense tiles as its diagonal
    factor (:func:`diagonal_vector`). The very dict when it is current."""
    entries = stacked_tiles(renamed_failures(entries), layout.interval, layout.stagger)
    return entries if diagonal is None else diagonal_vector(entries, diagonal)


#: The per-tile keys of earlier versions: ``tiles/t/X/n``, and before them ``tile_t/X_n`` (blocked)
#: or ``X_n`` (unblocked, tile 0), ``X`` a factor or its momentum.
_PER_TILE = re.compile(r"(?:tiles/(\d+)/|tile_(\d+)/)?(factor|factor_momentum)[/_](\d+)")


def stacked_tiles(entries: dict, interval: Any, stagger: bool) -> dict:
    """A group's state saved per tile by earlier versions (:data:`_PER_TILE`; their members'
    momenta ``momentum_i``) as the stacks of :func:`~precond_ref.engine.tiles.tile_plan`:
    ``stacks/s/X/n = stack(tile t's X_n for t in stack s)``, the tiles of one shape (their
    factors' lengths) and refresh phase (:func:`~precond_ref.engine.phases.tile_phase` of the
    factory's interval) in one stack, stacks in order of their first tile, ``momentum/i``; other
    names pass through. The very dict when it has no per-tile key."""
    out, per_tile = {}, {}
    for key, value in entries.items():
        tile = _PER_TILE.fullmatch(key)
        if tile is None:
            out[re.sub(r"^momentum_(\d+)$", r"momentum/\1", key)] = value
        else:
            per_tile[int(tile[1] or tile[2] or 0), tile[3], int(tile[4])] = value
    if not per_tile:
        return entries
    rank = 1 + max(n for _, _, n in per_tile)
    stacks: dict = {}  # (factor lengths, phase) -> its tiles, in order of first appearance
    for t in range(1 + max(t for t, _, _ in per_tile)):
        key = (tuple(per_tile[t, "factor", n].shape[0] for n in range(rank)), tile_phase(t, interval, stagger))
        stacks.setdefault(key, []).append(t)
    xp = array_namespace(*per_tile.values())
    for s, members in enumerate(stacks.values()):
        for name, n in sorted((name, n) for t, name, n in per_tile if t == members[0]):
            out[f"stacks/{s}/{name}/{n}"] = xp.stack([per_tile[t, name, n] for t in members])
    return out


def diagonal_vector(entries: dict, diagonal: Callable) -> dict:
    """Where a vector's factor is diagonal (``structures=None``): a vector's state saved with
    dense tiles (``stacks/s/factor/0`` of shape ``(k, b, b)``) as its diagonal factors, the same
    tiles in the same stacks (``(k, b)``): ``diagonal(xp, K)`` of each stack (the rule's diagonal
    factor nearest to a dense one); the tiles' factor momenta, if any, become zero momenta of the
    diagonal factors. The very dict when it is not a vector's dense state."""
    factors = {k: v for k, v in entries.items() if re.fullmatch(r"stacks/\d+/factor/\d+", k)}
    if not factors or any(not k.endswith("/factor/0") or len(v.shape) != 3 for k, v in factors.items()):
        return entries
    xp = array_namespace(*factors.values())
    out = dict(entries)
    for key, K in factors.items():
        out[key] = diagonal(xp, K)
        momentum = key.replace("/factor/", "/factor_momentum/")
        if momentum in out:
            out[momentum] = xp.zeros_like(out[key])
    return out


def unaliased(xp: Any, entries: dict[str, Array], params: Sequence[Array]) -> dict[str, Array]:
    """The state entries with no array shared between two entries or with a parameter.

    A method may return one zeros array for several entries; the core never mutates it, but the
    torch adapter keeps state tensors in place and ``torch.compile`` guards against aliased inputs.
    """
    seen = {id(p) for p in params}
    out = {}
    for key, value in entries.items():
        out[key] = xp.asarray(value, copy=True) if id(value) in seen else value
        seen.add(id(out[key]))
    return out


def _namespace_name(xp: Any) -> str:
    """``numpy`` for ``array_api_compat.numpy``, ``jax.numpy`` for JAX, ..."""
    return getattr(xp, "__name__", repr(xp)).removeprefix("array_api_compat.")


def check_namespace(
    name: str, xp: Any, paths: Sequence[Path], grads: Sequence[Array], others: Sequence[Array], what: str
) -> None:
    """Refuse, by leaf, parameters of another array library than the gradients (JAX parameters
    with NumPy gradients would fail deep inside a method, or silently return the other library's
    arrays). Leaves of the gradient's type (or a subclass: torch's ``Parameter``) pass at the cost
    of an ``isinstance`` each, the others at that of a namespace lookup each. Not under
    ``torch.compile``, whose tensors are all torch's."""
    if torch_compiling():
        return
    for path, g, other in zip(paths, grads, others):
        if isinstance(other, type(g)):
            continue
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


def check_state_namespace(name: str, xp: Any, group: LeafGroup, grads: tuple[Array, ...], state: dict[str, Array]) -> None:
    """Refuse, by leaf, a state of another array library than the gradients (checked on one entry
    per group, and only where the types differ: no namespace lookup in the usual step)."""
    entry = next(iter(state.values()), None)
    if entry is None or isinstance(entry, type(grads[0])):
        return
    check_namespace(name, xp, group.paths[:1], grads[:1], [entry], "optimizer state")




def check_fits(
    name: str, group: LeafGroup, grads: tuple[Array, ...], state: dict[str, Array], layout: dict[str, tuple],
    hint: Optional[Callable[[dict, dict], str]] = None,
) -> None:
    """Refuse, by name, gradients that do not fit the group's state: a transposed or reshaped
    gradient, another dtype (a float64 gradient for float32 state), a missing partner leaf (MBF's
    bias); ``layout`` is the state ``init_group`` gives these gradients."""
    found = layout_of(state)
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


def check_group(
    name: str,
    group: LeafGroup,
    grads: tuple[Array, ...],
    updates: tuple[Array, ...],
    old: dict[str, Array],
    new: dict[str, Array],
    members: Optional[Sequence[Path]] = None,
) -> None:
    """Refuse, by name, any update that would change the layout of the state (e.g. broadcasting,
    or a promotion to another dtype).

    ``members``: the paths of the parameters whose leaves the group runs as one flat leaf (an
    element-wise method's small leaves, :func:`~precond_ref.engine.joined.pack`), named in the
    error instead of the flat leaf's internal name."""
    names = ", ".join(repr(path_str(path)) for path in members) if members else repr(path_str(group.paths[0]))
    leaf = f"{names} (run as one flat leaf)" if members else names
    for g, u in zip(grads, updates):
        if u.shape != g.shape:  # tuples (torch.Size a subclass): compared as they are
            raise ValueError(f"{name}: update of {leaf} has shape {tuple(u.shape)}, gradient {tuple(g.shape)}")
    if sorted(new) != sorted(old):  # names are strings: two sorted lists, cheaper to trace than two sets
        raise ValueError(f"{name}: state of {leaf} changed its entries {sorted(old)} -> {sorted(new)}")
    # Eagerly the gradients were found to fit the old state (check_fits, before the step): the step
    # itself changed an entry's layout, so the message names the leaf and the entry, and gives the
    # gradient's shape and dtype beside them rather than as the culprit.
    for key, value in new.items():
        if value.shape != old[key].shape or value.dtype != old[key].dtype:
            whose = "the flat leaf's" if members else "its"
            gradient = f"{whose} gradient of shape {tuple(grads[0].shape)}, dtype {grads[0].dtype}"
            raise ValueError(
                f"{name}: the step of {leaf} would change the layout of its optimizer state: {key!r} from "
                f"{tuple(old[key].shape)}/{old[key].dtype} to {tuple(value.shape)}/{value.dtype}, with {gradient}; "
                "a step keeps each state entry's shape and dtype (was an operand of another shape or dtype "
                "broadcast or promoted into it?)"
            )
