"""Leaves run together: an element-wise function over the leaves of one layout joined end to end
(:func:`leafwise`), and an element-wise method's small leaves packed into one flat leaf for its
whole step (:func:`pack`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from array_api_compat import is_jax_namespace

from .._backend import device_key, is_tracer, leading_slices, plain, torch_compiling
from ..blocking import stack, unstack
from ..transform import PrecondState, singleton_groups
from ..tree import tree_flatten, tree_unflatten
from .checks import check_namespace, check_state_namespace, layout_of
from .context import StepContext, settle_pieces

__all__ = ["leafwise", "pack", "FLAT_MAX_ELEMENTS", "FLAT_MAX_TRACED_ELEMENTS"]

Array = Any


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
    call). Under a compiler (``torch.compile``, JAX) leaf by leaf, which it fuses; so too within
    :func:`~precond_ref._backend.plain_forms`. The numbers are the same either way.
    """
    count = len(operands[0])
    if count < 2 or torch_compiling() or is_jax_namespace(xp) or plain():
        return [fn(*args) for args in zip(*operands, *(() if zeros is None else (zeros,)))]
    tupled = []

    def joined(*arrays: Array, first: int) -> tuple:
        out = fn(*arrays) if zeros is None else fn(*arrays, zeros[first])
        tupled.append(isinstance(out, tuple))
        return out if tupled[-1] else (out,)

    members = [tuple(_flat(xp, values[i]) for values in operands) for i in range(count)]
    stacks = stack(xp, members, labels=None if zeros is None else [(z.dtype, device_key(z)) for z in zeros])
    computed = [joined(*s.operands, first=s.indices[0]) for s in stacks]
    outs = unstack(stacks, computed, count)
    results = [tuple(_shaped(xp, a, tuple(leaf.shape)) for a in out) for out, leaf in zip(outs, operands[0])]
    if ctx is not None and ctx.settled:  # nothing selected yet this step (a step read as finite): nothing to mark
        for s, wholes in zip(stacks, computed):
            for k, whole in enumerate(wholes):
                settle_pieces(ctx, whole, [results[i][k] for i in s.indices])
    return results if tupled[0] else [out for (out,) in results]


#: The largest leaf an ``elementwise`` method runs together with others as one flat leaf, eagerly
#: and under a compiler (``torch.compile``, ``jax.jit``). Larger leaves run alone: the copies into
#: and out of a flat leaf cost passes over the data, against a per-leaf cost of a few dozen
#: Python-level operations eagerly and of a kernel or two compiled (measurements:
#: records/backends-measurements.md, "Flat leaves of element-wise methods").
FLAT_MAX_ELEMENTS = 2**16
FLAT_MAX_TRACED_ELEMENTS = 2**14


def pack(
    name: str, layout_for: Callable, grad_leaves: list, treedef: Any, state: Any, params: Any, xp: Any
) -> Optional[tuple]:
    """An ``elementwise`` method's small leaves that agree in dtype and state layout as one flat leaf
    per layout: a :func:`blocking.stack` of the flattened gradients, parameters and state entries.

    Returns the flat tree's gradients, state and parameters (a leaf left alone keeps its group key),
    ``unpack(updates, new_state)``, which hands each packed leaf its slices of the results
    (:func:`blocking.unstack`) in its own shape, and the paths of each flat leaf's members by its
    key (what an error about a flat leaf names); ``None`` when no two leaves pack. Leaves that do
    not fit their state, or a tree that does not match, are left to ``_update``, which names the
    problem. ``layout_for(group, leaves, xp)`` is the state layout ``init_group`` gives the leaves.
    Within :func:`~precond_ref._backend.plain_forms` nothing packs: every leaf steps alone.
    """
    if plain() or not isinstance(state, PrecondState):
        return None
    param_leaves = None
    if params is not None:
        param_leaves, param_def = tree_flatten(params)
        if param_def.paths != treedef.paths:
            return None
        # before concatenating, which would turn the other library's arrays into this one's
        check_namespace(name, xp, treedef.paths, grad_leaves, param_leaves, "parameter")
    groups = singleton_groups(treedef.paths, grad_leaves)
    if {g.key for g in groups} != set(state.groups) or len(groups) != len(state.groups):
        return None
    # Under torch.compile a state is taken to fit its gradients, as the run loop takes it
    # (_Runner.run_groups): torch's .grad always fits, and the torch adapter migrates a state on load.
    compiling = torch_compiling()
    if not compiling:
        for group, g in zip(groups, grad_leaves):
            check_state_namespace(name, xp, group, (g,), state.groups[group.key])
    limit = FLAT_MAX_TRACED_ELEMENTS if compiling or any(map(is_tracer, grad_leaves)) else FLAT_MAX_ELEMENTS
    states = [state.groups[group.key] for group in groups]
    leaves = [(g,) for g in grad_leaves] if param_leaves is None else list(zip(grad_leaves, param_leaves))

    def packable(i: int) -> bool:
        g, entries = grad_leaves[i], states[i]
        p = None if param_leaves is None else param_leaves[i]
        return (
            0 < math.prod(g.shape) <= limit
            and len(entries) > 0
            and xp.isdtype(g.dtype, "real floating")
            and (p is None or (tuple(p.shape) == tuple(g.shape) and p.dtype == g.dtype))
            and (compiling or layout_of(entries) == layout_for(groups[i], (g,), xp))
            and all(tuple(v.shape) == tuple(g.shape) for v in entries.values())
        )

    candidates = [i for i in range(len(groups)) if packable(i)]
    flattened = [tuple([_flat(xp, a) for a in (*leaves[i], *states[i].values())]) for i in candidates]
    # all 1-D: keyed by their dtypes, no device lookups per operand (eager steps of many small leaves)
    stacks = [s for s in stack(xp, flattened, key=_dtypes, labels=[tuple(states[i]) for i in candidates]) if len(s.indices) > 1]
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
            slices = [leading_slices(a, s.lengths) for a in (updates[key], *(new[k] for k in changed))]
            for i, update, *entries in zip(members, *slices):
                shape = tuple(grad_leaves[i].shape)
                out[i] = _shaped(xp, update, shape)
                new_groups[groups[i].key] = {**states[i], **{k: _shaped(xp, entry, shape) for k, entry in zip(changed, entries)}}
        new_groups = {key: new_groups[key] for key in state.groups}
        return tree_unflatten(treedef, out), new_state._replace(groups=new_groups)

    members = {key: tuple(treedef.paths[i] for i in indices) for key, indices in zip(flat_keys, packs)}
    return flat_grads, state._replace(groups=flat_groups), flat_params, unpack, members


def _flat(xp: Any, a: Array) -> Array:
    """``reshape(a, (-1,))``; a 1-D ``a`` itself (no operation in an eager step)."""
    return a if a.ndim == 1 else xp.reshape(a, (-1,))


def _shaped(xp: Any, a: Array, shape: tuple) -> Array:
    """``reshape(a, shape)``; ``a`` itself when it has that shape already."""
    return a if tuple(a.shape) == shape else xp.reshape(a, shape)


def _dtypes(operands: tuple) -> tuple:
    """The dtypes of ``operands``: what tells flattened leaves of one method's state layout apart."""
    return tuple(a.dtype for a in operands)


